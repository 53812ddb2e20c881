#!/usr/bin/env bash
# Here (no GPU needed): build the release test and bench binaries, the CLI and the
# NCCL example, and pack them with the Vulkan loader into .gpu/ (git-ignored) for
# `scripts/gpu_session.sh` on the GPU machine, which has the driver but no Rust.
#
#   scripts/gpu_bundle.sh            # then: device run, carry [".gpu"],
#                                    #   command `bash scripts/gpu_session.sh tests`
#
# Unlike ../shared/gpu/bundle.sh, test and bench binaries of the same name
# (tests/decode.rs and benches/decode.rs) both travel, in separate folders.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
mkdir -p "$(git rev-parse --git-dir)/info"
grep -qx '/.gpu/' "$(git rev-parse --git-dir)/info/exclude" 2>/dev/null || echo '/.gpu/' >>"$(git rev-parse --git-dir)/info/exclude"
export FRUGAL_REQUIRE=${FRUGAL_REQUIRE:-nvcc}
stage=$(mktemp -d); mkdir -p "$stage/tests" "$stage/benches" "$stage/debs"
artifacts() {  # prints "name path" for each executable artifact of the given kind
  python3 -c '
import json, sys
for line in sys.stdin:
    try: m = json.loads(line)
    except ValueError: continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and sys.argv[1] in m["target"]["kind"]:
        print(m["target"]["name"], m["executable"])' "$1"
}
cargo test --release --features nccl --no-run --message-format=json | artifacts test \
  | while read -r n e; do cp "$e" "$stage/tests/$n"; done
cargo bench --features nccl --no-run --message-format=json | artifacts bench \
  | while read -r n e; do cp "$e" "$stage/benches/$n"; done
cargo build --release --features nccl --bin frugal-attn --example ring_nccl
cp target/release/frugal-attn target/release/examples/ring_nccl "$stage/"
strip "$stage"/tests/* "$stage"/benches/* "$stage/frugal-attn" "$stage/ring_nccl"
apt_dir=/tmp/gpu-apt-amd64; mkdir -p "$apt_dir/partial"
o="-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=$apt_dir"
# shellcheck disable=SC2086
apt-get $o update -qq >/dev/null
# shellcheck disable=SC2086
(cd "$stage/debs" && apt-get $o download -qq libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2 >/dev/null)
rm -rf .gpu; mkdir -p .gpu
tar -C "$stage" -cJf .gpu/bundle.tar.xz .
rm -rf "$stage"
git rev-parse HEAD >.gpu/commit.txt
du -h .gpu/bundle.tar.xz
