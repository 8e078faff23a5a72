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
#define CE_CLUSTER_HEAD 1152  // bytes of a one-read CTA's dynamic shared memory before its slice of the row
#define CE_NORM_SUM 0            // normalization: none
#define CE_NORM_TOKEN_MEAN 1     // normalization: divided by the number of trained rows
#define CE_NORM_FIXED 2          // normalization: a fixed denominator (CS336's nc · B · gas)
#define CE_NORM_SEQUENCE_MEAN 3  // normalization: per document, then over documents
#define CE_ERR_LABEL 1           // error flag bit: a trained row's label outside [0, vocab)
#define CE_ERR_CU_SEQLENS 2      // error flag bit: cu_seqlens do not rise from 0 to rows

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

#define CE_PART_LABEL 1    // partial flag: the row's label is one of this rank's columns
#define CE_PART_NAN 2      // partial flag: a NaN among the columns
#define CE_PART_POS_INF 4  // partial flag: a +inf among the columns (and no NaN)
#define CE_PART_NEG_INF 8  // partial flag: a -inf among the columns
// Vocabulary-parallel: one trained row's statistics over one rank's columns (after the softcap), written
// by masked_ce_shard_fwd_*; the ranks exchange them and merge (src/loss/parallel.rs).
struct CePartial {
    float max;           // the columns' max (-inf when all are -inf)
    float r;             // Σ e^(x - max) - 1
    float u;             // Σ e^(x - max)·(max - x)
    float spread;        // Σ (max - x) over the columns that are not -inf
    float label;         // the label's logit, when CE_PART_LABEL
    float argmax_value;  // the largest raw logit (before the softcap)
    i32 argmax;          // its first column here, -1 with a NaN
    u32 flags;           // CE_PART_*
};
// Vocabulary-parallel backward: per trained row, what the merged statistics of the whole vocabulary give
// (computed on the host in f64): d loss / d x_i = coef · [zf · e^((x'_i - m) - log_s) - eps_v] · dx'/dx,
// and coef · label_term · dx'/dx at the label's column.
struct CeShardRow {
    float m;           // the whole row's max (±inf or NaN for rows that are not finite)
    float log_s;       // log(1 + r) of the whole row
    float coef;        // upstream / denominator · the row's weight
    float zf;          // 1 + 2s·lse (z-loss), 1 without
    float label_term;  // the label's bracket, computed without cancellation
    float eps_v;       // ε / V (label smoothing over the whole vocabulary)
};
// Every cross-entropy kernel takes this one struct, in launch order: masked_ce_count (counts, clears the
// flag), masked_ce_documents (with cu_seqlens), masked_ce_{fwd,fwd_bwd}_{f32,f16,bf16}_{lean,entropy,full}
// (one block per row), masked_ce_reduce (sums, loss, correct rows); for a vocabulary split over ranks,
// masked_ce_shard_fwd_* (partials) and masked_ce_shard_bwd_* (the gradient of this rank's columns). A row
// is trained when its mask byte is 1 (no mask: every row) and its label is not ignore_index (when
// use_ignore_index).
struct CeArgs {
    const void *logits;        // rows of logits_stride elements, vocab used (f32, f16 or bf16)
    const void *labels;        // rows labels, i32 or i64 (labels_are_i64)
    const u8 *mask;            // rows, 0 or 1, or null: every row
    const float *weights;      // rows, or null
    const i32 *cu_seqlens;     // documents + 1 row boundaries, or null: the batch is one document
    const float *upstream_ptr; // d final loss / d this loss on the device, or null: `upstream` below
    u32 *doc_trained;          // documents: each one's trained rows (with cu_seqlens)
    u32 *count;                // [trained rows, correct rows, documents with trained rows]
    float *row_loss;           // rows: w · (ce + z)
    float *row_z;              // rows: w · s · lse², or null
    float *log_probs;          // rows, or null
    float *entropy;            // rows, or null
    float *lse;                // rows, or null
    i32 *argmax;               // rows, or null (the full kernels only)
    void *grad;                // rows of grad_stride elements, or null; may alias logits (in place)
    float *scalars;            // [sum, loss, z_sum]
    CePartial *partials;       // rows: each trained row's partial (masked_ce_shard_fwd_*)
    const CeShardRow *shard_rows; // rows: each trained row's merged statistics (masked_ce_shard_bwd_*)
    u32 *error_flag;           // CE_ERR_* bits
    u64 rows;
    u64 vocab;
    u64 logits_stride;
    u64 grad_stride;
    u64 documents;             // cu_seqlens has documents + 1 entries
    u64 row_offset;            // the first row's index in the batch (a launch over a chunk of rows)
    u64 column_start;          // vocabulary-parallel: the first column's index in the whole vocabulary
    u64 cluster_slice;         // one-read kernels (masked_ce_cluster.cu): columns per CTA of a cluster
    i64 ignore_index;
    float norm_fixed;          // the denominator of CE_NORM_FIXED
    float upstream;            // d final loss / d this loss
    float z_loss;              // s of + s · lse² (0: none)
    float label_smoothing;     // ε (the full kernels only)
    float softcap;             // C of C · tanh(x / C), 0: none (the full kernels only)
    i32 labels_are_i64;
    i32 norm_mode;             // CE_NORM_*
    i32 use_ignore_index;
};
