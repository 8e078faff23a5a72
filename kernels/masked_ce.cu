// Fused masked cross-entropy: loss, per-token log-probs, entropy, logsumexp and (optionally) the gradient
// over the response rows only, one thread block per row. Must agree with src/cpu/loss.rs.
//
// Non-finite logits follow PyTorch (and src/backend/cpu/loss.rs): a NaN poisons the row's outputs and
// gradient; a row of -inf has lse -inf and NaN elsewhere; a +inf gives lse +inf, log-prob -inf (NaN for a
// +inf label), entropy NaN, gradient NaN at +inf entries.
//
// Forward reads each masked row once, keeping an online (max m, Σ e^(x-m), Σ e^(x-m)(m-x)) triple per
// thread, merged across the block; from it:
//   log Σ e^x = m + log s,  log p(label) = (x_label - m) - log s,  entropy = log s + u / s.
// Both entropy terms are non-negative (m - x >= 0), so a peaked row loses no precision to cancellation.
// Forward+backward reads the row a second time (from L2 when it is still there) and writes the gradient
// once: scale · w · (softmax(x) - onehot(label)), in f32, rounded once to the logits' dtype.
// Unmasked rows are never read: their outputs are 0, their gradient rows zeros.
#include "abi.cuh"

// 16-byte loads each thread keeps in flight in the forward pass.
#define CE_LOADS 4

// Running softmax statistics of a set of logits relative to their max m. `r` is Σ e^(x - m) without the
// max's own term 1, so that log(1 + r) keeps full precision when one logit dominates (a peaked row's
// entropy of 1e-9 is then exact to f32 precision, not lost in the rounding of 1 + r).
struct Online {
    float m;  // max so far; -inf while empty
    float r;  // Σ e^(x - m) - 1
    float u;  // Σ e^(x - m) (m - x)
};

#define CE_NEG_INF (-__int_as_float(0x7f800000))

__device__ __forceinline__ Online online_empty() { return Online{CE_NEG_INF, 0.0f, 0.0f}; }

// Make `m` the running max (m >= a.m), rescaling what is there.
__device__ __forceinline__ void online_rebase(Online &a, float m) {
    if (a.m == CE_NEG_INF) {
        a = Online{m, 0.0f, 0.0f};  // the new max's own term is the implicit 1
        return;
    }
    if (m > a.m) {
        const float c = expf(a.m - m);
        const float s = 1.0f + a.r;
        a.u = c * (a.u + (m - a.m) * s);
        a.r = s * c;  // the old terms; the new max's own 1 is implicit again
        a.m = m;
    }
}

__device__ __forceinline__ void online_add(Online &a, float x) {
    if (x == CE_NEG_INF) return;  // probability 0, contributes nothing
    if (a.m == CE_NEG_INF || x > a.m) {
        online_rebase(a, x);  // a NaN first element makes m NaN: the row is poisoned, as it must be
        return;
    }
    if (x == a.m) {  // a tie, counted exactly (also when both are +inf, where x - m would be NaN)
        a.r += 1.0f;
        return;
    }
    const float e = expf(x - a.m);  // NaN for a NaN x: r and u become NaN
    a.r += e;
    a.u += e * (a.m - x);
}

#define CE_LOG2E 1.4426950408889634f

// e^t for t <= 0 as 2^(t·log2 e) on the special function unit. The argument is rounded relative to t, so
// the result is within ~|t|·1e-7 relative (plus 2 ulp) of e^t: 4e-6 at worst where e^t still counts
// (t > -88), far inside the kernel's 1e-5 tolerance, at a fraction of expf's instruction count.
__device__ __forceinline__ float exp_nonpositive(float t) { return ex2_approx(t * CE_LOG2E); }

