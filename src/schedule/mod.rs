//! Scheduling: which rows go together. [`bucket`] orders rows by length for padded batches; [`pack`]
//! plans padding-free packs of whole documents. Both are decided on the host from row lengths alone.

pub mod bucket;
pub mod pack;

pub use bucket::bucket_order;
pub use pack::{plan_packs, Overflow, PackSpec, PackStrategy};

/// splitmix64: a small, well-mixed generator, so orders are reproducible from a seed on every platform.
pub(crate) fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
