// Fused masked cross-entropy: loss, per-token log-probs, entropy, logsumexp, argmax and (optionally) the
// gradient over the trained rows only, one thread block per row, with PyTorch's ignore_index, z-loss,
// label smoothing and Gemma's logit softcap. Must agree with src/backend/cpu/loss.rs (the f64 oracle).
//
// Non-finite logits follow PyTorch (and the oracle): a NaN poisons the row's outputs and gradient; a row
// of -inf has lse -inf and NaN elsewhere; a +inf gives lse +inf, log-prob -inf (NaN for a +inf label),
// entropy NaN, gradient NaN at +inf entries.
//
// Forward reads each trained row once, keeping an online (max m, Σ e^(x-m), Σ e^(x-m)(m-x)) triple per
// thread, merged across the block; from it:
//   log Σ e^x = m + log s,  log p(label) = (x_label - m) - log s,  entropy = log s + u / s.
// Both entropy terms are non-negative (m - x >= 0), so a peaked row loses no precision to cancellation.
// Three variants per dtype keep work not asked for out of the loop: `lean` (no entropy accumulator),
// `entropy`, and `full` (entropy, argmax of the raw logits, Σ (m - x) for label smoothing, the softcap).
// Forward+backward reads the row a second time (from L2 when it is still there) and writes the gradient
// once, in f32, rounded once to the logits' dtype:
//   scale · w · [(1 + 2s·lse)·p_i - (1 - ε)·1[i = label] - ε / V] · dx'_i/dx_i.
// Rows not trained are never read: their outputs are 0 (argmax -1), their gradient rows zeros.
#include "ce_row.cuh"

// `grad` may alias `logits` (in-place backward), so neither is __restrict__.
template <typename T, bool BACKWARD, int F>
__device__ __forceinline__ void masked_ce_impl(const CeArgs &a) {
    __shared__ Online scratch[32];
    const T *logits = (const T *)a.logits;
    T *grad = (T *)a.grad;
    const u64 vocab = a.vocab;
    const float cap = (F & CE_EXTRAS) ? a.softcap : 0.0f;
    const float scale_base = BACKWARD ? ce_scale_base(a) : 0.0f;
    for (u64 row = blockIdx.x; row < a.rows; row += gridDim.x) {
        const T *x = logits + row * a.logits_stride;
        const CeRowTarget target = ce_row_target(a, row);
        if (!target.read) {
            const float fill = ce_skip_row<F>(a, row, target, threadIdx.x == 0);
            if (BACKWARD) write_row(grad + row * a.grad_stride, vocab, [&](u64) { return fill; });
            continue;
        }
        // Read before any thread can overwrite the row in place.
        const float x_label_raw = to_float(x[target.label]);
        const Online total = online_block_reduce<F>(row_statistics<T, F>(x, vocab, cap), scratch);
        const CeRowGrad rg = ce_finish_row<F>(a, row, target, total, x_label_raw, scale_base, threadIdx.x == 0);
        if (BACKWARD) {
            transform_row(x, grad + row * a.grad_stride, vocab, [&](u64 i, float v) { return rg.element(i, v); });
        }
    }
}

