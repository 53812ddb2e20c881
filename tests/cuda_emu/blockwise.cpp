// kernels-cuda/blockwise.cu on the CPU emulator (emu.h), against an f64
// reference: the FMA and tensor-core forwards (plain and accumulating) and
// the backward (pre-pass, dK/dV, dQ), with the grids and shared-memory sizes
// of src/blockwise/cuda.rs. Prints one line per case; exit 1 on a mismatch.
#define FRUGAL_EMU_EXTERN_SHARED
#include "emu.h"
// The kernel file, compiled as host code.
#include "../../kernels-cuda/blockwise.cu"

#include <algorithm>
#include <random>
#include <string>

namespace frugal_bw {
// The kernels' `extern __shared__` arrays (blocks run one at a time).
alignas(16) unsigned char bw_mma_smem[1 << 18];
alignas(16) float smem[1 << 16];
}  // namespace frugal_bw

namespace {

using frugal_bw::BwParams;

constexpr int kThreads = 128;
constexpr int kTile = 32;

struct Case {
    int batch, q_heads, kv_heads, head_dim, q_len, kv_len, q0, k0;
    bool causal;
    int pad;  // extra elements per Q/K/V/dO row (multiples of 8 keep rows 16-byte aligned)
};

std::string describe(const Case& c) {
    char buf[200];
    std::snprintf(buf, sizeof buf, "B%d H%d/%d D%d q%d@%d kv%d@%d %s pad%d", c.batch, c.q_heads, c.kv_heads,
                  c.head_dim, c.q_len, c.q0, c.kv_len, c.k0, c.causal ? "causal" : "full", c.pad);
    return buf;
}

// The FMA kernels' variant (src/blockwise/cuda.rs `variant`): (d_max, rm, kpt).
struct Variant {
    int d_max, rm, kpt;
};
Variant variant(int d) { return d <= 64 ? Variant{64, 4, 2} : d <= 128 ? Variant{128, 4, 2} : Variant{256, 2, 1}; }

template <typename T>
T from_f(float x) {
    return frugal::from_float<T>(x);
}
template <typename T>
double to_d(T x) {
    return frugal::to_float(x);
}

// A tensor [batch, heads, len, row] with row = head_dim + pad; rows padded with NaN.
template <typename T>
struct Tensor {
    std::vector<T> data;
    long long st[3];
    Tensor(int b, int h, int len, int d, int pad, std::mt19937& rng) {
        const int row = d + pad;
        st[2] = row;
        st[1] = (long long)len * row;
        st[0] = st[1] * h;
        data.assign((size_t)st[0] * b, from_f<T>(NAN));
        std::uniform_real_distribution<float> u(-1.f, 1.f);
        for (int bb = 0; bb < b; ++bb)
            for (int hh = 0; hh < h; ++hh)
                for (int i = 0; i < len; ++i)
                    for (int x = 0; x < d; ++x) at(bb, hh, i, x) = from_f<T>(u(rng));
    }
    T& at(int b, int h, int i, int d) { return data[b * st[0] + h * st[1] + i * st[2] + d]; }
    double get(int b, int h, int i, int d) const { return to_d(data[b * st[0] + h * st[1] + i * st[2] + d]); }
};

struct Reference {
    std::vector<double> o, lse, dq, dk, dv;
};

template <typename T>
Reference reference(const Case& c, float scale, const Tensor<T>& q, const Tensor<T>& k, const Tensor<T>& v,
                    const Tensor<T>& d_o) {
    const int D = c.head_dim, G = c.q_heads / c.kv_heads;
    Reference r;
    r.o.assign((size_t)c.batch * c.q_heads * c.q_len * D, 0.0);
    r.lse.assign((size_t)c.batch * c.q_heads * c.q_len, -INFINITY);
    r.dq.assign(r.o.size(), 0.0);
    r.dk.assign((size_t)c.batch * c.kv_heads * c.kv_len * D, 0.0);
    r.dv.assign(r.dk.size(), 0.0);
    std::vector<double> p(c.kv_len);
    for (int b = 0; b < c.batch; ++b)
        for (int h = 0; h < c.q_heads; ++h)
            for (int i = 0; i < c.q_len; ++i) {
                const int g = h / G;
                const size_t row = ((size_t)b * c.q_heads + h) * c.q_len + i;
                double mx = -INFINITY;
                for (int j = 0; j < c.kv_len; ++j) {
                    if (c.causal && c.k0 + j > c.q0 + i) {
                        p[j] = -INFINITY;
                        continue;
                    }
                    double s = 0;
                    for (int x = 0; x < D; ++x) s += q.get(b, h, i, x) * k.get(b, g, j, x);
                    p[j] = s * scale;
                    mx = std::max(mx, p[j]);
                }
                if (mx == -INFINITY) continue;
                double l = 0;
                for (int j = 0; j < c.kv_len; ++j) l += std::exp(p[j] - mx);
                const double lse = mx + std::log(l);
                r.lse[row] = lse;
                for (int j = 0; j < c.kv_len; ++j) p[j] = std::exp(p[j] - lse);
                double delta = 0;
                for (int x = 0; x < D; ++x) {
                    double o = 0;
                    for (int j = 0; j < c.kv_len; ++j) o += p[j] * v.get(b, g, j, x);
                    r.o[row * D + x] = o;
                    delta += o * d_o.get(b, h, i, x);
                }
                for (int j = 0; j < c.kv_len; ++j) {
                    if (p[j] == 0) continue;
                    double dp = 0;
                    for (int x = 0; x < D; ++x) dp += d_o.get(b, h, i, x) * v.get(b, g, j, x);
                    const double ds = p[j] * (dp - delta);
                    const size_t kr = ((size_t)b * c.kv_heads + g) * c.kv_len + j;
                    for (int x = 0; x < D; ++x) {
                        r.dv[kr * D + x] += p[j] * d_o.get(b, h, i, x);
                        r.dk[kr * D + x] += scale * ds * q.get(b, h, i, x);
                        r.dq[row * D + x] += scale * ds * k.get(b, g, j, x);
                    }
                }
            }
    return r;
}

// Largest |got - want|, with NaN (or a finite/infinite mismatch) as infinity.
double max_err(const std::vector<float>& got, const std::vector<double>& want) {
    double e = 0;
    for (size_t i = 0; i < got.size(); ++i) {
        if (std::isinf(want[i]) && got[i] == want[i]) continue;
        const double d = std::fabs((double)got[i] - want[i]);
        e = std::max(e, std::isnan(d) ? INFINITY : d);
    }
    return e;
}

int failures = 0;

void report(const std::string& what, const Case& c, double err, double tol) {
    const bool ok = err <= tol;
    std::printf("%s %-22s %-52s max err %.3g (tol %.3g)\n", ok ? "ok  " : "FAIL", what.c_str(), describe(c).c_str(),
                err, tol);
    if (!ok) ++failures;
}

BwParams params(const Case& c, const long long (&q_st)[3], const long long (&k_st)[3], const long long (&o_st)[3],
                float scale, bool accumulate) {
    BwParams p{};
    for (int i = 0; i < 3; ++i) {
        p.q_st[i] = q_st[i];
        p.k_st[i] = k_st[i];
        p.v_st[i] = k_st[i];
        p.o_st[i] = o_st[i];
    }
    p.batch = c.batch;
    p.q_heads = c.q_heads;
    p.kv_heads = c.kv_heads;
    p.head_dim = c.head_dim;
    p.q_len = c.q_len;
    p.kv_len = c.kv_len;
    p.q0 = c.q0;
    p.k0 = c.k0;
    p.causal = c.causal;
    p.accumulate = accumulate;
    p.scale = scale;
    return p;
}

template <typename T>
struct Kernels {
    void (*forward)(const T*, const T*, const T*, float*, float*, BwParams);
    void (*prepass)(const float*, const T*, float*, BwParams);
    void (*dkv)(const T*, const T*, const T*, const T*, const float*, const float*, float*, float*, BwParams);
    void (*dq)(const T*, const T*, const T*, const T*, const float*, const float*, float*, BwParams);
};

template <typename T>
Kernels<T> kernels(int d_max);
#define FRUGAL_EMU_TABLE(T, NAME)                                                                           \
    template <>                                                                                             \
    Kernels<T> kernels<T>(int d_max) {                                                                      \
        switch (d_max) {                                                                                    \
            case 64:                                                                                        \
                return {bw_forward_##NAME##_d64, bw_prepass_##NAME, bw_dkv_##NAME##_d64,           \
                        bw_dq_##NAME##_d64};                                                                \
            case 128:                                                                                       \
                return {bw_forward_##NAME##_d128, bw_prepass_##NAME, bw_dkv_##NAME##_d128,         \
                        bw_dq_##NAME##_d128};                                                               \
            default:                                                                                        \
                return {bw_forward_##NAME##_d256, bw_prepass_##NAME, bw_dkv_##NAME##_d256,         \
                        bw_dq_##NAME##_d256};                                                               \
        }                                                                                                   \
    }
FRUGAL_EMU_TABLE(float, f32)
FRUGAL_EMU_TABLE(__half, f16)
FRUGAL_EMU_TABLE(__nv_bfloat16, bf16)

template <typename T>
void (*mma_forward(int d))(const T*, const T*, const T*, float*, float*, BwParams) {
    if constexpr (std::is_same_v<T, __half>) return d == 64 ? bw_forward_mma_f16_d64 : bw_forward_mma_f16_d128;
    if constexpr (std::is_same_v<T, __nv_bfloat16>)
        return d == 64 ? bw_forward_mma_bf16_d64 : bw_forward_mma_bf16_d128;
    return nullptr;
}

unsigned char* smem_f() { return reinterpret_cast<unsigned char*>(frugal_bw::smem); }

template <typename T>
void run_case(const Case& c, const char* dtype, bool tensor_cores, unsigned seed) {
    std::mt19937 rng(seed);
    const int D = c.head_dim;
    const float scale = 1.f / std::sqrt((float)D);
    Tensor<T> q(c.batch, c.q_heads, c.q_len, D, c.pad, rng), k(c.batch, c.kv_heads, c.kv_len, D, c.pad, rng),
        v(c.batch, c.kv_heads, c.kv_len, D, c.pad, rng), d_o(c.batch, c.q_heads, c.q_len, D, c.pad, rng);
    v.st[0] = k.st[0];  // same shape, same strides
    const Reference ref = reference(c, scale, q, k, v, d_o);
    const size_t rows = (size_t)c.batch * c.q_heads * c.q_len;
    const Variant var = variant(D);
    const Kernels<T> kn = kernels<T>(var.d_max);
    const BwParams p = params(c, q.st, k.st, d_o.st, scale, false);
    const std::string tag = std::string(dtype) + (tensor_cores ? " mma" : " fma");
    const double tol = std::is_same_v<T, float> ? 2e-5 : std::is_same_v<T, __half> ? 4e-3 : 3e-2;

    // Forward into NaN-poisoned outputs.
    std::vector<float> o(rows * D, NAN), lse(rows, NAN);
    auto forward = [&](const BwParams& pp) {
        if (tensor_cores) {
            const int blocks = (c.q_len + frugal_bw::kMmaRows - 1) / frugal_bw::kMmaRows;
            emu::launch({(unsigned)blocks, (unsigned)c.q_heads, (unsigned)c.batch}, {frugal_bw::kMmaThreads},
                        frugal_bw::bw_mma_smem, 2 * (64 + 256) * (D + 8), mma_forward<T>(D), q.data.data(),
                        k.data.data(), v.data.data(), o.data(), lse.data(), pp);
        } else {
            const int bq = 16 * var.rm, ds = D | 1;
            emu::launch({(unsigned)((c.q_len + bq - 1) / bq), (unsigned)c.q_heads, (unsigned)c.batch}, {kThreads},
                        smem_f(), 4 * (bq * ds + kTile * ds + bq * (kTile + 1)), kn.forward, q.data.data(),
                        k.data.data(), v.data.data(), o.data(), lse.data(), pp);
        }
    };
    forward(p);
    report(tag + " forward o", c, max_err(o, ref.o), tol);
    report(tag + " forward lse", c, max_err(lse, ref.lse), tol);

    // Accumulate onto a running state (some rows empty): the merge rule.
    {
        std::vector<float> o_a(rows * D), lse_a(rows);
        std::uniform_real_distribution<float> u(-1.f, 1.f);
        for (auto& x : o_a) x = u(rng);
        for (size_t r = 0; r < rows; ++r) lse_a[r] = (r % 5 == 3) ? -INFINITY : 2.f * u(rng);
        std::vector<double> want_o(rows * D), want_lse(rows);
        for (size_t r = 0; r < rows; ++r) {
            const double la = lse_a[r], lb = ref.lse[r];
            const double m = std::max(la, lb);
            const double l = (m == -INFINITY) ? -INFINITY : m + std::log(std::exp(la - m) + std::exp(lb - m));
            want_lse[r] = l;
            for (int x = 0; x < D; ++x) {
                const double a = (la == -INFINITY) ? 0 : o_a[r * D + x] * std::exp(la - l);
                const double b = (lb == -INFINITY) ? 0 : ref.o[r * D + x] * std::exp(lb - l);
                want_o[r * D + x] = a + b;  // both empty: 0 (merge_weights in src/blockwise/mod.rs)
            }
        }
        o = o_a;
        lse = lse_a;
        forward(params(c, q.st, k.st, d_o.st, scale, true));
        report(tag + " accumulate o", c, max_err(o, want_o), tol);
        report(tag + " accumulate lse", c, max_err(lse, want_lse), tol);
    }

    // Backward from the reference's O and LSE (as the ring gives it the final
    // ones), accumulating onto nonzero gradients.
    if (tensor_cores) return;  // the tensor-core backward is not written yet
    std::vector<float> o_ref(ref.o.begin(), ref.o.end()), lse_ref(ref.lse.begin(), ref.lse.end());
    std::vector<float> delta(rows, NAN);
    emu::launch({(unsigned)((rows + kThreads / 32 - 1) / (kThreads / 32))}, {kThreads}, nullptr, 0, kn.prepass,
                o_ref.data(), d_o.data.data(), delta.data(), p);
    std::vector<double> want_delta(rows);
    for (size_t r = 0; r < rows; ++r) {
        const size_t b = r / ((size_t)c.q_heads * c.q_len), h = r / c.q_len % c.q_heads, i = r % c.q_len;
        double s = 0;
        for (int x = 0; x < D; ++x) s += ref.o[r * D + x] * d_o.get(b, h, i, x);
        want_delta[r] = s;
    }
    report(tag + " prepass delta", c, max_err(delta, want_delta), tol);
    const size_t kv_rows = (size_t)c.batch * c.kv_heads * c.kv_len;
    std::vector<float> dq(rows * D, 0.25f), dk(kv_rows * D, -0.5f), dv(kv_rows * D, 1.f);
    const int bkv = 16 * var.kpt, ds = D | 1;
    emu::launch({(unsigned)((c.kv_len + bkv - 1) / bkv), (unsigned)c.kv_heads, (unsigned)c.batch}, {kThreads},
                smem_f(), 4 * (2 * bkv * ds + 2 * kTile * ds + 2 * kTile * (bkv + 1)), kn.dkv, q.data.data(),
                k.data.data(), v.data.data(), d_o.data.data(), lse_ref.data(), delta.data(), dk.data(), dv.data(), p);
    emu::launch({(unsigned)((c.q_len + kTile - 1) / kTile), (unsigned)c.q_heads, (unsigned)c.batch}, {kThreads},
                smem_f(), 4 * (4 * kTile * ds + kTile * (kTile + 1)), kn.dq, q.data.data(), k.data.data(),
                v.data.data(), d_o.data.data(), lse_ref.data(), delta.data(), dq.data(), p);
    auto shifted = [](std::vector<double> x, double by) {
        for (auto& e : x) e += by;
        return x;
    };
    const double gtol = 4 * tol;
    report(tag + " backward dq", c, max_err(dq, shifted(ref.dq, 0.25)), gtol);
    report(tag + " backward dk", c, max_err(dk, shifted(ref.dk, -0.5)), gtol);
    report(tag + " backward dv", c, max_err(dv, shifted(ref.dv, 1.0)), gtol);
}

}  // namespace

int main(int argc, char** argv) {
    // Small shapes that still cross every tile edge: 64-row/64-key tiles
    // (tensor cores), 32-row/32-key tiles (FMA), causal diagonals at offsets,
    // rows that see nothing, GQA.
    const std::vector<Case> cases = {
        {1, 2, 1, 64, 70, 100, 0, 0, false, 0},    {1, 2, 2, 64, 130, 90, 40, 0, true, 8},
        {2, 4, 2, 128, 65, 129, 64, 0, true, 0},   {1, 1, 1, 128, 64, 64, 0, 0, true, 16},
        {1, 3, 1, 64, 20, 200, 500, 100, true, 0}, {1, 2, 1, 64, 33, 50, 40, 0, true, 0},
        {1, 2, 1, 64, 33, 50, 0, 40, true, 0},     {2, 4, 1, 128, 70, 150, 0, 0, false, 8},
        {1, 1, 1, 64, 1, 1, 0, 0, true, 0},        {1, 2, 2, 64, 1, 130, 129, 0, true, 0},
        {1, 2, 1, 128, 129, 129, 0, 0, true, 0},
    };
    const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
    unsigned seed = 1;
    for (const Case& c : cases) {
        run_case<__half>(c, "f16", true, seed);
        run_case<__nv_bfloat16>(c, "bf16", true, seed);
        if (!quick) {
            run_case<float>(c, "f32", false, seed);
            run_case<__nv_bfloat16>(c, "bf16", false, seed);
        }
        ++seed;
    }
    std::printf("%d failure(s)\n", failures);
    return failures ? 1 : 0;
}
