// The unfused baseline the fused masked cross-entropy is measured against: what eager PyTorch does for
// `F.cross_entropy(logits, labels, reduction="none")[mask].sum()` and its backward, as separate kernels
// with the intermediate log-softmax written out in f32:
//   unfused_log_softmax_<dtype>  every row: max, sum, then log_softmax written [N, V] f32
//   unfused_gather_nll           per row: -logsm[label] · mask
//   unfused_sum                  one block: Σ
//   unfused_softmax_grad_<dtype> every row: (exp(logsm) - onehot) · mask · scale, written in <dtype>
// Used by benches and `sft-collate bench loss` only.
#include "common.cuh"

#define UNFUSED_BLOCK 256

template <typename T>
__device__ __forceinline__ void log_softmax_impl(const T *__restrict__ logits, u64 rows, u64 vocab,
                                                 float *__restrict__ out) {
    __shared__ float scratch[32];
    for (u64 row = blockIdx.x; row < rows; row += gridDim.x) {
        const T *x = logits + row * vocab;
        float m = -__int_as_float(0x7f800000);
        for (u64 i = threadIdx.x; i < vocab; i += blockDim.x) m = fmaxf(m, to_float(x[i]));
        m = block_reduce(m, [](float a, float b) { return fmaxf(a, b); }, -__int_as_float(0x7f800000), scratch);
        float s = 0.0f;
        for (u64 i = threadIdx.x; i < vocab; i += blockDim.x) s += expf(to_float(x[i]) - m);
        s = block_reduce(s, [](float a, float b) { return a + b; }, 0.0f, scratch);
        const float lse = m + logf(s);
        for (u64 i = threadIdx.x; i < vocab; i += blockDim.x) out[row * vocab + i] = to_float(x[i]) - lse;
    }
}

template <typename T>
__device__ __forceinline__ void softmax_grad_impl(const float *__restrict__ logsm, const i64 *__restrict__ labels,
                                                  const u8 *__restrict__ mask, u64 rows, u64 vocab, float scale,
                                                  T *__restrict__ grad) {
    for (u64 row = blockIdx.x; row < rows; row += gridDim.x) {
        const float s = mask[row] ? scale : 0.0f;
        for (u64 i = threadIdx.x; i < vocab; i += blockDim.x) {
            const float g = s * (expf(logsm[row * vocab + i]) - (i == (u64)labels[row] ? 1.0f : 0.0f));
            store_float(g, &grad[row * vocab + i]);
        }
    }
}

#define UNFUSED_KERNELS(suffix, T)                                                                  \
    extern "C" __global__ void __launch_bounds__(UNFUSED_BLOCK)                                     \
        unfused_log_softmax_##suffix(const T *__restrict__ logits, u64 rows, u64 vocab,            \
                                     float *__restrict__ out) {                                     \
        log_softmax_impl<T>(logits, rows, vocab, out);                                              \
    }                                                                                               \
    extern "C" __global__ void __launch_bounds__(UNFUSED_BLOCK) unfused_softmax_grad_##suffix(     \
        const float *__restrict__ logsm, const i64 *__restrict__ labels, const u8 *__restrict__ mask, \
        u64 rows, u64 vocab, float scale, T *__restrict__ grad) {                                   \
        softmax_grad_impl<T>(logsm, labels, mask, rows, vocab, scale, grad);                        \
    }

UNFUSED_KERNELS(f32, float)
UNFUSED_KERNELS(f16, f16)
UNFUSED_KERNELS(bf16, bf16)

extern "C" __global__ void __launch_bounds__(UNFUSED_BLOCK)
    unfused_gather_nll(const float *__restrict__ logsm, const i64 *__restrict__ labels,
                       const u8 *__restrict__ mask, u64 rows, u64 vocab, float *__restrict__ nll) {
    const u64 row = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    if (row < rows) nll[row] = mask[row] ? -logsm[row * vocab + (u64)labels[row]] : 0.0f;
}

extern "C" __global__ void __launch_bounds__(UNFUSED_BLOCK)
    unfused_sum(const float *__restrict__ values, u64 n, float *__restrict__ out) {
    __shared__ float scratch[32];
    float mine = 0.0f;
    for (u64 i = threadIdx.x; i < n; i += blockDim.x) mine += values[i];
    const float total = block_reduce(mine, [](float a, float b) { return a + b; }, 0.0f, scratch);
    if (threadIdx.x == 0) *out = total;
}
