// The cross-entropy kernels' row machinery, shared by masked_ce.cu (one block per row) and
// masked_ce_cluster.cu (a thread-block cluster per row, the row held in shared memory): the online softmax
// statistics and their merges, the vector loads and stores of a row, the softcap, the targets of a row and
// the gradient of one element. See masked_ce.cu for the mathematics.
#pragma once
#include "abi.cuh"

// 16-byte loads each thread keeps in flight in the forward pass.
#define CE_LOADS 4

// Feature bits of a kernel variant.
#define CE_ENTROPY 1  // the entropy accumulator u
#define CE_EXTRAS 2   // argmax, Σ (m - x) for label smoothing, the softcap

#define CE_NO_ARG 0x7fffffff

// Running softmax statistics of a set of logits relative to their max m. `r` is Σ e^(x - m) without the
// max's own term 1, so that log(1 + r) keeps full precision when one logit dominates (a peaked row's
// entropy of 1e-9 is then exact to f32 precision, not lost in the rounding of 1 + r). The other fields are
// kept only by the variants that need them (the compiler drops the rest).
struct Online {
    float m;   // max so far; -inf while empty
    float r;   // Σ e^(x - m) - 1
    float u;   // Σ e^(x - m) (m - x)                        (CE_ENTROPY)
    float d;   // Σ (m - x) over the entries that are not -inf (CE_EXTRAS)
    u32 n;     // how many entries d holds                     (CE_EXTRAS)
    u32 ninf;  // 1 when some entry is -inf                    (CE_EXTRAS)
    float am;  // max of the raw logits (before the softcap)   (CE_EXTRAS)
    i32 arg;   // index of its first occurrence, CE_NO_ARG while none
};

#define CE_NEG_INF (-__int_as_float(0x7f800000))
#define CE_POS_INF (__int_as_float(0x7f800000))

__device__ __forceinline__ Online online_empty() {
    return Online{CE_NEG_INF, 0.0f, 0.0f, 0.0f, 0u, 0u, CE_NEG_INF, CE_NO_ARG};
}

// Σ (m - x) relative to a new max `m` (>= a.m): each of the n entries moves by m - a.m.
template <int F>
__device__ __forceinline__ void rebase_sum(Online &a, float m) {
    if ((F & CE_EXTRAS) && a.n > 0) a.d += (float)a.n * (m - a.m);
}

// Make `m` the running max (m >= a.m), rescaling what is there.
template <int F>
__device__ __forceinline__ void online_rebase(Online &a, float m) {
    if (a.m == CE_NEG_INF) {
        a.m = m;  // the new max's own term is the implicit 1
        a.r = 0.0f;
        a.u = 0.0f;
        return;
    }
    if (m > a.m) {
        const float c = expf(a.m - m);
        const float s = 1.0f + a.r;
        if (F & CE_ENTROPY) a.u = c * (a.u + (m - a.m) * s);
        rebase_sum<F>(a, m);
        a.r = s * c;  // the old terms; the new max's own 1 is implicit again
        a.m = m;
    }
}

// The raw logits' first maximum: `x` at index `i`, seen after every lower index of this thread.
__device__ __forceinline__ void argmax_add(Online &a, float x, i32 i) {
    // Strictly greater: the first of equal maxima stays. A row of -inf only still gets its first index;
    // a NaN is never taken (the row is poisoned, its argmax -1).
    if (x > a.am || (a.arg == CE_NO_ARG && x == a.am)) {
        a.am = x;
        a.arg = i;
    }
}

// Σ (m - x) of one entry (after the max is updated): -inf entries are only flagged (their term is +inf).
template <int F>
__device__ __forceinline__ void sum_add(Online &a, float x) {
    if (F & CE_EXTRAS) {
        const bool finite = x != CE_NEG_INF;
        a.d += finite ? a.m - x : 0.0f;
        a.n += finite ? 1u : 0u;
        a.ninf |= finite ? 0u : 1u;
    }
}

