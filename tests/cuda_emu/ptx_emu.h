// The inline-PTX wrappers of kernels-cuda/blockwise.cu, emulated on the host
// (see emu.h). Included by blockwise.cu inside its namespace when
// FRUGAL_CUDA_EMU is defined. Fragment layouts follow the PTX ISA's
// "Matrix Fragments for mma.m16n8k16" (f16/bf16) and ldmatrix sections.
#pragma once

// cp.async: copies queue per thread (emu::CpAsyncQueue) and land at the
// cp.async.wait_group that covers their group, so reading a stage before its
// wait sees stale data.
inline void emu_require(bool ok, const char* what) {
    if (!ok) {
        std::fprintf(stderr, "cuda emulator: %s\n", what);
        std::abort();
    }
}

inline void cp_async16(void* dst, const void* src) {
    emu_require(reinterpret_cast<uintptr_t>(dst) % 16 == 0, "cp.async: shared address not 16-byte aligned");
    emu_require(reinterpret_cast<uintptr_t>(src) % 16 == 0, "cp.async: global address not 16-byte aligned");
    emu::ctx.cp->open.emplace_back(dst, src);
}
inline void cp_async_commit() {
    auto& q = *emu::ctx.cp;
    q.groups.push_back(std::move(q.open));
    q.open.clear();
}
template <int N>
inline void cp_async_wait() {
    auto& q = *emu::ctx.cp;
    while (static_cast<int>(q.groups.size()) > N) {
        for (auto& [d, s] : q.groups.front()) std::memcpy(d, s, 16);
        q.groups.erase(q.groups.begin());
    }
}

// ldmatrix .x4: lanes 8m..8m+7 give the row addresses of 8x8 matrix m; lane
// l receives, in register m, row l/4, columns 2(l%4) and 2(l%4)+1 of matrix m
// (.trans: rows 2(l%4) and 2(l%4)+1 of column l/4), the lower column/row in
// the low half.
inline void emu_ldmatrix_x4(unsigned (&r)[4], const void* row, bool trans) {
    auto& w = *emu::ctx.warp;
    const int lane = emu::ctx.lane;
    emu_require(reinterpret_cast<uintptr_t>(row) % 16 == 0, "ldmatrix: row address not 16-byte aligned");
    w.p[lane] = row;
    emu::warp_sync();
    for (int m = 0; m < 4; ++m) {
        uint16_t lo, hi;
        if (!trans) {
            const auto* base = static_cast<const uint16_t*>(w.p[8 * m + lane / 4]);
            lo = base[2 * (lane % 4)];
            hi = base[2 * (lane % 4) + 1];
        } else {
            lo = static_cast<const uint16_t*>(w.p[8 * m + 2 * (lane % 4)])[lane / 4];
            hi = static_cast<const uint16_t*>(w.p[8 * m + 2 * (lane % 4) + 1])[lane / 4];
        }
        r[m] = static_cast<unsigned>(lo) | (static_cast<unsigned>(hi) << 16);
    }
    emu::warp_sync();
}
inline void ldmatrix_x4(unsigned (&r)[4], const void* row) { emu_ldmatrix_x4(r, row, false); }
inline void ldmatrix_x4_trans(unsigned (&r)[4], const void* row) { emu_ldmatrix_x4(r, row, true); }

template <typename T>
inline float emu_b16_to_float(uint16_t h);
template <>
inline float emu_b16_to_float<__half>(uint16_t h) {
    return __half2float(__ushort_as_half(h));
}
template <>
inline float emu_b16_to_float<__nv_bfloat16>(uint16_t h) {
    return __uint_as_float(static_cast<unsigned>(h) << 16);
}

// mma.m16n8k16 .row.col f32 += T x T, with groupID g = lane/4, t = lane%4:
//   A (16x16): a0 = rows g, cols 2t..2t+1; a1 = rows g+8, same cols;
//              a2 = rows g, cols 2t+8..2t+9; a3 = rows g+8, cols 2t+8..2t+9.
//   B (16x8, k x n): b0 = k 2t..2t+1, n g; b1 = k 2t+8..2t+9, n g.
//   C (16x8): c0, c1 = row g, cols 2t, 2t+1; c2, c3 = row g+8, cols 2t, 2t+1.
template <typename T>
inline void mma_16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    auto& w = *emu::ctx.warp;
    const int lane = emu::ctx.lane;
    for (int i = 0; i < 4; ++i) w.u[lane][i] = a[i];
    w.u[lane][4] = b0;
    w.u[lane][5] = b1;
    emu::warp_sync();
    auto half_of = [](uint32_t x, int k) { return static_cast<uint16_t>(k & 1 ? x >> 16 : x & 0xffffu); };
    auto A = [&](int r, int k) {
        const uint32_t x = w.u[(r & 7) * 4 + (k & 7) / 2][(r >> 3) + 2 * (k >> 3)];
        return emu_b16_to_float<T>(half_of(x, k));
    };
    auto B = [&](int k, int n) {
        const uint32_t x = w.u[n * 4 + (k & 7) / 2][4 + (k >> 3)];
        return emu_b16_to_float<T>(half_of(x, k));
    };
    float d[4];
    for (int e = 0; e < 4; ++e) {
        const int r = lane / 4 + 8 * (e >> 1), n = 2 * (lane % 4) + (e & 1);
        double s = c[e];
        for (int k = 0; k < 16; ++k) s += static_cast<double>(A(r, k)) * B(k, n);
        d[e] = static_cast<float>(s);
    }
    emu::warp_sync();
    for (int e = 0; e < 4; ++e) c[e] = d[e];
}

inline float fast_exp2(float x) { return std::exp2(x); }
