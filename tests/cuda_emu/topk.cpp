// kernels-cuda/topk.cu on the CPU emulator (emu.h) against a sort: rows of
// every alignment (the kernel reads aligned 16-byte vectors with partial ends),
// lengths around the vector and tile sizes, ties (lowest index wins), -0/+0,
// infinities and NaNs (below everything). Grid as in src/topk/cuda.rs.
// Prints one line per case; exit 1 on a mismatch.
#include "emu.h"
// The kernel file, compiled as host code.
#include "../../kernels-cuda/topk.cu"

#include <algorithm>
#include <random>
#include <string>

namespace {

int failures = 0;

template <typename T>
unsigned bits(T x) {
    if constexpr (sizeof(T) == 4) {
        unsigned u;
        std::memcpy(&u, &x, 4);
        return u;
    } else {
        unsigned short u;
        std::memcpy(&u, &x, 2);
        return u;
    }
}

template <typename T>
bool before(T a, size_t ia, T b, size_t ib) {
    const double da = frugal::to_float(a), db = frugal::to_float(b);
    const bool na = std::isnan(da), nb = std::isnan(db);
    if (na != nb) return nb;  // a number ranks above NaN
    if (!na && da != db) return da > db;
    return ia < ib;
}

// Values: a mix of a small alphabet (ties), signed zeros, infinities, NaNs.
template <typename T>
std::vector<T> make_row(size_t n, int flavour, std::mt19937& rng) {
    std::vector<T> r(n);
    std::uniform_real_distribution<float> u(-100.f, 100.f);
    std::uniform_int_distribution<int> pick(0, 9);
    for (auto& x : r) {
        float f = flavour == 0 ? u(rng) : static_cast<float>(pick(rng) - 4);
        if (flavour == 2) {
            const int c = pick(rng);
            f = c == 0 ? NAN : c == 1 ? -0.f : c == 2 ? 0.f : c == 3 ? INFINITY : c == 4 ? -INFINITY : f;
        }
        x = frugal::from_float<T>(f);
    }
    return r;
}

template <typename T>
void run(const char* dt, size_t n, int k, int rows, int offset, int flavour, unsigned seed) {
    std::mt19937 rng(seed);
    const long long stride = static_cast<long long>(n) + offset;  // also misaligns rows after the first
    std::vector<T> buf(offset + rows * stride + 16);
    T* x = buf.data() + offset;
    for (int r = 0; r < rows; ++r) {
        auto row = make_row<T>(n, flavour, rng);
        std::copy(row.begin(), row.end(), x + r * stride);
    }
    std::vector<unsigned> idx((size_t)rows * k, 0xffffffffu);
    std::vector<T> val((size_t)rows * k);
    TopkParams p{stride, rows, static_cast<int>(n), k, 0};
    using Fn = void (*)(const T*, unsigned*, T*, TopkParams);
    Fn fn;
    if constexpr (std::is_same_v<T, float>) fn = topk_f32;
    if constexpr (std::is_same_v<T, __half>) fn = topk_f16;
    if constexpr (std::is_same_v<T, __nv_bfloat16>) fn = topk_bf16;
    emu::launch({(unsigned)rows}, {FRUGAL_TOPK_THREADS}, nullptr, 0, fn, x, idx.data(), val.data(), p);
    bool ok = true;
    for (int r = 0; r < rows && ok; ++r) {
        const T* row = x + r * stride;
        std::vector<size_t> order(n);
        for (size_t i = 0; i < n; ++i) order[i] = i;
        std::stable_sort(order.begin(), order.end(),
                         [&](size_t a, size_t b) { return before(row[a], a, row[b], b); });
        std::vector<size_t> want(order.begin(), order.begin() + k);
        std::sort(want.begin(), want.end());
        for (int j = 0; j < k; ++j) {
            const unsigned got = idx[(size_t)r * k + j];
            if (got != want[j] || bits(val[(size_t)r * k + j]) != bits(row[want[j]])) ok = false;
        }
    }
    std::printf("%s topk %s n%zu k%d rows%d offset%d flavour%d\n", ok ? "ok  " : "FAIL", dt, n, k, rows, offset,
                flavour);
    if (!ok) ++failures;
}

template <typename T>
void all(const char* dt, unsigned& seed) {
    const std::vector<std::pair<size_t, int>> nk = {{1, 1}, {7, 3}, {8, 8}, {100, 10}, {1000, 999}, {9000, 64}};
    for (auto [n, k] : nk)
        for (int offset : {0, 1, 3}) run<T>(dt, n, k, n > 1000 ? 1 : 2, offset, static_cast<int>(seed % 3), seed++);
}

}  // namespace

int main() {
    unsigned seed = 1;
    all<float>("f32", seed);
    all<__half>("f16", seed);
    all<__nv_bfloat16>("bf16", seed);
    std::printf("%d failure(s)\n", failures);
    return failures ? 1 : 0;
}
