#!/usr/bin/env bash
# One GPU-machine call, from the repository root with `.gpu/` carried (built here by
# `scripts/gpu_bundle.sh`, see BENCHMARKS.md):
#
#   bash scripts/gpu_session.sh all              tests, then benches, then criterion, in one call
#   bash scripts/gpu_session.sh tests [FILTER]   every test binary, CUDA and wgpu required
#   bash scripts/gpu_session.sh bench            CLI benches at the issues' shapes + PyTorch
#   bash scripts/gpu_session.sh criterion [F]    the criterion benches, short
#
# Everything lands under $OUT (tests.log, bench.jsonl, torch.jsonl, criterion.log,
# gpu.txt, skipped.log); a short summary is printed last. Every command has its own
# timeout so one slow kernel cannot eat the call, and the whole call keeps inside
# BUDGET seconds (default 540: a device call may run 600, and a task's device time
# may be 15 minutes in all, machine start included): a command that would start with
# under 15 s left is skipped and named in skipped.log.
set -uo pipefail
mode=${1:-tests}; filter=${2:-}
out=${OUT:-/tmp/gpu-out}; mkdir -p "$out"; : >"$out/skipped.log"
t_end=$((SECONDS + ${BUDGET:-540}))
# `run_to N CMD...`: CMD under a timeout of N seconds, or of what is left of the budget.
run_to() {
  local n=$1 left=$((t_end - SECONDS)); shift
  if [ "$left" -lt 15 ]; then echo "SKIPPED (budget spent): $*" | tee -a "$out/skipped.log"; return 124; fi
  [ "$n" -gt "$left" ] && n=$left
  timeout "$n" "$@"
}
b=/tmp/gpu-bundle
if [ ! -d "$b/tests" ]; then
  rm -rf "$b"; mkdir -p "$b"; tar -C "$b" -xJf .gpu/bundle.tar.xz
  if ls "$b"/debs/*.deb >/dev/null 2>&1; then
    for f in "$b"/debs/*.deb; do dpkg -x "$f" /; done; ldconfig
  fi
fi
export VK_DRIVER_FILES=${VK_DRIVER_FILES:-/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json}
export __EGL_VENDOR_LIBRARY_FILENAMES=${__EGL_VENDOR_LIBRARY_FILENAMES:-/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json}
# NCCL comes with PyTorch's wheel as libnccl.so.2; cudarc looks for libnccl.so.
nccl=$(python3 -c 'import nvidia.nccl as m; print(list(m.__path__)[0])' 2>/dev/null)/lib
if [ -e "$nccl/libnccl.so.2" ]; then
  mkdir -p /tmp/nccl-lib; ln -sf "$nccl/libnccl.so.2" /tmp/nccl-lib/libnccl.so
  export LD_LIBRARY_PATH=/tmp/nccl-lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
fi
export FRUGAL_REQUIRE=cuda,wgpu WGPU_BACKEND=vulkan
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
cp .gpu/commit.txt "$out/" 2>/dev/null; echo "bundle of commit $(cat .gpu/commit.txt 2>/dev/null)"
fa="$b/frugal-attn"

do_tests() {
  : >"$out/tests.log"
  for t in "$b"/tests/*; do
    echo "== test $(basename "$t")" | tee -a "$out/tests.log"
    run_to "$per_test" "$t" --test-threads=4 ${filter:+"$filter"} >>"$out/tests.log" 2>&1
    rc=$?; echo "exit $rc" | tee -a "$out/tests.log"
    # The Hopper (wgmma) kernels have never run on silicon: when blockwise or ring fails,
    # run it again on the mma.sync kernels to tell a wgmma fault from the rest.
    if [ "$rc" != 0 ] && { [ "$(basename "$t")" = blockwise ] || [ "$(basename "$t")" = ring ]; }; then
      echo "== test $(basename "$t") again, FRUGAL_CUDA_NO_WGMMA=1" | tee -a "$out/tests.log"
      run_to "$per_test" env FRUGAL_CUDA_NO_WGMMA=1 "$t" --test-threads=4 ${filter:+"$filter"} >>"$out/tests.log" 2>&1
      echo "exit $?" | tee -a "$out/tests.log"
    fi
  done
  if [ -x "$b/ring_nccl" ]; then
    echo "== example ring_nccl, 1 rank" | tee -a "$out/tests.log"
    rm -f /tmp/ring.id; run_to 120 "$b/ring_nccl" 0 1 /tmp/ring.id >>"$out/tests.log" 2>&1
    echo "exit $?" | tee -a "$out/tests.log"
  fi
  echo "== report (cargo run --release)" | tee -a "$out/tests.log"
  run_to 120 "$fa" >"$out/report.txt" 2>&1; echo "exit $?" | tee -a "$out/tests.log"
  grep -E "^test .*(FAILED|panicked)|^failures:|test result|SKIPPED" "$out/tests.log" | sort | uniq -c | sort -rn | head -40
  grep -B2 -A12 "panicked" "$out/tests.log" | head -150
  tail -40 "$out/report.txt"
}
do_bench() {
  j="$out/bench.jsonl"; t="$out/torch.jsonl"; : >"$j"; : >"$t"
  py() { PYTHONUNBUFFERED=1 run_to 120 python3 scripts/torch_baselines.py "$@" >>"$t" 2>>"$out/bench.err"; }
  fb() { run_to 150 "$fa" bench "$@" --json >>"$j" 2>>"$out/bench.err" || echo "FAILED: bench $*" | tee -a "$out/bench.err"; }
  py copy
  d="--batch 16 --q-heads 32 --kv-heads 8 --seq 16384 --head-dim 128"
  for be in cuda wgpu; do fb decode --backend $be $d --dtype f16; done
  fb decode --backend cuda $d --dtype bf16; fb decode --backend cuda $d --dtype f32
  fb decode --backend cuda --batch 1 --q-heads 32 --kv-heads 8 --seq 65536 --dtype f16
  py decode $d --dtype f16
  fb topk --backend cuda --rows 64 --seq 131072 --k 8192 --dtype f32
  py topk --rows 64 --n 131072 --k 8192 --dtype f32
  for s in 65536 4096; do
    bb=16; [ $s = 4096 ] && bb=1
    a="--batch $bb --q-heads 32 --kv-heads 8 --seq $s --head-dim 128 --dtype f16"
    fb sparq --backend cuda $a --r 16 --k $((s / 16)); fb decode --backend cuda $a
    py sparq $a --r 16 --k $((s / 16))
  done
  fb crosslayer --backend cuda $d --dtype f16
  w="--batch 1 --q-heads 32 --kv-heads 32 --seq 8192 --head-dim 128 --dtype bf16"
  fb blockwise --backend cuda $w; fb blockwise --backend cuda $w --causal
  fb blockwise --backend cuda $w --backward; fb blockwise --backend cuda $w --causal --backward
  # The same forwards on the mma.sync kernel (the wgmma one stands aside), into their own file.
  for c in "" --causal; do
    run_to 150 env FRUGAL_CUDA_NO_WGMMA=1 "$fa" bench blockwise --backend cuda $w $c --json >>"$out/bench-mma.jsonl" 2>>"$out/bench.err"
  done
  py blockwise $w
  r="--batch 1 --q-heads 16 --kv-heads 4 --head-dim 128 --dtype bf16 --causal --layout zigzag"
  fb ring --backend cuda $r --ranks 8 --seq 65536 --backward
  fb blockwise --backend cuda --batch 1 --q-heads 16 --kv-heads 4 --head-dim 128 --dtype bf16 --seq 65536 --causal --backward
  python3 - "$j" "$t" "$out/bench-mma.jsonl" <<'PY'
import json, sys
for path in sys.argv[1:]:
    if path.endswith("bench-mma.jsonl"): print("-- with FRUGAL_CUDA_NO_WGMMA=1 (mma.sync forward):")
    for line in open(path):
        try: r = json.loads(line)
        except ValueError: continue
        c = r.get("case"); c = c if isinstance(c, str) else json.dumps(c, separators=(",", ":"))[:110]
        tf = r.get("tflops"); tf = f" {tf:.1f} TFLOP/s" if tf else ""
        print(f'{r["technique"]:>10} {r["backend"]:>6} {r["seconds"]*1e3:10.4f} ms {r["gbps"]:8.1f} GB/s{tf}  {c}')
PY
  tail -5 "$out/bench.err"
}
do_criterion() {
  : >"$out/criterion.log"
  for t in "$b"/benches/*; do
    echo "== bench $(basename "$t")" | tee -a "$out/criterion.log"
    run_to 200 "$t" --bench --warm-up-time 1 --measurement-time 2 ${filter:+"$filter"} >>"$out/criterion.log" 2>&1
  done
  grep -E "^[a-z].*/|time:|thrpt:" "$out/criterion.log" | tail -80
}

per_test=150
case "$mode" in
all)
  # Tests get at most half the budget (90 s per binary), so the benches still run when a kernel hangs.
  per_test=90; t_all=$t_end; t_end=$((SECONDS + (t_end - SECONDS) / 2))
  do_tests; t_end=$t_all
  do_bench; do_criterion
  ;;
tests) do_tests ;;
bench) do_bench ;;
criterion) do_criterion ;;
*) echo "usage: $0 all|tests [FILTER]|bench|criterion [FILTER]" >&2; exit 2 ;;
esac
[ -s "$out/skipped.log" ] && { echo "-- skipped for the budget:"; cat "$out/skipped.log"; }
true
