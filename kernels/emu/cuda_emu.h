// CPU emulation of the CUDA built-ins our kernels use, so that kernels/*.cu compile as C++ and run on CPU
// threads. A launch runs the grid's blocks one after another; each block's threads are real OS threads, so
// __syncthreads is a real barrier, shared memory is really shared and warp shuffles really exchange values
// between threads. Launches are serialized (one at a time per process), which is what lets __shared__
// variables be plain statics.
//
// Thread-block clusters (kernels/cluster.cuh) run by launch_cluster: the CTAs of one cluster run at once,
// each with its own barriers and its own dynamic shared memory (filled with 0xff bytes at the start of each
// cluster, as garbage: a float read before it is written is NaN), which the others reach through
// cluster_map; cluster_sync is a barrier over all their threads. Clusters run one after another.
//
// Faithfulness notes: blocks do not run concurrently (kernels must not rely on inter-block progress,
// which CUDA does not promise either); warps do not run in lock-step, so warp-synchronous code without
// *_sync primitives would be caught as a race rather than silently working.
#pragma once

#include <atomic>
#include <cmath>
#include <math.h>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __restrict__ __restrict
// One block runs at a time and launches are serialized, so a static is exactly one block's shared memory.
#define __shared__ static

struct uint3 {
    unsigned x, y, z;
};
struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

namespace emu {

// A reusable barrier whose participants may leave (a thread that returns from the kernel no longer takes
// part in __syncthreads, as on the GPU). Waiters first yield the CPU a few times (with hundreds of
// emulated threads on a few cores, the last arrival is usually only a few yields away) and only then
// sleep on the condition variable; the last arrival wakes sleepers only if there are any.
class Barrier {
  public:
    void reset(int n) {
        expected_ = n;
        count_ = n;
    }
    void wait() {
        unsigned long generation;
        {
            std::unique_lock<std::mutex> lock(mutex_);
            generation = generation_.load(std::memory_order_relaxed);
            if (--count_ == 0) {
                next_generation();
                return;
            }
        }
        for (int spin = 0; spin < 16; ++spin) {
            if (generation_.load(std::memory_order_acquire) != generation) return;
            std::this_thread::yield();
        }
        std::unique_lock<std::mutex> lock(mutex_);
        ++sleepers_;
        cv_.wait(lock, [&] { return generation != generation_.load(std::memory_order_relaxed); });
        --sleepers_;
    }
    void drop() {
        std::unique_lock<std::mutex> lock(mutex_);
        --expected_;
        if (--count_ == 0) next_generation();
    }

  private:
    // Called with the mutex held.
    void next_generation() {
        count_ = expected_;
        generation_.fetch_add(1, std::memory_order_release);
        if (sleepers_ > 0) cv_.notify_all();
    }
    std::mutex mutex_;
    std::condition_variable cv_;
    int expected_ = 0;
    int count_ = 0;
    int sleepers_ = 0;
    std::atomic<unsigned long> generation_{0};
};

struct Warp {
    Barrier barrier;
    // Two sets of slots used by alternate exchanges, so each exchange needs one barrier, not two: a lane
    // can only rewrite a set after the next exchange's barrier, which every lane reaches after reading.
    uint64_t slots[2][32];
};

struct Block {
    Barrier barrier;
    std::unique_ptr<Warp[]> warps;
};

// The CTAs of a cluster: a barrier over all their threads and each CTA's dynamic shared memory.
struct Cluster {
    Barrier barrier;
    std::vector<unsigned char *> smem;
    unsigned long long smem_bytes = 0;
};

inline thread_local Block *current_block = nullptr;
inline thread_local Cluster *current_cluster = nullptr;
inline thread_local unsigned cluster_rank = 0;
inline thread_local unsigned cluster_index = 0;
inline thread_local unsigned cluster_count = 0;
inline thread_local unsigned lane = 0;
inline thread_local unsigned warp_index = 0;
// Exchanges this thread has made in the current block (all lanes of a warp make the same ones).
inline thread_local unsigned long exchanges = 0;

// Every lane publishes a 64-bit word, the warp meets, each lane reads the word of `source(lane)`.
template <typename Source>
inline uint64_t exchange(uint64_t bits, Source source) {
    Warp &w = current_block->warps[warp_index];
    uint64_t *slots = w.slots[exchanges++ % 2];
    slots[lane] = bits;
    w.barrier.wait();
    return slots[source(lane)];
}

template <typename T>
inline uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8, "shuffles move at most 64 bits");
    uint64_t bits = 0;
    std::memcpy(&bits, &v, sizeof(T));
    return bits;
}

template <typename T>
inline T from_bits(uint64_t bits) {
    T v;
    std::memcpy(&v, &bits, sizeof(T));
    return v;
}

}  // namespace emu

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;

inline void __syncthreads() { emu::current_block->barrier.wait(); }