// The same for a chunk, summed on its own first (shorter running sums round less).
template <int F, int N>
__device__ __forceinline__ void sum_add_chunk(Online &a, const float (&v)[N]) {
    if (F & CE_EXTRAS) {
        float d = 0.0f;
        u32 n = 0, ninf = 0;
#pragma unroll
        for (int k = 0; k < N; ++k) {
            const bool finite = v[k] != CE_NEG_INF;
            d += finite ? a.m - v[k] : 0.0f;
            n += finite ? 1u : 0u;
            ninf |= finite ? 0u : 1u;
        }
        a.d += d;
        a.n += n;
        a.ninf |= ninf;
    }
}

// One entry, the careful way (the scalar tail).
template <int F>
__device__ __forceinline__ void online_add(Online &a, float x) {
    if (x == CE_NEG_INF) {
        sum_add<F>(a, x);
        return;  // probability 0, contributes nothing else
    }
    if (a.m == CE_NEG_INF || x > a.m) {
        online_rebase<F>(a, x);  // a NaN first element makes m NaN: the row is poisoned, as it must be
        sum_add<F>(a, x);
        return;
    }
    sum_add<F>(a, x);
    if (x == a.m) {  // a tie, counted exactly (also when both are +inf, where x - m would be NaN)
        a.r += 1.0f;
        return;
    }
    const float e = expf(x - a.m);  // NaN for a NaN x: r and u become NaN
    a.r += e;
    if (F & CE_ENTROPY) a.u += e * (a.m - x);
}

#define CE_LOG2E 1.4426950408889634f

// e^t for t <= 0 as 2^(t·log2 e) on the special function unit. The argument is rounded relative to t, so
// the result is within ~|t|·1e-7 relative (plus 2 ulp) of e^t: 4e-6 at worst where e^t still counts
// (t > -88), far inside the kernel's 1e-5 tolerance, at a fraction of expf's instruction count.
__device__ __forceinline__ float exp_nonpositive(float t) { return ex2_approx(t * CE_LOG2E); }

// Add N values at once, without a data-dependent branch over the elements: a warp whose threads raise
// their running max at different chunks (most chunks early in a row, for some thread of 32) would
// otherwise run a careful per-element path and the cheap one both. Per element: a subtraction, a clamp,
// one ex2, a tie test and two adds (one without the entropy). The new max's own term stays implicit:
// elements equal to the max are counted (exactly) instead of summed, so a tiny r is never added to 1.
template <int F, int N>
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
            if (F & CE_ENTROPY) a.u = c * (a.u + (m - a.m) * s);
            rebase_sum<F>(a, m);
            a.r = c * s;  // the old max's term is explicit now
        }
        a.m = m;
    }
    if (a.m == CE_NEG_INF) {  // all -inf so far, or -inf beside NaN (which fmaxf dropped)
        bool nan_seen = false;
#pragma unroll
        for (int k = 0; k < N; ++k) nan_seen |= v[k] != v[k];
        sum_add_chunk<F, N>(a, v);
        if (nan_seen) a.m = __int_as_float(0x7fc00000);  // poisons every later merge and output
        return;
    }
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
        if (F & CE_ENTROPY) a.u = fmaf(e, fminf(-t, 1e30f), a.u);
    }
    sum_add_chunk<F, N>(a, v);
    // Each element equal to the max is a term of exactly 1, less the implicit one of a new max.
    a.r += (float)(ties - (raised ? 1 : 0));
}

template <int F>
__device__ __forceinline__ Online online_merge(Online a, Online b) {
    if (F & CE_EXTRAS) {
        // The first maximum of the raw logits: the larger, or on a tie the lower index.
        const bool take = b.am > a.am || (b.am == a.am && b.arg < a.arg);
        const float am = take ? b.am : a.am;
        const i32 arg = take ? b.arg : a.arg;
        a.am = b.am = am;
        a.arg = b.arg = arg;
        a.ninf |= b.ninf;
        b.ninf = a.ninf;
    }
    if (a.m == CE_NEG_INF) {
        if (F & CE_EXTRAS) b.n += a.n;  // a holds -inf entries only (n = 0) or nothing
        return b;
    }
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
    Online out = a;
    out.r = a.r + c * sb;
    if (F & CE_ENTROPY) out.u = a.u + c * (b.u + (a.m - b.m) * sb);
    if (F & CE_EXTRAS) {
        rebase_sum<F>(b, a.m);
        out.d = a.d + b.d;
        out.n = a.n + b.n;
    }
    return out;
}

