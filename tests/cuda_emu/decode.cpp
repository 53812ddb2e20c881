// kernels-cuda/decode.cu and crosslayer.cu on the CPU emulator (emu.h)
// against an f64 reference: dense split-KV decode (vector and scalar paths,
// head chunks, several split sizes, empty and over-long sequences), the
// cross-layer decode form over plain and ring slots with every mask and
// windows, and the cross-layer chunk kernel. Grids as in src/decode/cuda.rs
// and src/crosslayer/cuda.rs. Prints one line per case; exit 1 on a mismatch.
#include "emu.h"
// The kernel files, compiled as host code.
#include "../../kernels-cuda/crosslayer.cu"
#include "../../kernels-cuda/decode.cu"

#include <algorithm>
#include <random>
#include <string>

namespace {

int failures = 0;

void report(const std::string& what, double err, double tol) {
    const bool ok = err <= tol;
    std::printf("%s %-70s max err %.3g (tol %.3g)\n", ok ? "ok  " : "FAIL", what.c_str(), err, tol);
    if (!ok) ++failures;
}

template <typename T>
double to_d(T x) {
    return frugal::to_float(x);
}

template <typename T>
std::vector<T> random(size_t n, std::mt19937& rng) {
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    std::vector<T> v(n);
    for (auto& x : v) x = frugal::from_float<T>(u(rng));
    return v;
}

// NaN where want is NaN must be NaN; otherwise |got - want|.
template <typename T>
double max_err(const std::vector<T>& got, const std::vector<double>& want) {
    double e = 0;
    for (size_t i = 0; i < want.size(); ++i) {
        const double g = to_d(got[i]);
        if (std::isnan(want[i])) {
            if (!std::isnan(g)) e = INFINITY;
            continue;
        }
        const double d = std::fabs(g - want[i]);
        e = std::max(e, std::isnan(d) ? INFINITY : d);
    }
    return e;
}

template <typename T>
double tol() {
    return std::is_same_v<T, float> ? 2e-5 : std::is_same_v<T, __half> ? 2e-3 : 1.6e-2;
}

// One query row over the keys `visible(j)` of a [rows][D] K/V (row of key j: row_of(j)).
template <typename T, typename Vis, typename Row>
void attend_row(const T* q, const T* k, const T* v, long long k_st, long long v_st, int D, long long n, float scale,
                Vis visible, Row row_of, double* out) {
    std::vector<double> s;
    std::vector<long long> js;
    double mx = -INFINITY;
    for (long long j = 0; j < n; ++j) {
        if (!visible(j)) continue;
        const T* kr = k + row_of(j) * k_st;
        double d = 0;
        for (int x = 0; x < D; ++x) d += to_d(q[x]) * to_d(kr[x]);
        s.push_back(d * scale);
        js.push_back(j);
        mx = std::max(mx, d * scale);
    }
    for (int x = 0; x < D; ++x) out[x] = 0;
    if (js.empty()) return;
    double l = 0;
    for (auto& e : s) l += (e = std::exp(e - mx));
    for (size_t u = 0; u < js.size(); ++u) {
        const T* vr = v + row_of(js[u]) * v_st;
        for (int x = 0; x < D; ++x) out[x] += s[u] / l * to_d(vr[x]);
    }
}

struct Split {
    int chunk_len, num_splits;
};

template <typename T>
struct DecodeKernels {
    using Partial = void (*)(const T*, const T*, const T*, const unsigned*, float*, float*, DecodeParams);
    using Merge = void (*)(const float*, const float*, const unsigned*, T*, DecodeParams);
    using XlPartial = void (*)(const T*, const T*, const T*, const unsigned*, const unsigned*, float*, float*,
                               DecodeParams, XlKeyParams);
    using XlMerge = void (*)(const float*, const float*, const unsigned*, const unsigned*, T*, DecodeParams,
                             XlKeyParams);
    Partial partial[2][2];  // [d256][vec]
    Merge merge;
    XlPartial xl_partial[2][2][2];  // [ring][d256][vec]
    XlMerge xl_merge[2];
    void (*attend)(const T*, const T*, const T*, const unsigned*, const unsigned*, T*, XlAttnParams);
};

#define FRUGAL_EMU_DECODE(T, N)                                                                            \
    DecodeKernels<T> kernels_##N() {                                                                       \
        return {{{decode_partial_##N##_d128_scalar, decode_partial_##N##_d128_vec},                        \
                 {decode_partial_##N##_d256_scalar, decode_partial_##N##_d256_vec}},                       \
                decode_merge_##N,                                                                          \
                {{{xl_decode_partial_##N##_d128_scalar, xl_decode_partial_##N##_d128_vec},                 \
                  {xl_decode_partial_##N##_d256_scalar, xl_decode_partial_##N##_d256_vec}},                \
                 {{xl_decode_ring_partial_##N##_d128_scalar, xl_decode_ring_partial_##N##_d128_vec},       \
                  {xl_decode_ring_partial_##N##_d256_scalar, xl_decode_ring_partial_##N##_d256_vec}}},     \
                {xl_decode_merge_##N, xl_decode_ring_merge_##N},                                           \
                xl_attend_##N};                                                                            \
    }
FRUGAL_EMU_DECODE(float, f32)
FRUGAL_EMU_DECODE(__half, f16)
FRUGAL_EMU_DECODE(__nv_bfloat16, bf16)

template <typename T>
DecodeKernels<T> kernels();
template <>
DecodeKernels<float> kernels() {
    return kernels_f32();
}
template <>
DecodeKernels<__half> kernels() {
    return kernels_f16();
}
template <>
DecodeKernels<__nv_bfloat16> kernels() {
    return kernels_bf16();
}

struct Shape {
    int batch, q_heads, kv_heads, head_dim, capacity;
};

// K/V [B, Hkv, capacity, D] (row stride D + pad), q/o [B, Hq, D].
template <typename T>
DecodeParams decode_params(const Shape& s, int pad, Split sp) {
    DecodeParams p{};
    const long long row = s.head_dim + pad;
    p.q_stride_h = row;
    p.q_stride_b = row * s.q_heads;
    p.k_stride_s = p.v_stride_s = row;
    p.k_stride_h = p.v_stride_h = row * s.capacity;
    p.k_stride_b = p.v_stride_b = row * s.capacity * s.kv_heads;
    p.o_stride_h = s.head_dim;
    p.o_stride_b = (long long)s.head_dim * s.q_heads;
    p.batch = s.batch;
    p.q_heads = s.q_heads;
    p.kv_heads = s.kv_heads;
    p.head_dim = s.head_dim;
    p.capacity = s.capacity;
    p.chunk_len = sp.chunk_len;
    p.num_splits = sp.num_splits;
    p.scale = 1.f / std::sqrt((float)s.head_dim);
    return p;
}

std::string label(const char* kind, const char* dt, const Shape& s, int pad, Split sp, bool vec) {
    char b[200];
    std::snprintf(b, sizeof b, "%s %s B%d H%d/%d D%d cap%d pad%d chunk%d x%d %s", kind, dt, s.batch, s.q_heads,
                  s.kv_heads, s.head_dim, s.capacity, pad, sp.chunk_len, sp.num_splits, vec ? "vec" : "scalar");
    return b;
}

// Launches partial + merge of decode.cuh with the launcher's grids; the
// callables add the kernel arguments around the workspace pointers.
template <typename P, typename M>
void split_kv(const Shape& s, const DecodeParams& p, std::vector<float>& ws, P partial, M merge) {
    const int groups = s.q_heads / s.kv_heads;
    const int head_chunks = (groups + 7) / 8;
    const size_t rows = (size_t)s.batch * s.q_heads * p.num_splits;
    ws.assign(rows * (s.head_dim + 1), NAN);
    float* part_o = ws.data();
    float* part_lse = ws.data() + rows * s.head_dim;
    partial(emu::Dim{(unsigned)p.num_splits, (unsigned)(s.kv_heads * head_chunks), (unsigned)s.batch}, part_o,
            part_lse);
    merge(emu::Dim{(unsigned)s.q_heads, (unsigned)s.batch}, part_o, part_lse);
}

template <typename T>
void dense_case(const char* dt, const Shape& s, int pad, Split sp, std::vector<unsigned> lens, unsigned seed) {
    std::mt19937 rng(seed);
    const DecodeKernels<T> kn = kernels<T>();
    const int D = s.head_dim;
    const DecodeParams p = decode_params<T>(s, pad, sp);
    const auto q = random<T>((size_t)p.q_stride_b * s.batch, rng);
    const auto k = random<T>((size_t)p.k_stride_b * s.batch, rng);
    const auto v = random<T>((size_t)p.v_stride_b * s.batch, rng);
    std::vector<double> want((size_t)s.batch * s.q_heads * D);
    for (int b = 0; b < s.batch; ++b)
        for (int h = 0; h < s.q_heads; ++h) {
            double* out = want.data() + ((size_t)b * s.q_heads + h) * D;
            if (lens[b] > (unsigned)s.capacity) {
                std::fill(out, out + D, NAN);
                continue;
            }
            const long long kv = b * p.k_stride_b + (h / (s.q_heads / s.kv_heads)) * p.k_stride_h;
            attend_row(q.data() + b * p.q_stride_b + h * p.q_stride_h, k.data() + kv, v.data() + kv, p.k_stride_s,
                       p.v_stride_s, D, lens[b], p.scale, [](long long) { return true; },
                       [](long long j) { return j; }, out);
        }
    const int vec_elems = 8 / sizeof(T);
    for (int vec = 0; vec < 2; ++vec) {
        if (vec && (D % vec_elems || pad % vec_elems)) continue;
        std::vector<float> ws;
        std::vector<T> o(want.size(), frugal::from_float<T>(NAN));
        split_kv(
            s, p, ws,
            [&](emu::Dim g, float* po, float* pl) {
                emu::launch(g, {128}, nullptr, 0, kn.partial[D > 128][vec], q.data(), k.data(), v.data(),
                            lens.data(), po, pl, p);
            },
            [&](emu::Dim g, float* po, float* pl) {
                emu::launch(g, {128}, nullptr, 0, kn.merge, po, pl, lens.data(), o.data(), p);
            });
        report(label("decode", dt, s, pad, sp, vec), max_err(o, want), tol<T>());
    }
}

// The cross-layer key rule, written per key from DESIGN.md 4.5: position j of
// a slot holding [0, len) is seen by query position i under mask (0 causal
// j <= i, 1 strict j < i, 2 full), window w (i - w < j), and in a ring slot
// of `rows` rows only the last `rows` positions exist.
bool xl_visible(long long j, long long i, long long len, int mask, int window, bool ring, long long rows) {
    if (j >= len) return false;
    if (mask == 0 && j > i) return false;
    if (mask == 1 && j >= i) return false;
    if (window > 0 && j <= i - window) return false;
    if (ring && j < len - rows) return false;
    return true;
}

struct XlCase {
    int mask, window;
    bool ring;
    int rows, queries;
    std::vector<unsigned> lens, q_pos;
};

template <typename T>
void xl_case(const char* dt, const Shape& s, const XlCase& c, Split sp, unsigned seed) {
    std::mt19937 rng(seed);
    const DecodeKernels<T> kn = kernels<T>();
    const int D = s.head_dim, T_ = c.queries;
    Shape slot = s;
    slot.capacity = c.rows;
    DecodeParams dp = decode_params<T>(slot, 0, sp);
    // q/o [B, T, Hq, D]; K/V [B, Hkv, rows, D].
    const long long q_st_h = D, q_st_t = (long long)D * s.q_heads, q_st_b = q_st_t * T_;
    const auto q = random<T>((size_t)q_st_b * s.batch, rng);
    const auto k = random<T>((size_t)dp.k_stride_b * s.batch, rng);
    const auto v = random<T>((size_t)dp.v_stride_b * s.batch, rng);
    std::vector<double> want((size_t)q_st_b * s.batch);
    for (int b = 0; b < s.batch; ++b)
        for (int t = 0; t < T_; ++t)
            for (int h = 0; h < s.q_heads; ++h) {
                double* out = want.data() + b * q_st_b + t * q_st_t + h * q_st_h;
                const long long len = c.lens[b], i = (long long)c.q_pos[b] + t;
                if (!c.ring && len > c.rows) {
                    std::fill(out, out + D, NAN);
                    continue;
                }
                const long long kv = b * dp.k_stride_b + (h / (s.q_heads / s.kv_heads)) * dp.k_stride_h;
                attend_row(
                    q.data() + b * q_st_b + t * q_st_t + h * q_st_h, k.data() + kv, v.data() + kv, dp.k_stride_s,
                    dp.v_stride_s, D, len, dp.scale,
                    [&](long long j) { return xl_visible(j, i, len, c.mask, c.window, c.ring, c.rows); },
                    [&](long long j) { return c.ring ? j % c.rows : j; }, out);
            }
    char what[160];
    std::snprintf(what, sizeof what, "mask%d w%d %s rows%d T%d", c.mask, c.window, c.ring ? "ring" : "plain",
                  c.rows, T_);
    std::vector<T> o(want.size(), frugal::from_float<T>(NAN));
    if (T_ == 1) {
        // The decode form: q strides (b, h) of [B, 1, Hq, D], as AttnParams::decode_params.
        dp.q_stride_b = q_st_b;
        dp.q_stride_h = q_st_h;
        dp.o_stride_b = q_st_b;
        dp.o_stride_h = q_st_h;
        const XlKeyParams kp{c.mask, c.window, c.ring ? 1 : 0, 0};
        std::vector<float> ws;
        const bool vec = D % (8 / sizeof(T)) == 0;
        split_kv(
            slot, dp, ws,
            [&](emu::Dim g, float* po, float* pl) {
                emu::launch(g, {128}, nullptr, 0, kn.xl_partial[c.ring][D > 128][vec], q.data(), k.data(), v.data(),
                            c.q_pos.data(), c.lens.data(), po, pl, dp, kp);
            },
            [&](emu::Dim g, float* po, float* pl) {
                emu::launch(g, {128}, nullptr, 0, kn.xl_merge[c.ring], po, pl, c.q_pos.data(), c.lens.data(),
                            o.data(), dp, kp);
            });
        report(label("xl decode", dt, slot, 0, sp, vec) + " " + what, max_err(o, want), tol<T>());
    } else {
        XlAttnParams p{};
        const long long st_q[3] = {q_st_b, q_st_t, q_st_h};
        const long long st_k[3] = {dp.k_stride_b, dp.k_stride_h, dp.k_stride_s};
        for (int x = 0; x < 3; ++x) {
            p.q_stride[x] = p.o_stride[x] = st_q[x];
            p.k_stride[x] = p.v_stride[x] = st_k[x];
        }
        p.q_heads = s.q_heads;
        p.kv_heads = s.kv_heads;
        p.head_dim = D;
        p.rows = c.rows;
        p.mask = c.mask;
        p.window = c.window;
        p.ring = c.ring;
        p.scale = dp.scale;
        emu::launch({(unsigned)T_, (unsigned)s.q_heads, (unsigned)s.batch}, {128}, nullptr, 0, kn.attend, q.data(),
                    k.data(), v.data(), c.q_pos.data(), c.lens.data(), o.data(), p);
        report(std::string("xl chunk ") + dt + " " + what, max_err(o, want), tol<T>());
    }
}

template <typename T>
void all_cases(const char* dt, unsigned& seed) {
    // Dense: GQA groups of 4 and 12 (two head chunks), D 128/64/80/256, split sizes that leave
    // one, several and inactive splits; lengths 0, 1, ragged, full and one past capacity (NaN).
    dense_case<T>(dt, {4, 8, 2, 128, 300}, 0, {64, 5}, {0, 1, 257, 300}, seed++);
    dense_case<T>(dt, {2, 12, 1, 64, 200}, 8, {7, 29}, {200, 201}, seed++);
    dense_case<T>(dt, {2, 4, 4, 80, 130}, 0, {1000, 1}, {130, 77}, seed++);
    dense_case<T>(dt, {1, 2, 1, 256, 100}, 0, {33, 4}, {99}, seed++);
    dense_case<T>(dt, {1, 2, 1, 36, 40}, 2, {16, 3}, {40}, seed++);
    // Cross-layer: decode form and chunk, every mask, windows, plain and ring slots.
    const Shape s{2, 8, 2, 128, 0};
    for (int mask = 0; mask < 3; ++mask) {
        xl_case<T>(dt, s, {mask, 0, false, 160, 1, {150, 9}, {149, 8}}, {32, 5}, seed++);
        xl_case<T>(dt, s, {mask, 0, false, 160, 1, {150, 161}, {150, 10}}, {64, 3}, seed++);
        xl_case<T>(dt, s, {mask, 20, false, 160, 1, {150, 30}, {149, 29}}, {8, 20}, seed++);
        xl_case<T>(dt, s, {mask, 24, true, 25, 1, {300, 20}, {299, 19}}, {4, 7}, seed++);
        xl_case<T>(dt, s, {mask, 0, true, 40, 1, {95, 40}, {95, 0}}, {16, 3}, seed++);
        xl_case<T>(dt, s, {mask, 0, false, 160, 5, {150, 9}, {145, 4}}, {1, 1}, seed++);
        xl_case<T>(dt, s, {mask, 16, true, 20, 5, {300, 7}, {295, 2}}, {1, 1}, seed++);
    }
    xl_case<T>(dt, {1, 3, 3, 72, 0}, {1, 0, false, 50, 1, {50}, {49}}, {16, 4}, seed++);
}

}  // namespace

int main() {
    unsigned seed = 1;
    all_cases<float>("f32", seed);
    all_cases<__half>("f16", seed);
    all_cases<__nv_bfloat16>("bf16", seed);
    std::printf("%d failure(s)\n", failures);
    return failures ? 1 : 0;
}