// Shuffles within groups of `width` lanes (a power of two, at most 32), as CUDA defines them. The mask is
// not checked: our kernels always shuffle with the whole warp.
template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask, int width = 32) {
    return emu::from_bits<T>(emu::exchange(emu::to_bits(v), [&](unsigned l) {
        const unsigned src = l ^ (unsigned)lane_mask;
        return (src / width == l / width) ? src : l;
    }));
}
template <typename T>
inline T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
    return emu::from_bits<T>(emu::exchange(emu::to_bits(v), [&](unsigned l) {
        const unsigned src = l + delta;
        return (src / width == l / width) ? src : l;
    }));
}
template <typename T>
inline T __shfl_up_sync(unsigned, T v, unsigned delta, int width = 32) {
    return emu::from_bits<T>(emu::exchange(emu::to_bits(v), [&](unsigned l) {
        return (l % width >= delta) ? l - delta : l;
    }));
}
template <typename T>
inline T __shfl_sync(unsigned, T v, int src_lane, int width = 32) {
    return emu::from_bits<T>(emu::exchange(emu::to_bits(v), [&](unsigned l) {
        return (l / width) * width + ((unsigned)src_lane % width);
    }));
}
inline unsigned __ballot_sync(unsigned mask, int predicate) {
    emu::Warp &w = emu::current_block->warps[emu::warp_index];
    uint64_t *slots = w.slots[emu::exchanges++ % 2];
    slots[emu::lane] = predicate != 0;
    w.barrier.wait();
    unsigned ballot = 0;
    for (unsigned l = 0; l < 32; ++l)
        if ((mask >> l & 1u) && slots[l]) ballot |= 1u << l;
    return ballot;
}
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) {
    return __ballot_sync(mask, predicate) == __ballot_sync(mask, 1);
}

template <typename T>
inline T atomicAdd(T *address, T value) {
    return std::atomic_ref<T>(*address).fetch_add(value);
}
template <typename T>
inline T atomicMax(T *address, T value) {
    std::atomic_ref<T> a(*address);
    T old = a.load();
    while (old < value && !a.compare_exchange_weak(old, value)) {
    }
    return old;
}
template <typename T>
inline T atomicOr(T *address, T value) {
    return std::atomic_ref<T>(*address).fetch_or(value);
}
template <typename T>
inline T atomicCAS(T *address, T compare, T value) {
    std::atomic_ref<T>(*address).compare_exchange_strong(compare, value);
    return compare;
}

inline float __int_as_float(int v) { return emu::from_bits<float>(emu::to_bits(v)); }
inline int __float_as_int(float v) { return emu::from_bits<int>(emu::to_bits(v)); }
inline float __uint_as_float(unsigned v) { return emu::from_bits<float>(emu::to_bits(v)); }
// The hardware's ex2.approx: here the library's exp2 (within its 2 ulp; no flush of subnormal results).
#define SFT_EMULATION 1
inline float ex2_approx(float x) { return std::exp2(x); }
inline unsigned __float_as_uint(float v) { return emu::from_bits<unsigned>(emu::to_bits(v)); }

// Clusters (kernels/cluster.cuh on the GPU).
inline unsigned cluster_ctarank() { return emu::cluster_rank; }
inline unsigned cluster_nctarank() { return (unsigned)emu::current_cluster->smem.size(); }
inline unsigned cluster_index() { return emu::cluster_index; }
inline unsigned cluster_count() { return emu::cluster_count; }
inline void cluster_sync() { emu::current_cluster->barrier.wait(); }
inline unsigned char *dynamic_smem() {
    return emu::current_cluster ? emu::current_cluster->smem[emu::cluster_rank] : nullptr;
}
// A shared-memory address of this CTA as the same address in CTA `rank`'s (the GPU's mapa); anything
// else is a bug the GPU would not forgive either.
template <typename T>
inline const T *cluster_map(const T *p, unsigned rank) {
    emu::Cluster &c = *emu::current_cluster;
    const unsigned char *own = c.smem[emu::cluster_rank];
    const unsigned char *q = reinterpret_cast<const unsigned char *>(p);
    if (rank >= c.smem.size() || q < own || q + sizeof(T) > own + c.smem_bytes) {
        std::fprintf(stderr, "cluster_map: not this CTA's shared memory, or no CTA %u\n", rank);
        std::abort();
    }
    return reinterpret_cast<const T *>(c.smem[rank] + (q - own));
}

// The launch shape, as the Rust side passes it.
struct EmuLaunch {
    unsigned grid[3];
    unsigned block[3];
};

