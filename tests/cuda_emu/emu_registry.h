// The kernel tables of the emulated driver (driver.cpp): every `extern "C"`
// kernel of kernels-cuda/*.cu by name, with a thunk that unpacks cuLaunchKernel's
// parameter array into the kernel's own parameter types.
#pragma once

#include "emu.h"

#include <cstddef>
#include <type_traits>
#include <utility>

namespace frugal_emu {

struct Kernel {
    const char* name;
    void (*launch)(const Kernel&, emu::Dim grid, emu::Dim block, unsigned smem_bytes, void** params);
    unsigned char* smem;      // the file's `extern __shared__` buffer, or null
    size_t max_dynamic_smem;  // its size (0: the kernel uses static shared memory only)
    bool extern_smem;
};

// Kernels whose files use static __shared__ arrays (decode, crosslayer, sparq, topk).
const Kernel* table_static_shared();
// Kernels whose files use `extern __shared__` (blockwise).
const Kernel* table_extern_shared();

template <typename... A, size_t... I>
void call(void (*fn)(A...), void** p, std::index_sequence<I...>) {
    fn(*static_cast<std::remove_cv_t<std::remove_reference_t<A>>*>(p[I])...);
}

template <typename... A>
constexpr size_t arity(void (*)(A...)) {
    return sizeof...(A);
}

template <auto F>
void thunk(const Kernel& k, emu::Dim grid, emu::Dim block, unsigned smem_bytes, void** params) {
    emu::launch(grid, block, k.smem, k.smem ? smem_bytes : 0,
                [params] { call(F, params, std::make_index_sequence<arity(F)>()); });
}

}  // namespace frugal_emu