template <int F>
__device__ __forceinline__ Online online_shfl_xor(Online a, int offset) {
    Online b = a;
    b.m = __shfl_xor_sync(0xffffffffu, a.m, offset);
    b.r = __shfl_xor_sync(0xffffffffu, a.r, offset);
    if (F & CE_ENTROPY) b.u = __shfl_xor_sync(0xffffffffu, a.u, offset);
    if (F & CE_EXTRAS) {
        b.d = __shfl_xor_sync(0xffffffffu, a.d, offset);
        b.n = __shfl_xor_sync(0xffffffffu, a.n, offset);
        b.ninf = __shfl_xor_sync(0xffffffffu, a.ninf, offset);
        b.am = __shfl_xor_sync(0xffffffffu, a.am, offset);
        b.arg = __shfl_xor_sync(0xffffffffu, a.arg, offset);
    }
    return b;
}

// The block's combined statistics, in every thread. `scratch` holds one Online per warp.
template <int F>
__device__ __forceinline__ Online online_block_reduce(Online a, Online *scratch) {
    const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const unsigned warps = (blockDim.x + 31) / 32;
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) a = online_merge<F>(a, online_shfl_xor<F>(a, offset));
    if (lane == 0) scratch[warp] = a;
    __syncthreads();
    Online total = lane < warps ? scratch[lane] : online_empty();
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2)
        total = online_merge<F>(total, online_shfl_xor<F>(total, offset));
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

// Gemma's logit softcap C·tanh(x / C) (`cap` > 0; 0: none), and its derivative 1 - tanh².
__device__ __forceinline__ float softcapped(float x, float cap, float inv_cap) {
    return cap > 0.0f ? cap * tanhf(x * inv_cap) : x;
}

// A chunk of raw logits at indices base..base+N: the argmax first (on the raw values), then the softcap,
// then the statistics. The argmax costs the chunk's max (N - 1 fmaxf); the index is looked for only when
// the chunk raises this thread's max (rarely, after a row's first chunks), so it stays the first
// occurrence: within the chunk by the search, across chunks because each thread's indices only grow.
template <int F, int N>
__device__ __forceinline__ void add_chunk(Online &a, float (&v)[N], u64 base, float cap, float inv_cap) {
    if (F & CE_EXTRAS) {
        float raw_max = v[0];
#pragma unroll
        for (int k = 1; k < N; ++k) raw_max = fmaxf(raw_max, v[k]);
        // A NaN is never the max (fmaxf drops it; a chunk of NaN gives NaN, which compares false): such a
        // row is poisoned, its argmax -1.
        if (raw_max > a.am || (a.arg == CE_NO_ARG && raw_max == a.am)) {
            int first = 0;
#pragma unroll
            for (int k = N - 1; k >= 0; --k) first = v[k] == raw_max ? k : first;
            a.am = raw_max;
            a.arg = (i32)(base + first);
        }
        if (cap > 0.0f) {
#pragma unroll
            for (int k = 0; k < N; ++k) v[k] = cap * tanhf(v[k] * inv_cap);
        }
    }
    online_add_chunk<F, N>(a, v);
}

// Vector `v` of a row as floats; with KEEP also stored, as read, at vector `v` of `keep`.
template <typename T, int N, bool KEEP>
__device__ __forceinline__ void load_vector(const Vector<T, N> *xv, u64 v, T *keep, float (&out)[N]) {
    if (KEEP) {
        const Vector<T, N> p = xv[v];
        reinterpret_cast<Vector<T, N> *>(keep)[v] = p;
        unpack<T, N>(&p, out);
    } else {
        unpack<T, N>(xv + v, out);
    }
}

