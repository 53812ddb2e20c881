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

// ---------------------------------------------------------------------------
// wgmma (sm_90a), emulated per thread: each thread computes its own
// accumulators. mma_async queues the operation (A fragments from registers are
// gathered from the quad at issue, as the hardware reads them); commit_group
// closes a group; wait_group N runs the oldest groups until N remain, reading
// shared memory then. So accumulators read before the wait, or shared memory
// overwritten before it, give wrong results here as on the GPU.
// Shared addresses are offsets into the emulated dynamic shared memory
// (kernels_extern.cpp's bw_mma_smem), which the descriptors encode.

constexpr size_t kEmuSmemBytes = size_t(1) << 18;
extern unsigned char bw_mma_smem[];
inline unsigned smem_u32(const void* p) {
    const auto off = static_cast<const unsigned char*>(p) - bw_mma_smem;
    emu_require(off >= 0 && static_cast<size_t>(off) < kEmuSmemBytes, "smem_u32: not a shared-memory address");
    return static_cast<unsigned>(off);
}
inline void fence_proxy_async() {}
inline void wgmma_fence() {}
template <typename A>
inline void wgmma_hold(A&) {}

struct EmuWgmmaOp {
    float* d = nullptr;  // [n / 8][4]
    int n = 0;
    bool bf16 = false;
    bool a_regs = false;  // A from registers (else K-major in shared memory at desc_a)
    uint32_t a[4][4] = {};  // the quad's A registers: a[tig][reg]
    const unsigned* a_own = nullptr;  // this thread's A registers, which must not change before the wait
    uint32_t a_issued[4] = {};
    std::vector<float> d_issued;  // d at issue, which no other instruction may change before the wait
    uint64_t desc_a = 0, desc_b = 0;
    bool b_nmajor = false;
    bool scale_d = true;
};
struct EmuWgmmaThread {
    std::vector<EmuWgmmaOp> open;
    std::vector<std::vector<EmuWgmmaOp>> groups;
    emu::Dim block;
};
inline EmuWgmmaThread emu_wgmma_threads[1024];

inline unsigned emu_linear_tid() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }

inline EmuWgmmaThread& emu_wgmma_self();

// Queues `op`; the first pending operation on an accumulator records it, so a
// change by other instructions before the wait is reported when it runs.
inline void emu_wgmma_issue(EmuWgmmaOp op) {
    auto& s = emu_wgmma_self();
    bool pending = false;
    for (const auto& g : s.groups)
        for (const auto& x : g) pending |= x.d == op.d;
    for (const auto& x : s.open) pending |= x.d == op.d;
    if (!pending) op.d_issued.assign(op.d, op.d + op.n / 2);
    s.open.push_back(std::move(op));
}

inline EmuWgmmaThread& emu_wgmma_self() {
    auto& s = emu_wgmma_threads[emu_linear_tid()];
    const bool same = s.block.x == blockIdx.x && s.block.y == blockIdx.y && s.block.z == blockIdx.z;
    emu_require(same || (s.open.empty() && s.groups.empty()), "wgmma: a thread exited with operations not waited for");
    s.block = blockIdx;
    return s;
}

// A 128-byte-swizzle descriptor's element at byte offset `off` from its start:
// the 16-byte chunk index (address bits 4-6) is XORed with bits 7-9.
inline float emu_wgmma_elem(uint64_t desc, unsigned off, bool bf16) {
    emu_require((desc >> 62) == 1, "wgmma: only the 128-byte swizzle is emulated");
    emu_require(((desc >> 49) & 7) == 0, "wgmma: base offset must be 0 (1024-byte aligned swizzle atoms)");
    const unsigned addr = (static_cast<unsigned>(desc & 0x3fff) << 4) + off;
    const unsigned phys = addr ^ (((addr >> 7) & 7u) << 4);
    emu_require(phys + 2 <= kEmuSmemBytes, "wgmma: shared address out of range");
    uint16_t h;
    std::memcpy(&h, bw_mma_smem + phys, 2);
    return bf16 ? emu_b16_to_float<__nv_bfloat16>(h) : emu_b16_to_float<__half>(h);
}
inline unsigned emu_desc_lead(uint64_t d) { return static_cast<unsigned>((d >> 16) & 0x3fff) << 4; }
inline unsigned emu_desc_stride(uint64_t d) { return static_cast<unsigned>((d >> 32) & 0x3fff) << 4; }

