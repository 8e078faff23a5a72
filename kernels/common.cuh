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
struct alignas(sizeof(T) * N) Packed {
    T v[N];
};

// Whether `p` may be accessed as Packed<T, N>.
template <typename T, int N>
__device__ __forceinline__ bool is_packable(const T* p) {
    return (reinterpret_cast<u64>(p) % (sizeof(T) * N)) == 0;
}

template <typename T, int N>
__device__ __forceinline__ void store_packed(T* dst, const T (&src)[N]) {
    Packed<T, N> p;
#pragma unroll
    for (int k = 0; k < N; ++k) p.v[k] = src[k];
    *reinterpret_cast<Packed<T, N>*>(dst) = p;
}
