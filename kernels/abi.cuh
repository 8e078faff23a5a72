// The kernels' ABI, written once: the launch constants and one argument struct per kernel, passed by
// value as the kernel's only parameter. build.rs reads this file and generates the Rust mirrors that both
// launchers (src/backend/cuda, src/backend/emulation) fill, so argument order cannot drift between them;
// tests compare every size and field offset with what NVRTC (the PTX parameter) and the C++ compiler (the
// emulator) make of it.
//
// The generator's grammar: `#define NAME <integer>` lines and `struct Name { <type> <name>; ... };`
// blocks, one field per line; a pointer becomes a u64 device address on the Rust side, u8 / u32 / i32 /
// u64 / i64 / float keep their width. Comments after a field are copied as its doc.
#pragma once

#include "common.cuh"

#define COLLATE_BLOCK 256  // threads per block of the collation kernels
#define COLLATE_VEC 4      // positions each thread writes
#define CE_BLOCK 256       // threads per block of the cross-entropy kernels
#define CE_NORM_SUM 0         // normalization: none
#define CE_NORM_TOKEN_MEAN 1  // normalization: divided by the number of masked rows
#define CE_NORM_FIXED 2       // normalization: a fixed denominator (CS336's nc · B · gas)

// collate_{i32,i64}: the padded layout, rows × width.
struct CollateArgs {
    const u32 *tokens;       // the ragged batch: tokens row after row
    const u64 *row_offsets;  // rows + 1 offsets into tokens
    const u32 *prompt_lens;  // per row: the leading untrained run
    const u8 *trainable;     // one flag per token (multi-segment rows), or null: the prompt rule
    void *input_ids;         // rows × width ids (i32 or i64, as the kernel's name says)
    void *labels;            // rows × width ids
    u8 *response_mask;       // rows × width, 0 or 1
    u8 *attention_mask;      // rows × width, or null
    u64 rows;
    u64 width;
    i64 ignore_index;        // written where the mask is false, when use_ignore_index
    u32 pad_id;
    i32 use_ignore_index;
};

// collate_pack_{i32,i64}: the padding-free layout, every row a document, `total` positions.
struct CollatePackArgs {
    const u32 *tokens;       // the ragged batch: tokens row after row
    const u64 *row_offsets;  // rows + 1 offsets into tokens
    const u32 *prompt_lens;  // per row: the leading untrained run
    const u8 *trainable;     // one flag per token, or null: the prompt rule
    void *input_ids;         // total ids
    void *labels;            // total ids
    u8 *response_mask;       // total, 0 or 1
    void *position_ids;      // total ids
    i32 *cu_seqlens;         // rows + 1 (+ 1 with a pad tail)
    u64 rows;
    u64 total;               // real tokens, rounded up to pad_to_multiple_of
    i64 ignore_index;
    u32 pad_id;
    i32 use_ignore_index;
};

// masked_ce_{fwd,fwd_bwd}_{f32,f16,bf16}: one block per masked row.
struct CeArgs {
    const void *logits;      // rows of logits_stride elements, vocab used (f32, f16 or bf16)
    const void *labels;      // rows labels, i32 or i64 (labels_are_i64)
    const u8 *mask;          // rows, 0 or 1
    const float *weights;    // rows, or null
    const u32 *count;        // the number of masked rows (masked_ce_count)
    const float *upstream_ptr;  // d final loss / d this loss on the device, or null: `upstream` below
    float *row_loss;         // rows: w · (-log_prob)
    float *log_probs;        // rows, or null
    float *entropy;          // rows, or null
    float *lse;              // rows, or null
    void *grad;              // rows of grad_stride elements, or null; may alias logits (in place)
    u32 *error_flag;         // set when a masked row has a label outside [0, vocab)
    u64 rows;
    u64 vocab;
    u64 logits_stride;
    u64 grad_stride;
    float norm_fixed;        // the denominator of CE_NORM_FIXED
    float upstream;          // d final loss / d this loss
    i32 labels_are_i64;
    i32 norm_mode;           // CE_NORM_*
};

// masked_ce_count: the number of masked rows, deterministically; also clears the error flag.
struct CeCountArgs {
    const u8 *mask;
    u32 *count;
    u32 *error_flag;
    u64 rows;
};

// masked_ce_reduce: Σ row_loss in f64 in a fixed order; out[0] = sum, out[1] = the normalized loss.
struct CeReduceArgs {
    const float *row_loss;
    const u32 *count;
    float *out;
    u64 rows;
    float norm_fixed;
    i32 norm_mode;
};
