// The emulated driver's kernels from the files with static __shared__ arrays.
#include "emu.h"
// The kernel files, compiled as host code.
#include "../../kernels-cuda/crosslayer.cu"
#include "../../kernels-cuda/decode.cu"
#include "../../kernels-cuda/sparq.cu"
#include "../../kernels-cuda/topk.cu"

#ifndef FRUGAL_EMU_LISTING  // build_driver.sh lists the kernel names from the preprocessed file first
#include "emu_registry.h"

namespace frugal_emu {
const Kernel* table_static_shared() {
#define FRUGAL_EMU_KERNEL(NAME) Kernel{#NAME, thunk<&NAME>, nullptr, 0, false},
    static const Kernel table[] = {
#include "kernels_static.inc"
        Kernel{}};
#undef FRUGAL_EMU_KERNEL
    return table;
}
}  // namespace frugal_emu
#endif