// Vocabulary-parallel, forward: each trained row's statistics over this rank's columns (`vocab` of them,
// the first being column `column_start` of the whole vocabulary) as a CePartial, always with everything a
// merge needs (the entropy accumulator, the spread, the argmax; the softcap applied). Rows not trained
// are not read and their partial is not written.
template <typename T>
__device__ __forceinline__ void masked_ce_shard_fwd_impl(const CeArgs &a) {
    constexpr int F = CE_ENTROPY | CE_EXTRAS;
    __shared__ Online scratch[32];
    const T *logits = (const T *)a.logits;
    const float cap = a.softcap, inv_cap = cap > 0.0f ? 1.0f / cap : 0.0f;
    for (u64 row = blockIdx.x; row < a.rows; row += gridDim.x) {
        const i64 label = ce_label(a, row);
        if (!ce_trained(a, row, label)) continue;
        const T *x = logits + row * a.logits_stride;
        const Online total = online_block_reduce<F>(row_statistics<T, F>(x, a.vocab, cap), scratch);
        if (threadIdx.x == 0) {
            const bool poisoned = total.r != total.r || total.m != total.m;
            const i64 local = label - (i64)a.column_start;
            const bool has_label = local >= 0 && (u64)local < a.vocab;
            u32 flags = has_label ? (u32)CE_PART_LABEL : 0u;
            if (poisoned) {
                flags |= CE_PART_NAN;
            } else if (total.m == CE_POS_INF) {
                flags |= CE_PART_POS_INF;
            }
            if (total.ninf) flags |= CE_PART_NEG_INF;
            CePartial p;
            p.max = total.m;
            p.r = total.r;
            p.u = total.u;
            p.spread = total.d;
            p.label = has_label ? softcapped(to_float(x[local]), cap, inv_cap) : 0.0f;
            p.argmax_value = total.am;
            p.argmax = poisoned ? -1 : (total.arg == CE_NO_ARG ? 0 : total.arg);
            p.flags = flags;
            a.partials[row] = p;
        }
    }
}

// Vocabulary-parallel, backward: the gradient of this rank's columns from each trained row's merged
// statistics (CeShardRow), in place or into `grad`; rows not trained get zeros.
template <typename T>
__device__ __forceinline__ void masked_ce_shard_bwd_impl(const CeArgs &a) {
    const T *logits = (const T *)a.logits;
    T *grad = (T *)a.grad;
    const float cap = a.softcap, inv_cap = cap > 0.0f ? 1.0f / cap : 0.0f;
    for (u64 row = blockIdx.x; row < a.rows; row += gridDim.x) {
        const i64 label = ce_label(a, row);
        T *g = grad + row * a.grad_stride;
        if (!ce_trained(a, row, label)) {
            write_row(g, a.vocab, [&](u64) { return 0.0f; });
            continue;
        }
        const CeShardRow st = a.shard_rows[row];
        const i64 local = label - (i64)a.column_start;
        transform_row(logits + row * a.logits_stride, g, a.vocab, [&](u64 i, float v) {
            return ce_grad_element(v, (i64)i == local, cap, inv_cap, st.m, st.log_s, st.zf, st.label_term,
                                   st.eps_v, st.coef);
        });
    }
}

#define CE_KERNEL(op, suffix, variant, T, BACKWARD, F)                                         \
    extern "C" __global__ void __launch_bounds__(CE_BLOCK)                                     \
        masked_ce_##op##_##suffix##_##variant(const CeArgs a) {                                \
        masked_ce_impl<T, BACKWARD, F>(a);                                                     \
    }

#define CE_KERNELS(suffix, T)                                                                  \
    CE_KERNEL(fwd, suffix, lean, T, false, 0)                                                  \
    CE_KERNEL(fwd, suffix, entropy, T, false, CE_ENTROPY)                                      \
    CE_KERNEL(fwd, suffix, full, T, false, CE_ENTROPY | CE_EXTRAS)                             \
    CE_KERNEL(fwd_bwd, suffix, lean, T, true, 0)                                               \
    CE_KERNEL(fwd_bwd, suffix, entropy, T, true, CE_ENTROPY)                                   \
    CE_KERNEL(fwd_bwd, suffix, full, T, true, CE_ENTROPY | CE_EXTRAS)                          \
    extern "C" __global__ void __launch_bounds__(CE_BLOCK) masked_ce_shard_fwd_##suffix(const CeArgs a) { \
        masked_ce_shard_fwd_impl<T>(a);                                                        \
    }                                                                                          \
    extern "C" __global__ void __launch_bounds__(CE_BLOCK) masked_ce_shard_bwd_##suffix(const CeArgs a) { \
        masked_ce_shard_bwd_impl<T>(a);                                                        \
    }

CE_KERNELS(f32, float)
CE_KERNELS(f16, f16)
CE_KERNELS(bf16, bf16)