// Add N values at once, without a data-dependent branch over the elements: a warp whose threads raise
// their running max at different chunks (most chunks early in a row, for some thread of 32) would
// otherwise run a careful per-element path and the cheap one both. Per element: a subtraction, a clamp,
// one ex2, a tie test and two adds. The new max's own term stays implicit: elements equal to the max are
// counted (exactly) instead of summed, so a tiny r is never added to 1.
template <int N>
__device__ __forceinline__ void online_add_chunk(Online &a, const float (&v)[N]) {
    float chunk_max = v[0];
#pragma unroll
    for (int k = 1; k < N; ++k) chunk_max = fmaxf(chunk_max, v[k]);
    // Not `>`: a chunk of NaN only (fmaxf drops a NaN beside a number) makes m NaN, poisoning the row.
    const bool raised = !(chunk_max <= a.m);
    if (raised) {
        // Short, so divergence here costs little: rescale what is there to the new max.
        const float m = chunk_max;
        if (a.m == CE_NEG_INF) {
            a.r = 0.0f;
            a.u = 0.0f;
        } else {
            const float c = exp_nonpositive(a.m - m);
            const float s = 1.0f + a.r;
            a.u = c * (a.u + (m - a.m) * s);
            a.r = c * s;  // the old max's term is explicit now
        }
        a.m = m;
    }
    if (a.m == CE_NEG_INF) return;  // all -inf (or NaN) so far
    int ties = 0;
#pragma unroll
    for (int k = 0; k < N; ++k) {
        // A -inf logit gives t = -inf and e = 0, and its u term 0 · min(inf, 1e30) = 0, never 0 · inf. A NaN
        // logit gives e = NaN, which r and u carry to every output of the row (PyTorch's semantics). A +inf
        // max makes t NaN for the +inf entries (ties, counted exactly) and -inf for the others.
        const float t = v[k] - a.m;
        const float e = exp_nonpositive(t);
        const bool tie = v[k] == a.m;
        ties += tie;
        a.r += tie ? 0.0f : e;
        a.u = fmaf(e, fminf(-t, 1e30f), a.u);
    }
    // Each element equal to the max is a term of exactly 1, less the implicit one of a new max.
    a.r += (float)(ties - (raised ? 1 : 0));
}

__device__ __forceinline__ Online online_merge(Online a, Online b) {
    if (a.m == CE_NEG_INF) return b;
    if (b.m == CE_NEG_INF) return a;
    if (b.m > a.m) {
        const Online t = a;
        a = b;
        b = t;
    }
    // a holds the max; b's terms are all scaled by c = e^(b.m - a.m), its implicit 1 included (exactly 1
    // for equal maxima, also two +inf ones).
    const float c = b.m == a.m ? 1.0f : expf(b.m - a.m);
    const float sb = 1.0f + b.r;
    return Online{a.m, a.r + c * sb, a.u + c * (b.u + (a.m - b.m) * sb)};
}

__device__ __forceinline__ Online online_shfl_xor(Online a, int offset) {
    return Online{__shfl_xor_sync(0xffffffffu, a.m, offset), __shfl_xor_sync(0xffffffffu, a.r, offset),
                  __shfl_xor_sync(0xffffffffu, a.u, offset)};
}

// The block's combined statistics, in every thread. `scratch` holds one Online per warp.
__device__ __forceinline__ Online online_block_reduce(Online a, Online *scratch) {
    const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const unsigned warps = (blockDim.x + 31) / 32;
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) a = online_merge(a, online_shfl_xor(a, offset));
    if (lane == 0) scratch[warp] = a;
    __syncthreads();
    Online total = lane < warps ? scratch[lane] : online_empty();
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) total = online_merge(total, online_shfl_xor(total, offset));
    __syncthreads();
    return total;
}

// Elements per 16-byte vector load.
template <typename T>
struct Vec16 {
    static constexpr int N = 16 / (int)sizeof(T);
};

// The N floats of a 16-byte vector. bf16 is the top half of an f32, so each 32-bit word gives two floats
// for one shift and one mask (the generic per-element conversion costs the compiler a permute more).
template <typename T, int N>
__device__ __forceinline__ void unpack(const Vector<T, N> *src, float (&out)[N]) {
    const Vector<T, N> p = *src;
#pragma unroll
    for (int k = 0; k < N; ++k) out[k] = to_float(p.v[k]);
}
template <>
__device__ __forceinline__ void unpack<bf16, 8>(const Vector<bf16, 8> *src, float (&out)[8]) {
    const Vector<u32, 4> w = *reinterpret_cast<const Vector<u32, 4> *>(src);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        out[2 * k] = __uint_as_float(w.v[k] << 16);  // little-endian: the lower address is the low half
        out[2 * k + 1] = __uint_as_float(w.v[k] & 0xffff0000u);
    }
}

// This thread's share of the row's statistics: 16-byte loads where the row is aligned, then the tail.
template <typename T>
__device__ __forceinline__ Online row_statistics(const T *x, u64 vocab) {
    constexpr int N = Vec16<T>::N;
    Online local = online_empty();
    u64 tail = 0;
    if (is_vector_aligned<T, N>(x)) {
        const u64 vectors = vocab / N;
        const Vector<T, N> *xv = reinterpret_cast<const Vector<T, N> *>(x);
        const u64 stride = blockDim.x;
        u64 v = threadIdx.x;
        // CE_LOADS 16-byte loads in flight per thread before any is used: the loop is bound by memory
        // latency, and one load per iteration leaves the SM with too few bytes outstanding.
        for (; v + (CE_LOADS - 1) * stride < vectors; v += CE_LOADS * stride) {
            float values[CE_LOADS][N];
#pragma unroll
            for (int l = 0; l < CE_LOADS; ++l) unpack<T, N>(xv + v + l * stride, values[l]);
#pragma unroll
            for (int l = 0; l < CE_LOADS; ++l) online_add_chunk<N>(local, values[l]);
        }
        for (; v < vectors; v += stride) {
            float values[N];
            unpack<T, N>(xv + v, values);
            online_add_chunk<N>(local, values);
        }
        tail = vectors * N;
    }
    for (u64 i = tail + threadIdx.x; i < vocab; i += blockDim.x) online_add(local, to_float(x[i]));
    return local;
}

