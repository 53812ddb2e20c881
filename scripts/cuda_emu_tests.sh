#!/usr/bin/env bash
# Runs every CUDA test on the CPU: builds the emulated libcuda
# (tests/cuda_emu/driver.cpp: kernels-cuda/*.cu compiled as host C++ over the
# fiber emulator) into target/cuda-emu and runs the `cuda` tests with it first
# on LD_LIBRARY_PATH, so cudarc drives the crate's real launchers on it.
# Extra arguments go to `cargo test` (e.g. --release; `--test blockwise` runs
# that file's cuda tests only, instead of every test file's; `--features nccl
# --test ring` adds the NCCL ring transport's test, on the emulated libnccl
# that tests/cuda_emu/nccl.cpp builds beside libcuda).
# The emulator's settings (tests/cuda_emu/driver.cpp, emu.h) come from the
# environment: FRUGAL_EMU_SCHEDULE=lazy|eager (streams deferred and
# adversarially ordered, the default, or run at issue), FRUGAL_EMU_CC=80|86|89|90
# (compute capability, default 90), FRUGAL_EMU_ORDER=forward|reverse|warps|
# warps-reverse (the order a block's threads run in between barriers: see
# emu.h), FRUGAL_EMU_TRACE=1|2 (print every kernel and NCCL copy / every queued
# operation as it runs), FRUGAL_EMU_NCCL_TIMEOUT (seconds a wait for NCCL work
# that no rank issued may last before it aborts; default 300).
set -euo pipefail
cd "$(dirname "$0")/.."
cuda_dir="${FRUGAL_CUDA_PIP_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/frugal-attn/cuda-13.0}"
nvcc="${NVCC:-$(command -v nvcc || echo "$cuda_dir/nvidia/cu13/bin/nvcc")}"
include="$(dirname "$nvcc")/../include"
[ -f "$include/cuda_fp16.h" ] || { echo "no CUDA headers at $include (set NVCC)" >&2; exit 1; }
out="$PWD/target/cuda-emu"
tests/cuda_emu/build_driver.sh "$include" "$out"
export LD_LIBRARY_PATH="$out${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export FRUGAL_REQUIRE="${FRUGAL_REQUIRE:-cuda,nvcc}"
targets=(--tests)
for arg in "$@"; do
  case "$arg" in --test | --test=*) targets=() ;; esac
done
echo "cuda emulator: schedule ${FRUGAL_EMU_SCHEDULE:-lazy}, compute capability ${FRUGAL_EMU_CC:-90}, thread order ${FRUGAL_EMU_ORDER:-forward}" >&2
cargo test ${targets[@]+"${targets[@]}"} "$@" cuda
