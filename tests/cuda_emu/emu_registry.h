// The kernel tables of the emulated driver (driver.cpp): every `extern "C"`
// kernel of kernels-cuda/*.cu by name, with a thunk that copies cuLaunchKernel's
// parameter values (the `void** params` pointers are valid only during that
// call) into the kernel's own parameter types and returns the launch to run
// later, when the driver executes the stream's queued work.
#pragma once

#include "emu.h"

#include <cstddef>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

namespace frugal_emu {

struct Kernel;
// The launch with its arguments captured by value, ready to run.
using Launch = std::function<void()>;

struct Kernel {
    const char* name;
    Launch (*prepare)(const Kernel&, emu::Dim grid, emu::Dim block, unsigned smem_bytes, void** params);
    unsigned char* smem;      // the file's `extern __shared__` buffer, or null
    size_t max_dynamic_smem;  // its size (0: the kernel uses static shared memory only)
    bool extern_smem;
};

// Kernels whose files use static __shared__ arrays (decode, crosslayer, sparq, topk).
const Kernel* table_static_shared();
// Kernels whose files use `extern __shared__` (blockwise).
const Kernel* table_extern_shared();

template <typename T>
using Param = std::remove_cv_t<std::remove_reference_t<T>>;

// The values behind cuLaunchKernel's parameter pointers, as the kernel's parameter types.
template <typename... A, size_t... I>
std::tuple<Param<A>...> capture(void (*)(A...), void** p, std::index_sequence<I...>) {
    return std::tuple<Param<A>...>(*static_cast<const Param<A>*>(p[I])...);
}

template <typename... A>
constexpr size_t arity(void (*)(A...)) {
    return sizeof...(A);
}

template <auto F>
Launch thunk(const Kernel& k, emu::Dim grid, emu::Dim block, unsigned smem_bytes, void** params) {
    auto args = capture(F, params, std::make_index_sequence<arity(F)>());
    const Kernel* kp = &k;
    return [kp, grid, block, smem_bytes, args] {
        emu::launch(grid, block, kp->smem, kp->smem ? smem_bytes : 0, [&args] { std::apply(F, args); });
    };
}

}  // namespace frugal_emu
