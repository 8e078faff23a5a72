// The emulation backend's translation unit: the CUDA built-ins, every kernel family, and one extern "C"
// launch wrapper per kernel, with the same parameters as the kernel (so the Rust side passes exactly what
// it passes to cuLaunchKernel, with host pointers).
#include "emu/cuda_emu.h"

#include "collate.cu"
#include "masked_ce.cu"
#include "masked_ce_cluster.cu"

// Every kernel takes its argument struct (abi.cuh); the wrapper takes a pointer to the same struct the
// Rust side fills for cuLaunchKernel, with host addresses in place of device ones.
#define EMU_WRAPPER(kernel, Args)                                                                   \
    extern "C" void emu_##kernel(const EmuLaunch *cfg, const Args *args) {                          \
        emu::launch(*cfg, [&] { kernel(*args); });                                                 \
    }

EMU_WRAPPER(collate_i32, CollateArgs)
EMU_WRAPPER(collate_i64, CollateArgs)
EMU_WRAPPER(collate_pack_i32, CollatePackArgs)
EMU_WRAPPER(collate_pack_i64, CollatePackArgs)
#define EMU_CE_WRAPPERS(suffix)                          \
    EMU_WRAPPER(masked_ce_fwd_##suffix##_lean, CeArgs)       \
    EMU_WRAPPER(masked_ce_fwd_##suffix##_entropy, CeArgs)    \
    EMU_WRAPPER(masked_ce_fwd_##suffix##_full, CeArgs)       \
    EMU_WRAPPER(masked_ce_fwd_bwd_##suffix##_lean, CeArgs)   \
    EMU_WRAPPER(masked_ce_fwd_bwd_##suffix##_entropy, CeArgs) \
    EMU_WRAPPER(masked_ce_fwd_bwd_##suffix##_full, CeArgs)   \
    EMU_WRAPPER(masked_ce_shard_fwd_##suffix, CeArgs)        \
    EMU_WRAPPER(masked_ce_shard_bwd_##suffix, CeArgs)
EMU_CE_WRAPPERS(f32)
EMU_CE_WRAPPERS(f16)
EMU_CE_WRAPPERS(bf16)
// Cluster kernels: also the cluster size (CTAs along x) and each CTA's dynamic shared memory.
#define EMU_CLUSTER_WRAPPER(kernel, Args)                                                            \
    extern "C" void emu_##kernel(const EmuLaunch *cfg, unsigned cluster, unsigned long long smem,    \
                                 const Args *args) {                                                 \
        emu::launch_cluster(*cfg, cluster, smem, [&] { kernel(*args); });                           \
    }
#define EMU_CE_CLUSTER_WRAPPERS(suffix)                                 \
    EMU_CLUSTER_WRAPPER(masked_ce_fwd_bwd_##suffix##_lean_cluster, CeArgs)    \
    EMU_CLUSTER_WRAPPER(masked_ce_fwd_bwd_##suffix##_entropy_cluster, CeArgs) \
    EMU_CLUSTER_WRAPPER(masked_ce_fwd_bwd_##suffix##_full_cluster, CeArgs)
EMU_CE_CLUSTER_WRAPPERS(f32)
EMU_CE_CLUSTER_WRAPPERS(f16)
EMU_CE_CLUSTER_WRAPPERS(bf16)
EMU_WRAPPER(masked_ce_count, CeArgs)
EMU_WRAPPER(masked_ce_documents, CeArgs)
EMU_WRAPPER(masked_ce_reduce, CeArgs)

// The size of every argument struct and the offset of every field, in the order build.rs lists them
// for Rust (abi_layout.inc is generated from abi.cuh), so that a test can compare the two layouts.
extern "C" unsigned long long emu_abi_layout(unsigned long long *out, unsigned long long capacity) {
    const unsigned long long layout[] = {
#include "abi_layout.inc"
    };
    const unsigned long long n = sizeof(layout) / sizeof(layout[0]);
    for (unsigned long long i = 0; i < n && i < capacity; ++i) out[i] = layout[i];
    return n;
}

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

extern "C" void emu_selftest_reduce(const EmuLaunch *cfg, const float *in, float *out, unsigned *ballots) {
    emu::launch(*cfg, [&] { selftest_reduce(in, out, ballots); });
}