// This thread's share of the row's statistics: 16-byte loads where the row is aligned, then the tail.
// `x` holds columns base..base + vocab of the row (argmax indices count from the row's start). With KEEP,
// every element read is also stored at the same index of `keep` (shared memory: the one-read kernels),
// by the thread that reads it.
template <typename T, int F, bool KEEP = false>
__device__ __forceinline__ Online row_statistics(const T *x, u64 vocab, float cap, u64 base = 0,
                                                 T *keep = nullptr) {
    constexpr int N = Vec16<T>::N;
    const float inv_cap = cap > 0.0f ? 1.0f / cap : 0.0f;
    Online local = online_empty();
    u64 tail = 0;
    if (is_vector_aligned<T, N>(x)) {
        const u64 vectors = vocab / N;
        const Vector<T, N> *xv = reinterpret_cast<const Vector<T, N> *>(x);
        const u64 stride = blockDim.x;
        u64 v = threadIdx.x;
        // LOADS 16-byte loads in flight per thread before any is used: the loop is bound by memory
        // latency, and one load per iteration leaves the SM with too few bytes outstanding. The full
        // variant, bound by its arithmetic, keeps half as many (and its registers within budget).
        constexpr int LOADS = (F & CE_EXTRAS) ? CE_LOADS / 2 : CE_LOADS;
        for (; v + (LOADS - 1) * stride < vectors; v += LOADS * stride) {
            float values[LOADS][N];
#pragma unroll
            for (int l = 0; l < LOADS; ++l) load_vector<T, N, KEEP>(xv, v + l * stride, keep, values[l]);
#pragma unroll
            for (int l = 0; l < LOADS; ++l)
                add_chunk<F, N>(local, values[l], base + (v + l * stride) * N, cap, inv_cap);
        }
        for (; v < vectors; v += stride) {
            float values[N];
            load_vector<T, N, KEEP>(xv, v, keep, values);
            add_chunk<F, N>(local, values, base + v * N, cap, inv_cap);
        }
        tail = vectors * N;
    }
    for (u64 i = tail + threadIdx.x; i < vocab; i += blockDim.x) {
        const T raw = x[i];
        if (KEEP) keep[i] = raw;
        float value = to_float(raw);
        if (F & CE_EXTRAS) {
            argmax_add(local, value, (i32)(base + i));
            value = softcapped(value, cap, inv_cap);
        }
        online_add<F>(local, value);
    }
    return local;
}

