//! Vocabulary-parallel cross-entropy: what ranks that each hold a slice of the vocabulary (a
//! tensor-parallel LM head: `[N, V/R]` logits per rank) exchange so that every one of them gets the loss
//! of the whole vocabulary, and the gradient of its own slice, as if the logits were in one place.
//!
//! Per trained row each rank reduces its columns to a few numbers (a [`RowPartial`]: the max, the
//! softmax sum around it, the entropy accumulator, the smoothing sum, the label's logit when the label is
//! one of its columns, the argmax); **one all-gather** of those (64 bytes per row per rank) and a local
//! merge give every rank the same logsumexp, log-prob, entropy and loss (Megatron's vocab-parallel loss
//! needs two all-reduces and recomputes the softmax). The exchange goes through a [`Communicator`]:
//! [`InProcessGroup`] for ranks that are threads of one process (and for the tests, which check that
//! any split of the vocabulary gives the unsharded loss and gradient); an NCCL one is the natural
//! implementation across GPUs.
//!
//! The computation is `backend::cpu::loss::vocab_parallel_cross_entropy` (f64, the oracle) and, on a
//! device, [`crate::Device::vocab_parallel_cross_entropy`] (the emulator runs the partials and gradient
//! kernels around the same exchanges).

use std::sync::{Arc, Condvar, Mutex};

use crate::{Error, Result};

/// A group of ranks that exchange bytes. Every rank of the group must make the same calls in the same
/// order (as with NCCL or `torch.distributed`).
pub trait Communicator: Send + Sync {
    /// This rank, from 0.
    fn rank(&self) -> usize;
    /// Ranks in the group.
    fn size(&self) -> usize;
    /// Every rank's `local` (all of the same length), concatenated in rank order.
    fn all_gather(&self, local: &[u8]) -> Result<Vec<u8>>;
}

/// Ranks that are threads of one process: [`InProcessGroup::new`] makes one handle per rank, each
/// moved to its thread. A handle dropped while others wait (a rank that failed or panicked) makes
/// their calls fail rather than hang.
pub struct InProcessGroup {
    rank: usize,
    shared: Arc<Shared>,
}

struct Shared {
    size: usize,
    state: Mutex<Round>,
    done: Condvar,
}

#[derive(Default)]
struct Round {
    /// Rounds completed.
    generation: u64,
    /// This round's contributions, by rank.
    slots: Vec<Option<Vec<u8>>>,
    arrived: usize,
    /// The last completed round's result.
    last: Option<std::result::Result<Arc<Vec<u8>>, String>>,
    /// A handle was dropped: no round can complete any more.
    broken: bool,
}

impl InProcessGroup {
    /// One handle per rank of a group of `size` ranks (at least one).
    pub fn new(size: usize) -> Result<Vec<InProcessGroup>> {
        if size == 0 {
            return Err(Error::InvalidOption {
                name: "size",
                reason: "a group needs at least one rank".into(),
            });
        }
        let shared = Arc::new(Shared {
            size,
            state: Mutex::new(Round {
                slots: vec![None; size],
                ..Round::default()
            }),
            done: Condvar::new(),
        });
        Ok((0..size)
            .map(|rank| InProcessGroup {
                rank,
                shared: shared.clone(),
            })
            .collect())
    }
}

fn left_group() -> Error {
    Error::Collective("a rank left the group before the exchange completed".into())
}

impl Communicator for InProcessGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.shared.size
    }

    fn all_gather(&self, local: &[u8]) -> Result<Vec<u8>> {
        let shared = &*self.shared;
        let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.broken {
            return Err(left_group());
        }
        let generation = state.generation;
        state.slots[self.rank] = Some(local.to_vec());
        state.arrived += 1;
        if state.arrived == shared.size {
            let parts: Vec<Vec<u8>> = state
                .slots
                .iter_mut()
                .map(|s| s.take().unwrap_or_default())
                .collect();
            let result = match parts.iter().all(|p| p.len() == local.len()) {
                true => Ok(Arc::new(parts.concat())),
                false => Err(format!(
                    "ranks gave {:?} bytes: all must give the same",
                    parts.iter().map(Vec::len).collect::<Vec<_>>()
                )),
            };
            state.last = Some(result);
            state.arrived = 0;
            state.generation += 1;
            shared.done.notify_all();
        } else {
            while state.generation == generation && !state.broken {
                state = shared.done.wait(state).unwrap_or_else(|e| e.into_inner());
            }
            if state.generation == generation {
                return Err(left_group());
            }
        }
        match state.last.as_ref().expect("a completed round has a result") {
            Ok(all) => Ok(all.to_vec()),
            Err(why) => Err(Error::Collective(why.clone())),
        }
    }
}

impl Drop for InProcessGroup {
    fn drop(&mut self) {
        let mut state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        state.broken = true;
        self.shared.done.notify_all();
    }
}

/// Which columns of the vocabulary a rank's logits are: `start..start + width` of `vocab`, `width`
/// being the input's own vocabulary dimension. The ranks' shards must tile `0..vocab` (checked with
/// one exchange before anything else).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VocabShard {
    pub start: usize,
    pub vocab: usize,
}

/// One trained row's statistics over one rank's columns, after the softcap: what the ranks exchange.
/// All `f64` so that the record is plain bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C)]
pub struct RowPartial {
    /// The largest logit of the columns (-inf when all are -inf or there are none).
    pub max: f64,
    /// `Σ e^(x - max) - 1` over the columns (every term but the first maximum's own 1).
    pub r: f64,
    /// `Σ e^(x - max)·(max - x)` (the entropy's accumulator).
    pub u: f64,
    /// `Σ (max - x)` (label smoothing's mean), +inf when a column is -inf.
    pub spread: f64,
    /// The label's logit, when the label is one of the columns (see `flags`).
    pub label: f64,
    /// The largest raw logit (before the softcap) and its column in the whole vocabulary; -1 with a
    /// NaN.
    pub argmax_value: f64,
    pub argmax: f64,
    /// [`RowPartial::HAS_LABEL`], [`RowPartial::NAN`], [`RowPartial::POS_INF`].
    pub flags: f64,
}

impl RowPartial {
    pub const HAS_LABEL: u32 = 1;
    pub const NAN: u32 = 2;
    pub const POS_INF: u32 = 4;

    pub fn has(&self, flag: u32) -> bool {
        self.flags as u32 & flag != 0
    }
}
