// The collation kernel: padding, shift and response-mask fill for a whole batch in one pass, from the
// packed form (tokens row after row, row_offsets, prompt_lens). Must match src/cpu/collate.rs bit for bit.
//
// Layout: blockIdx.y walks rows (grid-stride, so any row count works with gridDim.y <= 65535); a block of
// blockIdx.x covers COLLATE_VEC * blockDim.x positions of its row, each thread COLLATE_VEC of them,
// blockDim.x apart (so a warp's accesses are consecutive). Positions are 64-bit, so rows * width may
// exceed 2^32.
#include "abi.cuh"

// Each kernel takes its argument struct (abi.cuh) by value and hands the fields to the implementation as
// separate __restrict__ parameters (so no struct is ever addressed, which would put it on the stack).
template <typename Id>
__device__ __forceinline__ void collate_impl(const u32 *__restrict__ tokens, const u64 *__restrict__ row_offsets,
                                             const u32 *__restrict__ prompt_lens, const u8 *__restrict__ trainable,
                                             u64 rows, u64 width, u32 pad_id, i64 ignore_index, i32 use_ignore_index,
                                             Id *__restrict__ input_ids, Id *__restrict__ labels,
                                             u8 *__restrict__ response_mask, u8 *__restrict__ attention_mask) {
    // The block covers COLLATE_VEC * blockDim.x positions of a row; thread t writes positions
    // base + t, base + t + blockDim.x, ... so that every load and store instruction of a warp touches 32
    // consecutive elements (one full line for ids) whatever the row's alignment. Widths are often odd
    // (max_len - 1), where vector stores would not be aligned.
    const u64 base = (u64)blockIdx.x * blockDim.x * COLLATE_VEC + threadIdx.x;
    if (base >= width) return;

    for (u64 row = blockIdx.y; row < rows; row += gridDim.y) {
        const u64 start = row_offsets[row];
        const u64 len = row_offsets[row + 1] - start;
        // The label at j is sequence position j + 1; it is an output token when
        // prompt_len <= j + 1 < len. Position 0 is never a label, hence the max with 1 (empty prompt).
        const u64 prompt_len = prompt_lens[row];
        const u64 first_label = prompt_len > 1 ? prompt_len : 1;
        const u64 at = row * width;
#pragma unroll
        for (int k = 0; k < COLLATE_VEC; ++k) {
            const u64 j = base + (u64)k * blockDim.x;
            if (j >= width) break;
            const u64 next = j + 1;
            const u32 tok = j < len ? tokens[start + j] : pad_id;
            // The neighbour's token, read again: it is in L1 already, a shuffle would not be cheaper.
            const u32 label = next < len ? tokens[start + next] : pad_id;
            // With per-token flags (multi-segment rows) the label's own flag decides; else the prompt rule.
            const bool is_response =
                next < len && (trainable ? trainable[start + next] != 0 : next >= first_label);
            input_ids[at + j] = (Id)tok;
            labels[at + j] = (use_ignore_index && !is_response) ? (Id)ignore_index : (Id)label;
            response_mask[at + j] = is_response;
            if (attention_mask != nullptr) attention_mask[at + j] = j < len;
        }
    }
}

#define COLLATE_KERNEL(name, Id)                                                                    \
    extern "C" __global__ void __launch_bounds__(COLLATE_BLOCK) name(const CollateArgs a) {       \
        collate_impl<Id>(a.tokens, a.row_offsets, a.prompt_lens, a.trainable, a.rows, a.width, a.pad_id, \
                         a.ignore_index, a.use_ignore_index, (Id *)a.input_ids, (Id *)a.labels,    \
                         a.response_mask, a.attention_mask);                                        \
    }

COLLATE_KERNEL(collate_i32, i32)
COLLATE_KERNEL(collate_i64, i64)

// ---- The pack (padding-free) layout: every row of the batch is a document, all concatenated into one
// stream of `total` positions (the real tokens, then an optional pad tail). Each thread writes
// COLLATE_VEC consecutive positions; the document of a position is found by binary search in
// row_offsets. Must match cpu::collate_pack bit for bit.
// The document holding stream position t (< row_offsets[rows]): the last d with row_offsets[d] <= t,
// skipping empty documents.
__device__ __forceinline__ u64 document_of(const u64 *row_offsets, u64 rows, u64 t) {
    u64 lo = 0, hi = rows;  // invariant: row_offsets[lo] <= t < row_offsets[hi]
    while (hi - lo > 1) {
        const u64 mid = lo + (hi - lo) / 2;
        if (row_offsets[mid] <= t) lo = mid; else hi = mid;
    }
    return lo;
}

template <typename Id>
__device__ __forceinline__ void collate_pack_impl(const u32 *__restrict__ tokens, const u64 *__restrict__ row_offsets,
                                                  const u32 *__restrict__ prompt_lens,
                                                  const u8 *__restrict__ trainable, u64 rows, u64 total, u32 pad_id,
                                                  i64 ignore_index, i32 use_ignore_index, Id *__restrict__ input_ids,
                                                  Id *__restrict__ labels, u8 *__restrict__ response_mask,
                                                  Id *__restrict__ position_ids, i32 *__restrict__ cu_seqlens) {
    const u64 thread = (u64)blockIdx.x * blockDim.x + threadIdx.x;
    const u64 real = row_offsets[rows];
    // cu_seqlens: the document boundaries, then the end of the pad tail if there is one.
    if (thread <= rows) cu_seqlens[thread] = (i32)row_offsets[thread];
    if (thread == rows + 1 && total > real) cu_seqlens[thread] = (i32)total;

    const u64 t0 = thread * COLLATE_VEC;
    if (t0 >= total) return;
    u64 d = t0 < real ? document_of(row_offsets, rows, t0) : rows;
    for (int k = 0; k < COLLATE_VEC; ++k) {
        const u64 t = t0 + k;
        if (t >= total) break;
        if (t < real) {
            while (row_offsets[d + 1] <= t) ++d;  // the next non-empty document
            const u64 start = row_offsets[d], end = row_offsets[d + 1];
            const u64 p = t - start;
            const u64 first_label = prompt_lens[d] > 1 ? prompt_lens[d] : 1;
            const bool is_response =
                t + 1 < end && (trainable ? trainable[t + 1] != 0 : p + 1 >= first_label);
            const u32 next = t + 1 < end ? tokens[t + 1] : pad_id;
            input_ids[t] = (Id)tokens[t];
            labels[t] = (use_ignore_index && !is_response) ? (Id)ignore_index : (Id)next;
            response_mask[t] = is_response;
            position_ids[t] = (Id)p;
        } else {
            input_ids[t] = (Id)pad_id;
            labels[t] = use_ignore_index ? (Id)ignore_index : (Id)pad_id;
            response_mask[t] = 0;
            position_ids[t] = (Id)(t - real);
        }
    }
}

#define COLLATE_PACK_KERNEL(name, Id)                                                               \
    extern "C" __global__ void __launch_bounds__(COLLATE_BLOCK) name(const CollatePackArgs a) {   \
        collate_pack_impl<Id>(a.tokens, a.row_offsets, a.prompt_lens, a.trainable, a.rows, a.total, a.pad_id, \
                              a.ignore_index, a.use_ignore_index, (Id *)a.input_ids, (Id *)a.labels, \
                              a.response_mask, (Id *)a.position_ids, a.cu_seqlens);                 \
    }

COLLATE_PACK_KERNEL(collate_pack_i32, i32)
COLLATE_PACK_KERNEL(collate_pack_i64, i64)
