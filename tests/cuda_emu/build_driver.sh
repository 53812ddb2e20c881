#!/usr/bin/env bash
# Builds the emulated CUDA driver (driver.cpp): OUT/libcuda.so, whose kernels
# are kernels-cuda/*.cu compiled as host C++, and the emulated NCCL over it
# (nccl.cpp): OUT/libnccl.so, and checks both (selftest.cpp, nccl_selftest.cpp). Usage:
#   tests/cuda_emu/build_driver.sh CUDA_INCLUDE_DIR OUT_DIR
# then run the CUDA tests with LD_LIBRARY_PATH=OUT_DIR (cudarc loads libcuda.so,
# and libnccl.so with the crate's `nccl` feature).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
include="$1"
out="$2"
mkdir -p "$out"
cxx="${CXX:-c++}"
flags=(-std=c++20 -O2 -w -fPIC -I"$out" -I"$here" -I"$here/../../kernels-cuda" -I"$include")
# Up to date when built after every source here and in kernels-cuda/ changed (with the same compiler and headers).
stamp="$out/libcuda.so"
if [ -f "$stamp" ] && [ -f "$out/libnccl.so" ] && [ -f "$out/selftest" ] && [ -z "$(find "$here" "$here/../../kernels-cuda" -type f -newer "$stamp" | head -n 1)" ]; then
  echo "cuda emulator: $stamp is up to date"
  exit 0
fi
# The kernel names, from the preprocessed files (the kernels are defined through macros).
for tu in static extern; do
  "$cxx" "${flags[@]}" -E -P -DFRUGAL_EMU_LISTING "$here/kernels_$tu.cpp" | tr "\n" " " \
    | grep -oE 'extern "C" +void +(bw|decode|xl|sparq|topk)_[A-Za-z0-9_]+ *\(' \
    | sed -E 's/extern "C" +void +([A-Za-z0-9_]+) *\(/FRUGAL_EMU_KERNEL(\1)/' | sort -u > "$out/kernels_$tu.inc"
done
rm -f "$out/selftest"
"$cxx" "${flags[@]}" -shared -Wl,-soname,libcuda.so "$here/driver.cpp" "$here/kernels_static.cpp" "$here/kernels_extern.cpp" \
  -o "$out/libcuda.so.new"
mv "$out/libcuda.so.new" "$out/libcuda.so"
# libnccl.so calls the driver's transfer hooks (nccl_emu.h): it needs the libcuda.so beside it,
# which is the one cudarc has loaded already.
"$cxx" "${flags[@]}" -shared -Wl,-soname,libnccl.so "$here/nccl.cpp" -L"$out" -lcuda -Wl,-rpath,'$ORIGIN' -pthread \
  -o "$out/libnccl.so.new"
mv "$out/libnccl.so.new" "$out/libnccl.so"
wc -l "$out"/kernels_*.inc | tail -n 1
# The driver's own rules (streams, events, launch limits), at both schedules and compute capabilities.
"$cxx" "${flags[@]}" "$here/selftest.cpp" -L"$out" -lcuda -Wl,-rpath,"$out" -o "$out/selftest.new"
for schedule in lazy eager; do
  for cc in 80 90; do
    FRUGAL_EMU_SCHEDULE=$schedule FRUGAL_EMU_CC=$cc FRUGAL_EMU_RACES=off "$out/selftest.new"
  done
done
# And the race check: an unordered write and read must abort, naming the race.
if race="$("$out/selftest.new" race 2>&1)"; then
  echo "$race" >&2
  echo "cuda emulator selftest: FAILED: an unordered write and read went unreported" >&2
  exit 1
elif ! grep -q "the next operation races" <<<"$race" || ! grep -q "cuda emulator: race: stream" <<<"$race"; then
  echo "$race" >&2
  echo "cuda emulator selftest: FAILED: the race check did not name the race" >&2
  exit 1
fi
echo "cuda emulator selftest: ok (race check)"
# The emulated NCCL: the ring pattern at both schedules, then each misuse must abort naming it.
"$cxx" "${flags[@]}" "$here/nccl_selftest.cpp" -L"$out" -lnccl -lcuda -Wl,-rpath,"$out" -pthread -o "$out/nccl_selftest"
for schedule in lazy eager; do
  FRUGAL_EMU_SCHEDULE=$schedule "$out/nccl_selftest"
done
for mode in mismatch:"mismatched transfer" deadlock:"nccl: deadlock" left:"destroyed or aborted its communicator" race:"cuda emulator: race: stream"; do
  if log="$(FRUGAL_EMU_NCCL_TIMEOUT=60 "$out/nccl_selftest" "${mode%%:*}" 2>&1)" || ! grep -q "${mode#*:}" <<<"$log"; then
    echo "$log" >&2
    echo "nccl emulator selftest: FAILED: ${mode%%:*} was not reported as '${mode#*:}'" >&2
    exit 1
  fi
done
echo "nccl emulator selftest: ok (mismatch, deadlock, a peer that left, race)"
mv "$out/selftest.new" "$out/selftest"  # last: a failed check rebuilds next time
