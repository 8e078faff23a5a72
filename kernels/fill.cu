// Benchmark inputs made on the device (filling gigabytes of logits from the host would dominate a bench):
// fill_logits_<dtype>(out, n, seed, spread) writes a hash of (seed, index) mapped to [-spread, spread).
#include "common.cuh"

__device__ __forceinline__ u64 mix64(u64 x) {
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

#define FILL_KERNEL(suffix, T)                                                                      \
    extern "C" __global__ void fill_logits_##suffix(T *__restrict__ out, u64 n, u64 seed, float spread) { \
        for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) { \
            const float unit = (float)(mix64(seed ^ (i * 0x9e3779b97f4a7c15ull)) >> 40) * (1.0f / 16777216.0f); \
            store_float((2.0f * unit - 1.0f) * spread, &out[i]);                                     \
        }                                                                                           \
    }

FILL_KERNEL(f32, float)
FILL_KERNEL(f16, f16)
FILL_KERNEL(bf16, bf16)

// Keep the stream busy for `cycles` clock cycles of one thread's SM (at least cycles / 2 ns at clocks up
// to 2 GHz), so that a test can tell whether a call returned before the device got to it, i.e. whether
// it waited for the device. The SM's cycle counter, not %globaltimer, which does not advance under some
// virtual machines.
extern "C" __global__ void spin(u64 cycles) {
    u64 start, now;
    asm volatile("mov.u64 %0, %%clock64;" : "=l"(start));
    do {
        asm volatile("mov.u64 %0, %%clock64;" : "=l"(now));
    } while (now - start < cycles);
}