// The number of trained rows, by one block in a fixed order (deterministic), before the main kernel so
// that a token-mean gradient knows its denominator without a host round trip. Clears the error flag and
// the documents counter (masked_ce_documents adds to it); without cu_seqlens the batch is one document.
extern "C" __global__ void __launch_bounds__(CE_BLOCK) masked_ce_count(const CeArgs a) {
    __shared__ u32 scratch[32];
    u32 mine = 0;
    for (u64 i = threadIdx.x; i < a.rows; i += blockDim.x) mine += ce_trained(a, i, ce_label(a, i)) ? 1u : 0u;
    const u32 total = block_reduce(mine, [](u32 x, u32 y) { return x + y; }, 0u, scratch);
    if (threadIdx.x == 0) {
        a.count[0] = total;
        a.count[1] = 0;
        a.count[2] = a.cu_seqlens == nullptr && total > 0 ? 1u : 0u;
        *a.error_flag = 0;  // before the main kernel, on the same stream, may set it
    }
}

// With cu_seqlens: one block per document counts its trained rows (for the per-sequence mean) and the
// documents that have any; boundaries that do not rise from 0 to rows set CE_ERR_CU_SEQLENS and count
// nothing (they are never used to address memory).
extern "C" __global__ void __launch_bounds__(CE_BLOCK) masked_ce_documents(const CeArgs a) {
    __shared__ u32 scratch[32];
    const i32 *__restrict__ cu = a.cu_seqlens;
    for (u64 d = blockIdx.x; d < a.documents; d += gridDim.x) {
        const i64 start = cu[d], end = cu[d + 1];
        bool ok = start >= 0 && start <= end && end <= (i64)a.rows;
        if (d == 0) ok = ok && start == 0;
        if (d + 1 == a.documents) ok = ok && end == (i64)a.rows;
        u32 mine = 0;
        if (ok) {
            for (i64 i = start + threadIdx.x; i < end; i += blockDim.x)
                mine += ce_trained(a, (u64)i, ce_label(a, (u64)i)) ? 1u : 0u;
        }
        const u32 total = block_reduce(mine, [](u32 x, u32 y) { return x + y; }, 0u, scratch);
        if (threadIdx.x == 0) {
            a.doc_trained[d] = total;
            if (!ok) atomicOr(a.error_flag, (u32)CE_ERR_CU_SEQLENS);
            if (total > 0) atomicAdd(&a.count[2], 1u);
        }
    }
}

// Σ row_loss and Σ row_z in f64 in a fixed order, the normalized loss, and the rows whose argmax is their
// label: scalars = [sum, loss, z_sum], count[1] = correct rows.
extern "C" __global__ void __launch_bounds__(CE_BLOCK) masked_ce_reduce(const CeArgs a) {
    __shared__ double scratch[32];
    __shared__ u32 scratch_u[32];
    double loss = 0.0, z = 0.0;
    u32 correct = 0;
    for (u64 i = threadIdx.x; i < a.rows; i += blockDim.x) {
        loss += (double)a.row_loss[i];
        if (a.row_z) z += (double)a.row_z[i];
        // Rows not trained, and poisoned ones, have argmax -1: never counted.
        if (a.argmax) correct += a.argmax[i] >= 0 && (i64)a.argmax[i] == ce_label(a, i) ? 1u : 0u;
    }
    const double sum = block_reduce(loss, [](double x, double y) { return x + y; }, 0.0, scratch);
    const double z_sum = block_reduce(z, [](double x, double y) { return x + y; }, 0.0, scratch);
    const u32 hits = block_reduce(correct, [](u32 x, u32 y) { return x + y; }, 0u, scratch_u);
    if (threadIdx.x == 0) {
        const float denominator = ce_denominator(a);
        a.scalars[0] = (float)sum;
        // A mean over no tokens is 0, never NaN.
        a.scalars[1] = denominator > 0.0f ? (float)(sum / (double)denominator) : 0.0f;
        a.scalars[2] = (float)z_sum;
        a.count[1] = hits;
    }
}
