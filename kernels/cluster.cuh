// Thread-block clusters (sm_90+): the CTA's rank in its cluster, the cluster's index in the grid, the
// cluster barrier, a pointer into another CTA's shared memory (distributed shared memory), and the
// dynamic shared memory itself. Written as PTX, since the NVRTC wheels carry no cooperative_groups.h;
// kernels/emu/cuda_emu.h gives the emulator the same functions. A kernel that uses them keeps all its
// shared memory in dynamic_smem() (no static __shared__): the emulator runs a cluster's CTAs at once, each
// with its own dynamic shared memory.
#pragma once

#include "common.cuh"

#ifndef SFT_EMULATION
// A special register as a u32.
#define SFT_SPECIAL_REGISTER(function, reg)                          \
    __device__ __forceinline__ u32 function() {                      \
        u32 r;                                                       \
        asm volatile("mov.u32 %0, %%" reg ";" : "=r"(r));            \
        return r;                                                    \
    }
// This CTA's rank in its cluster, and the cluster's CTAs.
SFT_SPECIAL_REGISTER(cluster_ctarank, "cluster_ctarank")
SFT_SPECIAL_REGISTER(cluster_nctarank, "cluster_nctarank")
// The cluster's index along x, and how many clusters the grid has along x.
SFT_SPECIAL_REGISTER(cluster_index, "clusterid.x")
SFT_SPECIAL_REGISTER(cluster_count, "nclusterid.x")
// Every thread of every CTA of the cluster meets here; shared-memory writes before it (release) are
// visible to every CTA's reads after it (acquire).
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.aligned;\n\tbarrier.cluster.wait.aligned;" ::: "memory");
}
// The address of the variable at `p` (this CTA's shared memory) in the shared memory of CTA `rank`.
template <typename T>
__device__ __forceinline__ const T *cluster_map(const T *p, u32 rank) {
    u64 out;
    asm volatile("mapa.u64 %0, %1, %2;" : "=l"(out) : "l"(reinterpret_cast<u64>(p)), "r"(rank));
    return reinterpret_cast<const T *>(out);
}
// The launch's dynamic shared memory (sharedMemBytes), 16-byte aligned.
__device__ __forceinline__ unsigned char *dynamic_smem() {
    extern __shared__ __attribute__((aligned(16))) unsigned char sft_dynamic_smem[];
    return sft_dynamic_smem;
}
#endif