// Write `value(i)` for every i in [0, vocab) of row g, 16-byte stores where aligned.
template <typename T, typename F>
__device__ __forceinline__ void write_row(T *g, u64 vocab, F value) {
    constexpr int N = Vec16<T>::N;
    u64 tail = 0;
    if (is_vector_aligned<T, N>(g)) {
        const u64 vectors = vocab / N;
        for (u64 v = threadIdx.x; v < vectors; v += blockDim.x) {
            T out[N];
#pragma unroll
            for (int k = 0; k < N; ++k) store_float(value(v * N + k), &out[k]);
            store_vector<T, N>(g + v * N, out);
        }
        tail = vectors * N;
    }
    for (u64 i = tail + threadIdx.x; i < vocab; i += blockDim.x) store_float(value(i), &g[i]);
}

// g[i] = f(i, x[i]) for the whole row, 16-byte loads and stores where both rows are aligned. Each element
// is read and written by the same thread, so g may be x (in place).
template <typename T, typename F>
__device__ __forceinline__ void transform_row(const T *x, T *g, u64 vocab, F f) {
    constexpr int N = Vec16<T>::N;
    u64 tail = 0;
    if (is_vector_aligned<T, N>(x) && is_vector_aligned<T, N>(g)) {
        const u64 vectors = vocab / N;
        for (u64 v = threadIdx.x; v < vectors; v += blockDim.x) {
            const Vector<T, N> p = reinterpret_cast<const Vector<T, N> *>(x)[v];
            T out[N];
#pragma unroll
            for (int k = 0; k < N; ++k) store_float(f(v * N + k, to_float(p.v[k])), &out[k]);
            store_vector<T, N>(g + v * N, out);
        }
        tail = vectors * N;
    }
    for (u64 i = tail + threadIdx.x; i < vocab; i += blockDim.x) store_float(f(i, to_float(x[i])), &g[i]);
}

// How the summed loss is normalized: CE_NORM_* (abi.cuh), from src/loss `Normalization`.
__device__ __forceinline__ float ce_denominator(i32 mode, float fixed, u32 count) {
    if (mode == CE_NORM_TOKEN_MEAN) return (float)count;
    if (mode == CE_NORM_FIXED) return fixed;
    return 1.0f;
}

