// The emulated driver's kernels from the files with `extern __shared__` memory.
#define FRUGAL_EMU_EXTERN_SHARED
#include "emu.h"
// The kernel file, compiled as host code.
#include "../../kernels-cuda/blockwise.cu"

namespace frugal_bw {
// The kernels' `extern __shared__` arrays (blocks run one at a time).
alignas(1024) unsigned char bw_mma_smem[kEmuSmemBytes];
alignas(16) float smem[1 << 16];
}  // namespace frugal_bw

#ifndef FRUGAL_EMU_LISTING  // build_driver.sh lists the kernel names from the preprocessed file first
#include "emu_registry.h"

namespace frugal_emu {
const Kernel* table_extern_shared() {
    auto* mma = frugal_bw::bw_mma_smem;
    auto* fma = reinterpret_cast<unsigned char*>(frugal_bw::smem);
#define FRUGAL_EMU_KERNEL(NAME)                                                                 \
    Kernel{#NAME, thunk<&NAME>, std::strstr(#NAME, "mma_") ? mma : fma,                        \
           std::strstr(#NAME, "mma_") ? sizeof frugal_bw::bw_mma_smem : sizeof frugal_bw::smem, true},
    static const Kernel table[] = {
#include "kernels_extern.inc"
        Kernel{}};
#undef FRUGAL_EMU_KERNEL
    return table;
}
}  // namespace frugal_emu
#endif
