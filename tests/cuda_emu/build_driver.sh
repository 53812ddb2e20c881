#!/usr/bin/env bash
# Builds the emulated CUDA driver (driver.cpp): OUT/libcuda.so, whose kernels
# are kernels-cuda/*.cu compiled as host C++, and checks it (selftest.cpp). Usage:
#   tests/cuda_emu/build_driver.sh CUDA_INCLUDE_DIR OUT_DIR
# then run the CUDA tests with LD_LIBRARY_PATH=OUT_DIR (cudarc loads libcuda.so).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
include="$1"
out="$2"
mkdir -p "$out"
cxx="${CXX:-c++}"
flags=(-std=c++20 -O2 -w -fPIC -I"$out" -I"$here" -I"$here/../../kernels-cuda" -I"$include")
# Up to date when built after every source here and in kernels-cuda/ changed (with the same compiler and headers).
stamp="$out/libcuda.so"
if [ -f "$stamp" ] && [ -f "$out/selftest" ] && [ -z "$(find "$here" "$here/../../kernels-cuda" -type f -newer "$stamp" | head -n 1)" ]; then
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
"$cxx" "${flags[@]}" -shared "$here/driver.cpp" "$here/kernels_static.cpp" "$here/kernels_extern.cpp" -o "$out/libcuda.so.new"
mv "$out/libcuda.so.new" "$out/libcuda.so"
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
mv "$out/selftest.new" "$out/selftest"  # last: a failed check rebuilds next time
