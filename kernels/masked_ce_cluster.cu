// Fused masked cross-entropy forward+backward in one read of each trained row: a thread-block cluster per
// row (sm_90+; masked_ce.cu's two-pass kernels serve other architectures and rows that do not fit), each
// of its CTAs holding a slice of the row in shared memory. A CTA reads its slice from global memory once,
// keeping it on chip while it computes the slice's online statistics; the CTAs exchange their statistics
// through distributed shared memory (each merges all of them in rank order, so every CTA holds the same
// row statistics, bit for bit); each then writes its slice's gradient from shared memory. Global traffic
// per trained row: one read and one write, the floor (masked_ce.cu reads each row twice).
//
// Launch: grid = clusters × ctas CTAs of CE_BLOCK threads in clusters of `ctas` along x; CTA r of a
// cluster owns columns [r·slice, min((r + 1)·slice, vocab)) with slice = cluster_slice (a multiple of 8,
// so that each slice of a 16-byte aligned row is 16-byte aligned); dynamic shared memory
// CE_CLUSTER_HEAD + slice · sizeof(T) bytes. Clusters walk rows grid-stride. The outputs, the gradient
// and the mathematics are masked_ce.cu's (ce_row.cuh holds what both write).
#include "ce_row.cuh"
#include "cluster.cuh"

// `grad` may alias `logits` (in place): every CTA reads the label's logit before the first cluster
// barrier, and writes only its own slice, after it.
template <typename T, int F>
__device__ __forceinline__ void masked_ce_cluster_impl(const CeArgs &a) {
    static_assert(33 * sizeof(Online) <= CE_CLUSTER_HEAD, "the head holds the scratch and the partial");
    unsigned char *smem = dynamic_smem();
    Online *scratch = reinterpret_cast<Online *>(smem);  // 32 per-warp slots (the block reduction)
    Online *partial = scratch + 32;                     // this CTA's share of the row, read by every CTA
    T *keep = reinterpret_cast<T *>(smem + CE_CLUSTER_HEAD);
    const T *logits = (const T *)a.logits;
    T *grad = (T *)a.grad;
    const u32 rank = cluster_ctarank(), ctas = cluster_nctarank();
    const u64 begin = (u64)rank * a.cluster_slice < a.vocab ? (u64)rank * a.cluster_slice : a.vocab;
    const u64 end = begin + a.cluster_slice < a.vocab ? begin + a.cluster_slice : a.vocab;
    const float cap = (F & CE_EXTRAS) ? a.softcap : 0.0f;
    const float scale_base = ce_scale_base(a);
    const bool writer = rank == 0 && threadIdx.x == 0;
    for (u64 row = cluster_index(); row < a.rows; row += cluster_count()) {
        const T *x = logits + row * a.logits_stride;
        T *g = grad + row * a.grad_stride;
        const CeRowTarget target = ce_row_target(a, row);
        if (!target.read) {
            // The same decision in every CTA of the cluster: none meets the barriers below.
            const float fill = ce_skip_row<F>(a, row, target, writer);
            write_row(g + begin, end - begin, [&](u64) { return fill; });
            continue;
        }
        const float x_label_raw = to_float(x[target.label]);
        const Online mine = online_block_reduce<F>(
            row_statistics<T, F, true>(x + begin, end - begin, cap, begin, keep), scratch);
        if (threadIdx.x == 0) *partial = mine;
        cluster_sync();  // every CTA's partial is written (and its slice kept)
        Online total = online_empty();
        for (u32 r = 0; r < ctas; ++r) total = online_merge<F>(total, *cluster_map(partial, r));
        cluster_sync();  // every CTA has read every partial: the next row may overwrite them
        const CeRowGrad rg = ce_finish_row<F>(a, row, target, total, x_label_raw, scale_base, writer);
        transform_row(keep, g + begin, end - begin,
                      [&](u64 i, float v) { return rg.element(begin + i, v); });
        // The next row's slice overwrites `keep`, perhaps through other threads (the vector paths of the
        // read and the write differ when only one of the rows is aligned).
        __syncthreads();
    }
}

#define CE_CLUSTER_KERNEL(suffix, variant, T, F)                                                   \
    extern "C" __global__ void __launch_bounds__(CE_BLOCK)                                         \
        masked_ce_fwd_bwd_##suffix##_##variant##_cluster(const CeArgs a) {                         \
        masked_ce_cluster_impl<T, F>(a);                                                           \
    }

#define CE_CLUSTER_KERNELS(suffix, T)                         \
    CE_CLUSTER_KERNEL(suffix, lean, T, 0)                     \
    CE_CLUSTER_KERNEL(suffix, entropy, T, CE_ENTROPY)         \
    CE_CLUSTER_KERNEL(suffix, full, T, CE_ENTROPY | CE_EXTRAS)

CE_CLUSTER_KERNELS(f32, float)
CE_CLUSTER_KERNELS(f16, f16)
CE_CLUSTER_KERNELS(bf16, bf16)