// Write `value(i)` for every i in [0, vocab) of row g, 16-byte stores where aligned.
template <typename T, typename Fn>
__device__ __forceinline__ void write_row(T *g, u64 vocab, Fn value) {
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
template <typename T, typename Fn>
__device__ __forceinline__ void transform_row(const T *x, T *g, u64 vocab, Fn f) {
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

// The label of a row, and whether the row is trained (its mask byte set, or no mask; its label not the
// ignore index).
__device__ __forceinline__ i64 ce_label(const CeArgs &a, u64 row) {
    return a.labels_are_i64 ? ((const i64 *)a.labels)[row] : (i64)((const i32 *)a.labels)[row];
}
__device__ __forceinline__ bool ce_trained(const CeArgs &a, u64 row, i64 label) {
    return (a.mask == nullptr || a.mask[row] != 0) && !(a.use_ignore_index && label == a.ignore_index);
}

// How the summed loss is normalized: CE_NORM_* (abi.cuh), from src/loss `Normalization`. `count` is
// [trained rows, correct rows, documents with trained rows].
__device__ __forceinline__ float ce_denominator(const CeArgs &a) {
    if (a.norm_mode == CE_NORM_TOKEN_MEAN) return (float)a.count[0];
    if (a.norm_mode == CE_NORM_SEQUENCE_MEAN) return (float)a.count[2];
    if (a.norm_mode == CE_NORM_FIXED) return a.norm_fixed;
    return 1.0f;
}

// The document of `row`: the d with cu[d] <= row < cu[d + 1], by bisection over documents + 1 boundaries
// (always in [0, documents), whatever the boundaries hold: masked_ce_documents reports bad ones).
__device__ __forceinline__ u64 ce_document(const i32 *__restrict__ cu, u64 documents, u64 row) {
    u64 lo = 0, hi = documents;
    while (hi - lo > 1) {
        const u64 mid = lo + (hi - lo) / 2;
        if ((i64)cu[mid] <= (i64)row) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    return lo;
}

// One element of a trained row's gradient, for the raw logit `v`: coef · b · dx'/dx with x' = C·tanh(v / C)
// (`cap` = C, 0: none, x' = v) and b = label_term at the label, zf · e^((x' - m) - log s) - eps_v elsewhere.
// Written once for the fused backward and the vocabulary-parallel one.
__device__ __forceinline__ float ce_grad_element(float v, bool is_label, float cap, float inv_cap, float m,
                                                 float log_s, float zf, float label_term, float eps_v,
                                                 float coef) {
    float xc = v, dcap = 1.0f;
    if (cap > 0.0f) {
        const float u = v * inv_cap;
        xc = cap * tanhf(u);
        // 1 - tanh² u = 4e / (1 + e)² with e = e^(-2|u|): no cancellation where tanh u nears 1.
        const float e = exp_nonpositive(-2.0f * fabsf(u));
        dcap = 4.0f * e / ((1.0f + e) * (1.0f + e));
    }
    const float b = is_label ? label_term : zf * exp_nonpositive((xc - m) - log_s) - eps_v;
    return coef * (b * dcap);
}

// ---- One row's targets, outputs and gradient parameters, written once for every row kernel.

// The upstream gradient over the normalization's denominator (0 when nothing is trained). The upstream
// gradient comes from the device when given (a framework's grad_output): no host read.
__device__ __forceinline__ float ce_scale_base(const CeArgs &a) {
    const float denominator = ce_denominator(a);
    const float up = a.upstream_ptr != nullptr ? *a.upstream_ptr : a.upstream;
    return denominator > 0.0f ? up / denominator : 0.0f;
}

// A row's label and whether its logits are read: trained, with a label in [0, vocab).
struct CeRowTarget {
    i64 label;
    bool trained;
    bool read;
};

__device__ __forceinline__ CeRowTarget ce_row_target(const CeArgs &a, u64 row) {
    CeRowTarget t;
    t.label = ce_label(a, row);
    t.trained = ce_trained(a, row, t.label);
    t.read = t.trained && t.label >= 0 && (u64)t.label < a.vocab;
    return t;
}

// A row that is not read: not trained (outputs 0, argmax -1) or trained with a bad label, reported through
// the flag and never dereferenced: NaN everywhere, so the loss shows it even to a caller who never reads
// the flag (which would synchronize). Writes the outputs when `write` (one thread of the row's blocks);
// returns what its gradient row holds.
template <int F>
__device__ __forceinline__ float ce_skip_row(const CeArgs &a, u64 row, const CeRowTarget &t, bool write) {
    const float fill = t.trained ? __int_as_float(0x7fc00000) : 0.0f;
    if (write) {
        if (t.trained) atomicOr(a.error_flag, (u32)CE_ERR_LABEL);
        a.row_loss[row] = fill;
        if (a.row_z) a.row_z[row] = fill;
        if (a.log_probs) a.log_probs[row] = fill;
        if (a.entropy) a.entropy[row] = fill;
        if (a.lse) a.lse[row] = fill;
        if ((F & CE_EXTRAS) && a.argmax) a.argmax[row] = -1;
    }
    return fill;
}

// What a trained row's gradient needs from its statistics; element(i, x_i) is d loss / d x_i.
struct CeRowGrad {
    u64 label;
    float cap, inv_cap, m, log_s, zf, label_term, eps_v, scale;
    __device__ __forceinline__ float element(u64 i, float v) const {
        return ce_grad_element(v, i == label, cap, inv_cap, m, log_s, zf, label_term, eps_v, scale);
    }
};

// A trained row's outputs from the statistics of all its columns (written when `write`: one thread of
// the row's blocks) and its gradient's parameters. `x_label_raw` is the label's logit as stored.
template <int F>
__device__ __forceinline__ CeRowGrad ce_finish_row(const CeArgs &a, u64 row, const CeRowTarget &t,
                                                   const Online &total, float x_label_raw, float scale_base,
                                                   bool write) {
    const float nan = __int_as_float(0x7fc00000);
    const u64 vocab = a.vocab;
    const float s = a.z_loss;
    const float eps = (F & CE_EXTRAS) ? a.label_smoothing : 0.0f;
    const float cap = (F & CE_EXTRAS) ? a.softcap : 0.0f;
    const float inv_cap = cap > 0.0f ? 1.0f / cap : 0.0f;
    const float x_label = softcapped(x_label_raw, cap, inv_cap);
    const float log_s = log1pf(total.r);
    const float log_prob = (x_label - total.m) - log_s;
    const float lse = total.m + log_s;
    // The row's weight; under per-sequence means divided by its document's trained rows.
    float w = a.weights ? a.weights[row] : 1.0f;
    if (a.norm_mode == CE_NORM_SEQUENCE_MEAN) {
        // Documents are found by the row's index in the batch (a launch may cover a chunk of rows).
        const u64 batch_row = a.row_offset + row;
        const float in_document = a.cu_seqlens
                                      ? (float)a.doc_trained[ce_document(a.cu_seqlens, a.documents, batch_row)]
                                      : (float)a.count[0];
        w = w / in_document;
    }
    float ce = -log_prob;
    if ((F & CE_EXTRAS) && eps > 0.0f) {
        // mean_j(-log p_j) = lse - mean(x) = log s + mean(m - x); a -inf entry makes it +inf.
        const float smooth = log_s + (total.ninf ? CE_POS_INF : total.d / (float)vocab);
        ce = (1.0f - eps) * ce + eps * smooth;
    }
    const float z = s != 0.0f ? s * lse * lse : 0.0f;
    if (write) {
        a.row_loss[row] = w * (ce + z);
        if (a.row_z) a.row_z[row] = w * z;
        if (a.log_probs) a.log_probs[row] = log_prob;
        // A row of -inf only has no distribution: NaN (its lse stays -inf, its log-prob is NaN).
        if ((F & CE_ENTROPY) && a.entropy)
            a.entropy[row] = total.m == CE_NEG_INF ? nan : log_s + total.u / (1.0f + total.r);
        if (a.lse) a.lse[row] = lse;
        if ((F & CE_EXTRAS) && a.argmax) {
            const bool poisoned = total.r != total.r || total.m != total.m;
            a.argmax[row] = poisoned ? -1 : (total.arg == CE_NO_ARG ? 0 : total.arg);
        }
    }
    // The gradient (unused, and dropped by the compiler, in the forward kernels).
    // p_i = e^((x_i - m) - log s): x_i - m first, so no f32 rounding of a large m + log s creeps in.
    // At the label, p - 1 = -(r - expm1(x_label - m)) / (1 + r): two non-negative terms instead of
    // 1 - p, which would cancel when the label holds nearly all the mass.
    // With smoothing the label's term is (1 + 2s·lse)·p - (1 - ε) - ε/V: summed from p - 1 where p
    // is large (no cancellation in p - 1), from p itself where it is small (1 - ε may be tiny, and
    // p - 1 + ε would lose p to the rounding of 1).
    const float zf = s != 0.0f ? 1.0f + 2.0f * s * lse : 1.0f;
    const float eps_v = eps > 0.0f ? eps / (float)vocab : 0.0f;
    const float p_label = exp_nonpositive((x_label - total.m) - log_s);
    float label_term;
    if (p_label >= 0.5f) {
        label_term = -(total.r - expm1f(x_label - total.m)) / (1.0f + total.r);
        if (s != 0.0f) label_term += 2.0f * s * lse * p_label;
        if (eps > 0.0f) label_term += eps - eps_v;
    } else {
        label_term = zf * p_label - (1.0f - eps) - eps_v;
    }
    return CeRowGrad{(u64)t.label, cap, inv_cap, total.m, log_s, zf, label_term, eps_v, scale_base * w};
}
