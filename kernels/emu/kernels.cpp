// The emulation backend's translation unit: the CUDA built-ins, every kernel family, and one extern "C"
// launch wrapper per kernel, with the same parameters as the kernel (so the Rust side passes exactly what
// it passes to cuLaunchKernel, with host pointers).
#include "emu/cuda_emu.h"

#include "collate.cu"
#include "masked_ce.cu"

#define COMMA ,
#define EMU_WRAPPER(kernel, params, args)                                                           \
    extern "C" void emu_##kernel(const EmuLaunch *cfg, params) {                                   \
        emu::launch(*cfg, [&] { kernel(args); });                                                  \
    }

EMU_WRAPPER(collate_i32, COLLATE_PARAMS(i32), COLLATE_ARGS)
EMU_WRAPPER(collate_i64, COLLATE_PARAMS(i64), COLLATE_ARGS)
EMU_WRAPPER(collate_packed_i32, COLLATE_PACKED_PARAMS(i32), COLLATE_PACKED_ARGS)
EMU_WRAPPER(collate_packed_i64, COLLATE_PACKED_PARAMS(i64), COLLATE_PACKED_ARGS)
EMU_WRAPPER(masked_ce_fwd_f32, CE_PARAMS(float), CE_ARGS)
EMU_WRAPPER(masked_ce_fwd_f16, CE_PARAMS(f16), CE_ARGS)
EMU_WRAPPER(masked_ce_fwd_bf16, CE_PARAMS(bf16), CE_ARGS)
EMU_WRAPPER(masked_ce_fwd_bwd_f32, CE_PARAMS(float), CE_ARGS)
EMU_WRAPPER(masked_ce_fwd_bwd_f16, CE_PARAMS(f16), CE_ARGS)
EMU_WRAPPER(masked_ce_fwd_bwd_bf16, CE_PARAMS(bf16), CE_ARGS)
EMU_WRAPPER(masked_ce_count, CE_COUNT_PARAMS, CE_COUNT_ARGS)
EMU_WRAPPER(masked_ce_reduce, CE_REDUCE_PARAMS, CE_REDUCE_ARGS)

// A test kernel for the shim itself: block reductions through shared memory and warp shuffles, the
// pattern the fused cross-entropy kernel uses. For each block b (blockDim.x a multiple of 32):
// out[3b] = the block's sum by xor shuffles, out[3b + 1] by down shuffles, out[3b + 2] by atomicAdd;
// ballots[b * warps + w] = the ballot of (x > 0) in warp w.
extern "C" __global__ void selftest_reduce(const float *in, float *out, unsigned *ballots) {
    __shared__ float by_xor[32];
    __shared__ float by_down[32];
    const unsigned t = threadIdx.x;
    const unsigned warps = blockDim.x / 32;
    const float x = in[blockIdx.x * blockDim.x + t];
    float v = x;
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
    float d = x;
    for (int offset = 16; offset > 0; offset /= 2) d += __shfl_down_sync(0xffffffffu, d, offset);
    const unsigned ballot = __ballot_sync(0xffffffffu, x > 0.0f);
    if (t == 0) out[3 * blockIdx.x + 2] = 0.0f;
    if (t % 32 == 0) {
        by_xor[t / 32] = v;
        by_down[t / 32] = d;
        ballots[blockIdx.x * warps + t / 32] = ballot;
    }
    __syncthreads();
    atomicAdd(&out[3 * blockIdx.x + 2], x);
    if (t == 0) {
        float a = 0.0f, b = 0.0f;
        for (unsigned w = 0; w < warps; ++w) {
            a += by_xor[w];
            b += by_down[w];
        }
        out[3 * blockIdx.x] = a;
        out[3 * blockIdx.x + 1] = b;
    }
}

EMU_WRAPPER(selftest_reduce, const float *in COMMA float *out COMMA unsigned *ballots, in COMMA out COMMA ballots)