// K-major (row mn, k of 16): rows of 128 bytes, 8-row groups `stride` apart.
inline float emu_kmajor(uint64_t desc, int mn, int k, bool bf16) {
    return emu_wgmma_elem(desc, (mn / 8) * emu_desc_stride(desc) + (mn % 8) * 128 + 2 * k, bf16);
}
// N-major (k of 16, column n): 64-column blocks `lead` apart, 8-row groups of k `stride` apart.
inline float emu_nmajor(uint64_t desc, int k, int n, bool bf16) {
    return emu_wgmma_elem(desc, (n / 64) * emu_desc_lead(desc) + 2 * (n % 64) + (k % 8) * 128 + (k / 8) * emu_desc_stride(desc),
                          bf16);
}

inline void emu_wgmma_run(const EmuWgmmaOp& op) {
    for (int i = 0; op.a_own && i < 4; ++i)
        emu_require(op.a_own[i] == op.a_issued[i], "wgmma: an A register changed before the wgmma.wait_group covering it");
    const int tid = static_cast<int>(emu_linear_tid());
    const int warp = (tid >> 5) & 3, lane = tid & 31, grp = lane >> 2, tig = lane & 3;
    for (size_t i = 0; i < op.d_issued.size(); ++i)
        emu_require(std::memcmp(&op.d[i], &op.d_issued[i], 4) == 0,
                    "wgmma: an accumulator changed before the wgmma.wait_group covering it");
    for (int j = 0; j < op.n / 8; ++j)
        for (int e = 0; e < 4; ++e) {
            const int hi = e >> 1, col = 8 * j + 2 * tig + (e & 1);
            const int row = warp * 16 + grp + 8 * hi;  // in the warpgroup's 64
            double acc = op.scale_d ? op.d[4 * j + e] : 0.0;
            for (int k = 0; k < 16; ++k) {
                float a;
                if (op.a_regs) {
                    const uint32_t x = op.a[(k & 7) / 2][hi + 2 * (k >> 3)];
                    const auto h = static_cast<uint16_t>(k & 1 ? x >> 16 : x & 0xffffu);
                    a = op.bf16 ? emu_b16_to_float<__nv_bfloat16>(h) : emu_b16_to_float<__half>(h);
                } else {
                    a = emu_kmajor(op.desc_a, row, k, op.bf16);
                }
                const float b = op.b_nmajor ? emu_nmajor(op.desc_b, k, col, op.bf16) : emu_kmajor(op.desc_b, col, k, op.bf16);
                acc += static_cast<double>(a) * b;
            }
            op.d[4 * j + e] = static_cast<float>(acc);
        }
}

template <typename T, int N>
inline void wgmma_smem_kmajor(float (&d)[N / 8][4], uint64_t a, uint64_t b, int scale_d) {
    EmuWgmmaOp op;
    op.d = &d[0][0];
    op.n = N;
    op.bf16 = std::is_same_v<T, __nv_bfloat16>;
    op.desc_a = a;
    op.desc_b = b;
    op.scale_d = scale_d != 0;
    emu_wgmma_issue(std::move(op));
}
template <typename T, int N>
inline void wgmma_regs_nmajor(float (&d)[N / 8][4], const unsigned (&a)[4], uint64_t b) {
    auto& w = *emu::ctx.warp;
    const int lane = emu::ctx.lane;
    for (int i = 0; i < 4; ++i) w.u[lane][i] = a[i];
    emu::warp_sync();
    EmuWgmmaOp op;
    for (int t = 0; t < 4; ++t)
        for (int i = 0; i < 4; ++i) op.a[t][i] = w.u[(lane & ~3) + t][i];
    emu::warp_sync();
    op.d = &d[0][0];
    op.n = N;
    op.bf16 = std::is_same_v<T, __nv_bfloat16>;
    op.a_regs = true;
    op.desc_b = b;
    op.b_nmajor = true;
    op.a_own = a;
    for (int i = 0; i < 4; ++i) op.a_issued[i] = a[i];
    emu_wgmma_issue(std::move(op));
}
inline void wgmma_commit() {
    auto& s = emu_wgmma_self();
    s.groups.push_back(std::move(s.open));
    s.open.clear();
}
template <int N>
inline void wgmma_wait() {
    auto& s = emu_wgmma_self();
    while (static_cast<int>(s.groups.size()) > N) {
        for (const auto& op : s.groups.front()) emu_wgmma_run(op);
        s.groups.erase(s.groups.begin());
    }
}
