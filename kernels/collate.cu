// The collation kernel: padding, shift and response-mask fill for a whole batch in one pass, from the
// packed form (tokens row after row, row_offsets, prompt_lens). Must match src/cpu/collate.rs bit for bit.
//
// Layout: blockIdx.y walks rows (grid-stride, so any row count works with gridDim.y <= 65535), and each
// thread of blockIdx.x writes COLLATE_VEC consecutive positions of its row. Positions are 64-bit, so
// rows * width may exceed 2^32.
#include "common.cuh"

#define COLLATE_VEC 4
#define COLLATE_BLOCK 256

// The kernels' parameters, written once for the kernels and for the emulation's launch wrappers.
#define COLLATE_PARAMS(Id)                                                                          \
    const u32 *__restrict__ tokens, const u64 *__restrict__ row_offsets,                          \
        const u32 *__restrict__ prompt_lens, u64 rows, u64 width, u32 pad_id, i64 ignore_index,   \
        i32 use_ignore_index, Id *__restrict__ input_ids, Id *__restrict__ labels,                 \
        u8 *__restrict__ response_mask, u8 *__restrict__ attention_mask
#define COLLATE_ARGS                                                                                \
    tokens, row_offsets, prompt_lens, rows, width, pad_id, ignore_index, use_ignore_index,         \
        input_ids, labels, response_mask, attention_mask

template <typename Id>
__device__ __forceinline__ void collate_impl(COLLATE_PARAMS(Id)) {
    const u64 j0 = ((u64)blockIdx.x * blockDim.x + threadIdx.x) * COLLATE_VEC;
    if (j0 >= width) return;
    // Whole-vector stores need every row to start aligned: width a multiple of the vector and aligned
    // buffers. The condition is the same for every thread, so there is no divergence.
    const bool packed = width % COLLATE_VEC == 0 && is_packable<Id, COLLATE_VEC>(input_ids) &&
                        is_packable<Id, COLLATE_VEC>(labels) &&
                        is_packable<u8, COLLATE_VEC>(response_mask) &&
                        (attention_mask == nullptr || is_packable<u8, COLLATE_VEC>(attention_mask));

    for (u64 row = blockIdx.y; row < rows; row += gridDim.y) {
        const u64 start = row_offsets[row];
        const u64 len = row_offsets[row + 1] - start;
        // The label at j is sequence position j + 1; it is an output token when
        // prompt_len <= j + 1 < len. Position 0 is never a label, hence the max with 1 (empty prompt).
        const u64 prompt_len = prompt_lens[row];
        const u64 first_label = prompt_len > 1 ? prompt_len : 1;

        // Sequence positions j0 .. j0 + VEC (one more than we write: the last label).
        u32 tok[COLLATE_VEC + 1];
#pragma unroll
        for (int k = 0; k <= COLLATE_VEC; ++k) {
            const u64 pos = j0 + k;
            tok[k] = pos < len ? tokens[start + pos] : pad_id;
        }
        Id in[COLLATE_VEC], lab[COLLATE_VEC];
        u8 resp[COLLATE_VEC], attn[COLLATE_VEC];
#pragma unroll
        for (int k = 0; k < COLLATE_VEC; ++k) {
            const u64 next = j0 + k + 1;
            const bool is_response = next >= first_label && next < len;
            in[k] = (Id)tok[k];
            lab[k] = (use_ignore_index && !is_response) ? (Id)ignore_index : (Id)tok[k + 1];
            resp[k] = is_response;
            attn[k] = j0 + k < len;
        }

        const u64 at = row * width + j0;
        if (packed) {
            store_packed<Id, COLLATE_VEC>(input_ids + at, in);
            store_packed<Id, COLLATE_VEC>(labels + at, lab);
            store_packed<u8, COLLATE_VEC>(response_mask + at, resp);
            if (attention_mask != nullptr) store_packed<u8, COLLATE_VEC>(attention_mask + at, attn);
        } else {
#pragma unroll
            for (int k = 0; k < COLLATE_VEC; ++k) {
                if (j0 + k < width) {
                    input_ids[at + k] = in[k];
                    labels[at + k] = lab[k];
                    response_mask[at + k] = resp[k];
                    if (attention_mask != nullptr) attention_mask[at + k] = attn[k];
                }
            }
        }
    }
}

#define COLLATE_KERNEL(name, Id)                                                                    \
    extern "C" __global__ void __launch_bounds__(COLLATE_BLOCK) name(COLLATE_PARAMS(Id)) {        \
        collate_impl<Id>(COLLATE_ARGS);                                                             \
    }

COLLATE_KERNEL(collate_i32, i32)
COLLATE_KERNEL(collate_i64, i64)
