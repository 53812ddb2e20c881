// The kernel tables of the emulated driver (driver.cpp): every `extern "C"`
// kernel of kernels-cuda/*.cu by name, with a thunk that copies cuLaunchKernel's
// parameter values (the `void** params` pointers are valid only during that
// call) into the kernel's own parameter types and returns the launch to run
// later, when the driver executes the stream's queued work, with the pointer
// arguments (for the driver's race check).
#pragma once

#include "emu.h"

#include <cstddef>
#include <cstdint>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace frugal_emu {

struct Kernel;
// The launch with its arguments captured by value, ready to run.
using Launch = std::function<void()>;
// A pointer argument: the address, and whether the kernel may write through it (not `const T*`).
struct PointerArg {
    uintptr_t address;
    bool write;
};
struct Prepared {
    Launch run;
    std::vector<PointerArg> pointers;
};

struct Kernel {
    const char* name;
    Prepared (*prepare)(const Kernel&, emu::Dim grid, emu::Dim block, unsigned smem_bytes, void** params);
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

template <typename P>
void note_pointer(const P& x, std::vector<PointerArg>& out) {
    if constexpr (std::is_pointer_v<P>)
        out.push_back({reinterpret_cast<uintptr_t>(x), !std::is_const_v<std::remove_pointer_t<P>>});
}

template <auto F>
Prepared thunk(const Kernel& k, emu::Dim grid, emu::Dim block, unsigned smem_bytes, void** params) {
    auto args = capture(F, params, std::make_index_sequence<arity(F)>());
    Prepared prepared;
    std::apply([&](const auto&... a) { (note_pointer(a, prepared.pointers), ...); }, args);
    const Kernel* kp = &k;
    prepared.run = [kp, grid, block, smem_bytes, args] {
        emu::launch(grid, block, kp->smem, kp->smem ? smem_bytes : 0, [&args] { std::apply(F, args); });
    };
    return prepared;
}

}  // namespace frugal_emu