namespace emu {

// Run `body` (one kernel invocation) for every thread of every block of the grid.
template <typename Body>
void launch(const EmuLaunch &cfg, Body &&body) {
    static std::mutex launch_mutex;
    std::lock_guard<std::mutex> serialized(launch_mutex);
    const dim3 block_dim{cfg.block[0], cfg.block[1], cfg.block[2]};
    const dim3 grid_dim{cfg.grid[0], cfg.grid[1], cfg.grid[2]};
    const unsigned threads = block_dim.x * block_dim.y * block_dim.z;
    const unsigned warps = (threads + 31) / 32;
    const unsigned long long blocks = (unsigned long long)grid_dim.x * grid_dim.y * grid_dim.z;
    if (threads == 0 || blocks == 0) return;

    Block block;
    block.warps.reset(new Warp[warps]);
    Barrier between_blocks;
    between_blocks.reset((int)threads);

    auto run_thread = [&](unsigned t) {
        current_block = &block;
        lane = t % 32;
        warp_index = t / 32;
        threadIdx = {t % block_dim.x, t / block_dim.x % block_dim.y, t / (block_dim.x * block_dim.y)};
        blockDim = block_dim;
        gridDim = grid_dim;
        for (unsigned long long b = 0; b < blocks; ++b) {
            // Everyone has left the previous block; one thread re-arms the block's barriers.
            between_blocks.wait();
            if (t == 0) {
                block.barrier.reset((int)threads);
                for (unsigned w = 0; w < warps; ++w)
                    block.warps[w].barrier.reset((int)std::min(32u, threads - 32 * w));
            }
            between_blocks.wait();
            exchanges = 0;
            blockIdx = {(unsigned)(b % grid_dim.x), (unsigned)(b / grid_dim.x % grid_dim.y),
                        (unsigned)(b / ((unsigned long long)grid_dim.x * grid_dim.y))};
            body();
            block.barrier.drop();
            block.warps[warp_index].barrier.drop();
        }
    };
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned t = 0; t < threads; ++t) pool.emplace_back(run_thread, t);
    for (auto &th : pool) th.join();
}

// Run `body` for every thread of every block of a grid of clusters of `cluster_size` CTAs along x
// (gridDim.x a multiple of it; y and z 1), each CTA with `smem_bytes` of dynamic shared memory.
template <typename Body>
void launch_cluster(const EmuLaunch &cfg, unsigned cluster_size, unsigned long long smem_bytes, Body &&body) {
    const dim3 block_dim{cfg.block[0], cfg.block[1], cfg.block[2]};
    const dim3 grid_dim{cfg.grid[0], cfg.grid[1], cfg.grid[2]};
    const unsigned threads = block_dim.x * block_dim.y * block_dim.z;
    const unsigned warps = (threads + 31) / 32;
    if (threads == 0 || grid_dim.x == 0) return;
    if (cluster_size == 0 || grid_dim.x % cluster_size != 0 || grid_dim.y != 1 || grid_dim.z != 1) {
        std::fprintf(stderr, "launch_cluster: a grid of %u x %u x %u in clusters of %u\n", grid_dim.x,
                     grid_dim.y, grid_dim.z, cluster_size);
        std::abort();
    }
    const unsigned clusters = grid_dim.x / cluster_size;
    const std::size_t alignment = 128;
    const unsigned long long allocated = smem_bytes == 0 ? alignment : smem_bytes;
    Cluster cluster;
    cluster.smem_bytes = smem_bytes;
    std::vector<Block> blocks(cluster_size);
    for (unsigned r = 0; r < cluster_size; ++r) {
        blocks[r].warps.reset(new Warp[warps]);
        cluster.smem.push_back(static_cast<unsigned char *>(::operator new[](allocated, std::align_val_t(alignment))));
    }
    const unsigned all = threads * cluster_size;
    Barrier between_clusters;
    between_clusters.reset((int)all);

    auto run_thread = [&](unsigned t) {
        const unsigned rank = t / threads, local = t % threads;
        Block &block = blocks[rank];
        current_block = &block;
        current_cluster = &cluster;
        cluster_rank = rank;
        cluster_count = clusters;
        lane = local % 32;
        warp_index = local / 32;
        threadIdx = {local % block_dim.x, local / block_dim.x % block_dim.y, local / (block_dim.x * block_dim.y)};
        blockDim = block_dim;
        gridDim = grid_dim;
        for (unsigned c = 0; c < clusters; ++c) {
            between_clusters.wait();
            if (local == 0) {
                block.barrier.reset((int)threads);
                for (unsigned w = 0; w < warps; ++w)
                    block.warps[w].barrier.reset((int)std::min(32u, threads - 32 * w));
                std::memset(cluster.smem[rank], 0xff, allocated);
            }
            if (t == 0) cluster.barrier.reset((int)all);
            between_clusters.wait();
            exchanges = 0;
            cluster_index = c;
            blockIdx = {c * cluster_size + rank, 0, 0};
            body();
            block.barrier.drop();
            block.warps[warp_index].barrier.drop();
            cluster.barrier.drop();
        }
        current_cluster = nullptr;
    };
    std::vector<std::thread> pool;
    pool.reserve(all);
    for (unsigned t = 0; t < all; ++t) pool.emplace_back(run_thread, t);
    for (auto &th : pool) th.join();
    for (unsigned char *p : cluster.smem) ::operator delete[](p, std::align_val_t(alignment));
}

}  // namespace emu