// `grad` may alias `logits` (in-place backward), so neither is __restrict__.
template <typename T, bool BACKWARD>
__device__ __forceinline__ void masked_ce_impl(const T *logits, u64 rows, u64 vocab, u64 logits_stride,
                                               const void *__restrict__ labels, i32 labels_are_i64,
                                               const u8 *__restrict__ mask, const float *__restrict__ weights,
                                               const u32 *__restrict__ count, i32 norm_mode, float norm_fixed,
                                               float upstream, const float *__restrict__ upstream_ptr,
                                               float *__restrict__ row_loss,
                                               float *__restrict__ log_probs, float *__restrict__ entropy,
                                               float *__restrict__ lse, T *grad, u64 grad_stride,
                                               u32 *__restrict__ error_flag) {
    __shared__ Online scratch[32];
    const float nan = __int_as_float(0x7fc00000);
    float scale_base = 0.0f;
    if (BACKWARD) {
        const float denominator = ce_denominator(norm_mode, norm_fixed, *count);
        // The upstream gradient from the device when given (a framework's grad_output): no host read.
        const float up = upstream_ptr != nullptr ? *upstream_ptr : upstream;
        scale_base = denominator > 0.0f ? up / denominator : 0.0f;
    }
    for (u64 row = blockIdx.x; row < rows; row += gridDim.x) {
        const T *x = logits + row * logits_stride;
        const i64 label = labels_are_i64 ? ((const i64 *)labels)[row] : (i64)((const i32 *)labels)[row];
        const bool masked = mask[row] != 0;
        const bool label_ok = label >= 0 && (u64)label < vocab;
        if (!masked || !label_ok) {
            // Not read. A bad label on a masked row is reported through the flag, never dereferenced.
            // A bad label's row is NaN everywhere, so the loss shows it even to a caller who never reads
            // the flag (which would synchronize).
            const float fill = masked ? nan : 0.0f;
            if (threadIdx.x == 0) {
                if (masked) atomicOr(error_flag, 1u);
                row_loss[row] = fill;
                if (log_probs) log_probs[row] = fill;
                if (entropy) entropy[row] = fill;
                if (lse) lse[row] = fill;
            }
            if (BACKWARD) write_row(grad + row * grad_stride, vocab, [&](u64) { return fill; });
            continue;
        }
        // Read before any thread can overwrite the row in place.
        const float x_label = to_float(x[label]);
        const Online total = online_block_reduce(row_statistics(x, vocab), scratch);
        const float log_s = log1pf(total.r);
        const float log_prob = (x_label - total.m) - log_s;
        const float w = weights ? weights[row] : 1.0f;
        if (threadIdx.x == 0) {
            row_loss[row] = -w * log_prob;
            if (log_probs) log_probs[row] = log_prob;
            // A row of -inf only has no distribution: NaN (its lse stays -inf, its log-prob is NaN).
            if (entropy) entropy[row] = total.m == CE_NEG_INF ? nan : log_s + total.u / (1.0f + total.r);
            if (lse) lse[row] = total.m + log_s;
        }
        if (BACKWARD) {
            const float scale = scale_base * w;
            // p_i = e^((x_i - m) - log s): x_i - m first, so no f32 rounding of a large m + log s creeps in.
            // At the label, p - 1 = -(r - expm1(x_label - m)) / (1 + r): two non-negative terms instead of
            // 1 - p, which would cancel when the label holds nearly all the mass.
            const float label_term = -(total.r - expm1f(x_label - total.m)) / (1.0f + total.r);
            transform_row(x, grad + row * grad_stride, vocab, [&](u64 i, float v) {
                return scale * (i == (u64)label ? label_term : exp_nonpositive((v - total.m) - log_s));
            });
        }
    }
}

// The struct's fields as the implementation's parameters (the struct itself is never addressed).
#define CE_FIELDS(T)                                                                                \
    (const T *)a.logits, a.rows, a.vocab, a.logits_stride, a.labels, a.labels_are_i64, a.mask,     \
        a.weights, a.count, a.norm_mode, a.norm_fixed, a.upstream, a.upstream_ptr, a.row_loss,     \
        a.log_probs,                                                                               \
        a.entropy, a.lse, (T *)a.grad, a.grad_stride, a.error_flag

#define CE_KERNELS(suffix, T)                                                                       \
    extern "C" __global__ void __launch_bounds__(CE_BLOCK) masked_ce_fwd_##suffix(const CeArgs a) { \
        masked_ce_impl<T, false>(CE_FIELDS(T));                                                     \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(CE_BLOCK)                                          \
        masked_ce_fwd_bwd_##suffix(const CeArgs a) {                                                \
        masked_ce_impl<T, true>(CE_FIELDS(T));                                                      \
    }

CE_KERNELS(f32, float)
CE_KERNELS(f16, f16)
CE_KERNELS(bf16, bf16)

// The number of masked rows, by one block in a fixed order (deterministic), before the main kernel so
// that a token-mean gradient knows its denominator without a host round trip.
extern "C" __global__ void __launch_bounds__(CE_BLOCK) masked_ce_count(const CeCountArgs a) {
    __shared__ u32 scratch[32];
    const u8 *__restrict__ mask = a.mask;
    u32 mine = 0;
    for (u64 i = threadIdx.x; i < a.rows; i += blockDim.x) mine += mask[i] != 0;
    const u32 total = block_reduce(mine, [](u32 x, u32 y) { return x + y; }, 0u, scratch);
    if (threadIdx.x == 0) {
        *a.count = total;
        *a.error_flag = 0;  // before the main kernel, on the same stream, may set it
    }
}

// Σ row_loss in f64 in a fixed order, and the normalized loss: out[0] = sum, out[1] = loss.
extern "C" __global__ void __launch_bounds__(CE_BLOCK) masked_ce_reduce(const CeReduceArgs a) {
    __shared__ double scratch[32];
    const float *__restrict__ row_loss = a.row_loss;
    double mine = 0.0;
    for (u64 i = threadIdx.x; i < a.rows; i += blockDim.x) mine += (double)row_loss[i];
    const double sum = block_reduce(mine, [](double x, double y) { return x + y; }, 0.0, scratch);
    if (threadIdx.x == 0) {
        const float denominator = ce_denominator(a.norm_mode, a.norm_fixed, *a.count);
        a.out[0] = (float)sum;
        // A token mean over no tokens is 0, never NaN.
        a.out[1] = denominator > 0.0f ? (float)(sum / (double)denominator) : 0.0f;
    }
}
