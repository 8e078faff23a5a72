// Shared by every kernel family. No CUDA toolkit headers: NVRTC needs none, and the same text compiles as
// C++ for the emulation backend (kernels/emu/cuda_emu.h supplies the built-ins there).
#pragma once

typedef unsigned char u8;
typedef unsigned int u32;
typedef int i32;
typedef unsigned long long u64;
typedef long long i64;

// N consecutive elements moved as one aligned unit, so that the compiler emits one vector load or store
// (st.global.v4.u32 for four i32, two st.global.v2.u64 for four i64, one st.global.u32 for four bytes).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vector {
    T v[N];
};

// Whether `p` may be accessed as Vector<T, N>.
template <typename T, int N>
__device__ __forceinline__ bool is_vector_aligned(const T* p) {
    return (reinterpret_cast<u64>(p) % (sizeof(T) * N)) == 0;
}

#ifndef SFT_EMULATION
// 2^x by the special function unit (ex2.approx.ftz: 2 ulp, subnormal results flushed to 0): one
// instruction, where expf's accurate range reduction costs several more.
__device__ __forceinline__ float ex2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
#endif

template <typename T, int N>
__device__ __forceinline__ void store_vector(T* dst, const T (&src)[N]) {
    Vector<T, N> p;
#pragma unroll
    for (int k = 0; k < N; ++k) p.v[k] = src[k];
    *reinterpret_cast<Vector<T, N>*>(dst) = p;
}

// ---- Floating-point storage types, converted by bits (the NVRTC wheels ship no cuda_fp16.h /
// cuda_bf16.h, and the emulation has none either). Arithmetic is always in f32.

struct bf16 {
    unsigned short bits;
};
struct f16 {
    unsigned short bits;
};

__device__ __forceinline__ float bits_to_float(u32 b) { return __uint_as_float(b); }

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(bf16 x) { return bits_to_float((u32)x.bits << 16); }

// Round to nearest, ties to even, once (as the `half` crate does), NaN kept quiet.
__device__ __forceinline__ void store_float(float v, float *out) { *out = v; }
__device__ __forceinline__ void store_float(float v, bf16 *out) {
    const u32 x = __float_as_uint(v);
    if ((x & 0x7fffffffu) > 0x7f800000u) {
        out->bits = (unsigned short)((x >> 16) | 0x40u);
        return;
    }
    out->bits = (unsigned short)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

#ifndef SFT_EMULATION
// On the GPU one conversion instruction each way (exact widening; round to nearest even, as below).
__device__ __forceinline__ float to_float(f16 x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
}
__device__ __forceinline__ void store_float(float v, f16 *out) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    out->bits = h;
}
#else
// The same conversions by bits, for the emulator (and the reference of what the instructions do).
__device__ __forceinline__ float to_float(f16 x) {
    const u32 h = x.bits;
    const u32 sign = (h & 0x8000u) << 16;
    const u32 exponent = (h >> 10) & 0x1fu;
    const u32 mantissa = h & 0x3ffu;
    if (exponent == 0) {
        // Zero or subnormal: mantissa × 2^-24, exact in f32.
        const float v = (float)mantissa * 5.9604644775390625e-8f;
        return sign ? -v : v;
    }
    if (exponent == 31) return bits_to_float(sign | 0x7f800000u | (mantissa << 13));
    return bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// Round to nearest, ties to even, once (as the `half` crate does), NaN kept quiet.
__device__ __forceinline__ void store_float(float v, f16 *out) {
    const u32 x = __float_as_uint(v);
    const u32 sign = (x >> 16) & 0x8000u;
    const u32 ax = x & 0x7fffffffu;
    u32 h;
    if (ax >= 0x7f800000u) {
        h = ax > 0x7f800000u ? 0x7e00u : 0x7c00u;  // NaN stays NaN, infinity stays infinity
    } else if (ax >= 0x477ff000u) {
        h = 0x7c00u;  // 65520 and above round to infinity
    } else if (ax < 0x38800000u) {
        // Below the smallest normal (2^-14): a multiple of 2^-24, rounded to nearest even by rintf.
        h = (u32)rintf(__uint_as_float(ax) * 16777216.0f);
    } else {
        h = (ax >> 13) - (112u << 10);  // rebias the exponent from 127 to 15
        const u32 rest = ax & 0x1fffu;
        h += (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ? 1u : 0u;  // carries into the exponent
    }
    out->bits = (unsigned short)(sign | h);
}
#endif

// ---- Block reductions. `scratch` is __shared__ memory of at least 32 elements; every thread of the block
// must call, and every thread gets the result.

template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, Op op, T identity, T *scratch) {
    const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const unsigned warps = (blockDim.x + 31) / 32;
    v = warp_reduce(v, op);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    T total = lane < warps ? scratch[lane] : identity;
    total = warp_reduce(total, op);
    __syncthreads();  // scratch may be reused right after
    return total;
}
