//! The loader: batches for a training loop, read from a token store every epoch, as a trainer needs them.
//!
//! Each epoch has a plan, a pure function of the seed, the epoch, the world size and the options: the
//! store's rows in a seeded order (or in input order), cut into batches — `Rows(n)` rows each, padded;
//! `Tokens` padded batches of at most a token budget, rows of similar length together; or `Packs`,
//! padding-free packs of whole documents planned by exact fill — and the batches dealt to the ranks in
//! turn. Every rank has the same number of steps (a rank whose turn has run out gets an empty batch at
//! the end, whose token-mean loss is 0), and across the ranks an epoch holds every row exactly once. The
//! plan being a function, a [`LoaderState`] (epoch, step) is all it takes to resume exactly where a run
//! stopped.
//!
//! Rows are gathered from the memory-mapped store and cut to `max_len` on a background thread,
//! `prefetch` steps ahead; each step is then collated on the loader's [`Device`] (on a GPU: one pinned
//! upload and one kernel on the device's stream, nothing synchronized).

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};

use crate::backend::{Device, Placed};
use crate::collate::{Batch, CollateSpec, Pack};
use crate::ragged::{LengthLimit, Truncation};
use crate::schedule::{plan_packs, Overflow, PackSpec};
use crate::store::Store;
use crate::{Error, RaggedBatch, Result};

/// How rows become steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Batching {
    /// `n` rows per step, padded to the longest.
    Rows(usize),
    /// Padded steps of at most `tokens` positions (rows × padded width; a longer row alone), the rows of
    /// each `window` sorted by length first so that a step holds rows of similar length.
    Tokens { tokens: usize, window: usize },
    /// One padding-free pack per step, planned within windows of `window` rows.
    Packs { pack: PackSpec, window: usize },
}

/// Everything a loader is made with besides the store and the device.
#[derive(Clone, Debug)]
pub struct LoaderConfig {
    pub batching: Batching,
    /// The tensors' spec; `pad_id: None` takes the store's tokenizer's.
    pub spec: CollateSpec,
    /// A new seeded order every epoch (else input order).
    pub shuffle: bool,
    pub seed: u64,
    /// Data parallelism: this process's rank among `world_size`.
    pub rank: usize,
    pub world_size: usize,
    /// Steps gathered ahead on a background thread (0: each step when asked).
    pub prefetch: usize,
}

impl LoaderConfig {
    pub fn new(batching: Batching) -> Self {
        LoaderConfig {
            batching,
            spec: CollateSpec::default(),
            shuffle: true,
            seed: 0,
            rank: 0,
            world_size: 1,
            prefetch: 2,
        }
    }
}

/// Where a loader is: the next step to give. Serializable, so that a checkpoint resumes the data too.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LoaderState {
    pub epoch: u64,
    pub step: usize,
}

/// A document of a pack: a store row, or one piece of a row split to fit (`Overflow::Split`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DocRef {
    pub row: usize,
    pub piece: u32,
}

/// One step's batch, where the device left it.
#[derive(Debug)]
pub enum LoaderBatch {
    Padded(Placed<Batch>),
    Packed(Placed<Pack>),
}

/// One step: its place in the run, the store rows it holds (in order), and the batch.
#[derive(Debug)]
pub struct Step {
    pub state: LoaderState,
    pub rows: Vec<usize>,
    pub batch: LoaderBatch,
}

/// The plan of one epoch for every rank: `steps[s]` is, per rank, what step `s` holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EpochPlan {
    /// `per_rank[r][s]`: the documents of rank `r`'s step `s` (for padded steps, whole rows: piece 0).
    pub per_rank: Vec<Vec<Vec<DocRef>>>,
}

impl EpochPlan {
    /// Steps every rank takes.
    pub fn steps(&self) -> usize {
        self.per_rank.first().map_or(0, Vec::len)
    }
}

/// SplitMix64: the seeded stream behind the shuffles (fixed here, so plans never change with a crate's
/// version).
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Fisher–Yates.
    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            items.swap(i, j);
        }
    }
}

/// The plan of `epoch` (a pure function of the store's row lengths and the options).
pub fn plan_epoch(store: &Store, config: &LoaderConfig, epoch: u64) -> Result<EpochPlan> {
    let world = config.world_size;
    let mut rng = SplitMix(config.seed ^ epoch.wrapping_mul(0xA24B_AED4_963E_E407));
    let mut order: Vec<usize> = (0..store.len()).collect();
    if config.shuffle {
        rng.shuffle(&mut order);
    }
    let limit = config.spec.limit();
    // A row's length once cut to max_len (both truncations keep exactly max_len tokens).
    let len_of = |row: usize| {
        let len = store.row(row).tokens.len();
        limit.max_len.map_or(len, |m| len.min(m))
    };
    let whole = |rows: &[usize]| -> Vec<DocRef> {
        rows.iter().map(|&row| DocRef { row, piece: 0 }).collect()
    };
    let mut batches: Vec<Vec<DocRef>> = match config.batching {
        Batching::Rows(n) => order.chunks(n).map(whole).collect(),
        Batching::Tokens { tokens, window } => {
            let mut batches = Vec::new();
            for chunk in order.chunks(window) {
                let mut rows = chunk.to_vec();
                rows.sort_by_key(|&r| len_of(r));
                let mut current: Vec<usize> = Vec::new();
                for row in rows {
                    let width = config.spec.width_for(len_of(row));
                    if !current.is_empty() && (current.len() + 1) * width > tokens {
                        batches.push(whole(&current));
                        current.clear();
                    }
                    current.push(row);
                }
                if !current.is_empty() {
                    batches.push(whole(&current));
                }
            }
            // Lengths vary from step to step, not in a sawtooth.
            if config.shuffle {
                rng.shuffle(&mut batches);
            }
            batches
        }
        Batching::Packs { pack, window } => {
            let mut batches = Vec::new();
            for chunk in order.chunks(window) {
                let mut docs = Vec::new();
                let mut lens = Vec::new();
                for &row in chunk {
                    let len = len_of(row);
                    match pack.overflow {
                        Overflow::Split if len > pack.max_tokens => {
                            for piece in 0..len.div_ceil(pack.max_tokens) {
                                docs.push(DocRef {
                                    row,
                                    piece: piece as u32,
                                });
                                lens.push((len - piece * pack.max_tokens).min(pack.max_tokens));
                            }
                        }
                        Overflow::Truncate => {
                            docs.push(DocRef { row, piece: 0 });
                            lens.push(len.min(pack.max_tokens));
                        }
                        _ => {
                            docs.push(DocRef { row, piece: 0 });
                            lens.push(len);
                        }
                    }
                }
                // A document too long for a pack is named by its input line.
                let packs = plan_packs(&lens, &pack)
                    .map_err(|e| store.name_line(e, |d| docs.get(d).map(|doc| doc.row)))?;
                batches.extend(
                    packs
                        .into_iter()
                        .map(|p| p.into_iter().map(|d| docs[d]).collect::<Vec<_>>()),
                );
            }
            batches
        }
    };
    let steps = batches.len().div_ceil(world);
    batches.resize(steps * world, Vec::new());
    let mut per_rank = vec![Vec::with_capacity(steps); world];
    for (k, batch) in batches.into_iter().enumerate() {
        per_rank[k % world].push(batch);
    }
    Ok(EpochPlan { per_rank })
}

/// A step's rows gathered and cut (the part done ahead).
struct Gathered {
    state: LoaderState,
    rows: Vec<usize>,
    ragged: RaggedBatch,
}

/// The rows of one step as a ragged batch: whole rows cut to `limit`, or (packs) each document fitted to
/// the pack (truncated, or the piece of a split row).
fn gather(
    store: &Store,
    batching: &Batching,
    limit: &LengthLimit,
    docs: &[DocRef],
) -> Result<RaggedBatch> {
    let rows: Vec<usize> = docs.iter().map(|d| d.row).collect();
    let Batching::Packs { pack, .. } = batching else {
        return store.ragged(&rows, limit);
    };
    let truncation = match limit.truncation {
        Truncation::Error => Truncation::PromptLeft,
        t => t,
    };
    let mut out = RaggedBatch::new();
    for doc in docs {
        let one = store.ragged(&[doc.row], limit)?;
        let pieces = pack.fit_row(&one, 0, truncation)?;
        let segments = pieces
            .get(doc.piece as usize)
            .ok_or_else(|| Error::InvalidOption {
                name: "pack",
                reason: format!("row {} has no piece {}", doc.row, doc.piece),
            })?;
        let refs: Vec<(&[u32], bool)> = segments.iter().map(|(t, f)| (t.as_slice(), *f)).collect();
        out.push_segments(&refs);
    }
    Ok(out)
}

/// Gathers steps from `state` on, in order, forever (or until the receiver is dropped).
fn prefetcher(
    store: Arc<Store>,
    config: LoaderConfig,
    mut state: LoaderState,
    depth: usize,
) -> Receiver<Result<Gathered>> {
    let (tx, rx) = sync_channel(depth.max(1));
    std::thread::spawn(move || {
        let limit = config.spec.limit();
        loop {
            let plan = match plan_epoch(&store, &config, state.epoch) {
                Ok(plan) => plan,
                Err(e) => {
                    let _ = tx.send(Err(e));
                    return;
                }
            };
            let mine = &plan.per_rank[config.rank];
            while state.step < mine.len() {
                let docs = &mine[state.step];
                let gathered =
                    gather(&store, &config.batching, &limit, docs).map(|ragged| Gathered {
                        state,
                        rows: docs.iter().map(|d| d.row).collect(),
                        ragged,
                    });
                let failed = gathered.is_err();
                if tx.send(gathered).is_err() || failed {
                    return;
                }
                state.step += 1;
            }
            if mine.is_empty() && store.is_empty() {
                return; // Nothing to give, ever.
            }
            state = LoaderState {
                epoch: state.epoch + 1,
                step: 0,
            };
        }
    });
    rx
}

/// Batches from a token store, epoch after epoch (see the module's documentation).
pub struct Loader {
    store: Arc<Store>,
    config: LoaderConfig,
    spec: CollateSpec,
    device: Device,
    state: LoaderState,
    ahead: Option<Receiver<Result<Gathered>>>,
    /// The last epoch's plan, kept (planning shuffles and packs the whole store).
    plan: Mutex<Option<(u64, Arc<EpochPlan>)>>,
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader")
            .field("store", &self.store)
            .field("config", &self.config)
            .field("state", &self.state)
            .finish()
    }
}

impl Loader {
    /// A loader at epoch 0, step 0. Checks the options (a rank inside the world, a batch of at least one
    /// row or token, the spec, the pad id) and plans epoch 0, so that a row too long for a pack is an
    /// error now, not at some step.
    pub fn new(store: Arc<Store>, config: LoaderConfig, device: Device) -> Result<Loader> {
        let bad = |name: &'static str, reason: String| Err(Error::InvalidOption { name, reason });
        if config.world_size == 0 {
            return bad("world_size", "must be at least 1".into());
        }
        if config.rank >= config.world_size {
            return bad(
                "rank",
                format!(
                    "{} is not a rank of a world of {}",
                    config.rank, config.world_size
                ),
            );
        }
        let size = match config.batching {
            Batching::Rows(n) => n,
            Batching::Tokens { tokens, window } => tokens.min(window),
            Batching::Packs { pack, window } => pack.max_tokens.min(window),
        };
        if size == 0 {
            return bad("batching", "a step needs at least one row or token".into());
        }
        if let Batching::Packs { pack, .. } = &config.batching {
            pack.validate()?;
            if config.spec.attention_mask {
                return bad(
                    "attention_mask",
                    "packs have no attention mask: cu_seqlens and position_ids say where each document is"
                        .into(),
                );
            }
        }
        let spec = CollateSpec {
            pad_id: Some(
                config
                    .spec
                    .pad_id
                    .or(store.tokenizer().pad_id)
                    .ok_or(Error::NoPadToken)?,
            ),
            ..config.spec.clone()
        };
        spec.validate()?;
        let first = Arc::new(plan_epoch(&store, &config, 0)?);
        Ok(Loader {
            store,
            config,
            spec,
            device,
            state: LoaderState::default(),
            ahead: None,
            plan: Mutex::new(Some((0, first))),
        })
    }

    /// The plan of `epoch`, from the cache when it is the last one asked for.
    fn plan(&self, epoch: u64) -> Result<Arc<EpochPlan>> {
        let mut cached = self.plan.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((e, plan)) = cached.as_ref() {
            if *e == epoch {
                return Ok(plan.clone());
            }
        }
        let plan = Arc::new(plan_epoch(&self.store, &self.config, epoch)?);
        *cached = Some((epoch, plan.clone()));
        Ok(plan)
    }

    /// Steps per epoch, the same on every rank.
    pub fn steps_per_epoch(&self) -> Result<usize> {
        Ok(self.plan(self.state.epoch)?.steps())
    }

    /// The next step to give.
    pub fn state(&self) -> LoaderState {
        self.state
    }

    /// Resume at `state` (as [`Loader::state`] gave it): the steps that follow are those that would have
    /// followed.
    pub fn set_state(&mut self, state: LoaderState) {
        self.state = state;
        self.ahead = None;
    }

    /// The next step, collated on the device (crossing into the next epoch when this one is done).
    pub fn next_step(&mut self) -> Result<Step> {
        let (state, rows, ragged) = self.next_rows()?;
        let batch = match self.config.batching {
            Batching::Packs { .. } => {
                LoaderBatch::Packed(self.device.collate_pack(&ragged, &self.spec)?)
            }
            _ => LoaderBatch::Padded(self.device.collate(&ragged, &self.spec)?),
        };
        Ok(Step { state, rows, batch })
    }

    /// The spec steps are collated with (the pad id resolved).
    pub fn spec(&self) -> &CollateSpec {
        &self.spec
    }

    /// The next step's rows, gathered and cut but not collated (for a caller that collates them itself,
    /// as the Python package does into torch's tensors): its state, its store rows, the ragged batch
    /// (for packs, the documents of one pack).
    pub fn next_rows(&mut self) -> Result<(LoaderState, Vec<usize>, RaggedBatch)> {
        let gathered = match self.config.prefetch {
            0 => self.gather_now()?,
            depth => {
                let store = &self.store;
                let ahead = self.ahead.get_or_insert_with(|| {
                    prefetcher(store.clone(), self.config.clone(), self.state, depth)
                });
                match ahead.recv() {
                    Ok(gathered) => gathered?,
                    Err(_) => {
                        self.ahead = None;
                        return Err(Error::Empty("the store has no rows to load".into()));
                    }
                }
            }
        };
        debug_assert_eq!(gathered.state, self.state);
        self.state = self.advance(gathered.state)?;
        Ok((gathered.state, gathered.rows, gathered.ragged))
    }

    fn gather_now(&self) -> Result<Gathered> {
        if self.store.is_empty() {
            return Err(Error::Empty("the store has no rows to load".into()));
        }
        let mut state = self.state;
        loop {
            let plan = self.plan(state.epoch)?;
            let mine = &plan.per_rank[self.config.rank];
            if let Some(docs) = mine.get(state.step) {
                let ragged = gather(&self.store, &self.config.batching, &self.spec.limit(), docs)?;
                return Ok(Gathered {
                    state,
                    rows: docs.iter().map(|d| d.row).collect(),
                    ragged,
                });
            }
            state = LoaderState {
                epoch: state.epoch + 1,
                step: 0,
            };
        }
    }

    /// The state after giving `given`.
    fn advance(&self, given: LoaderState) -> Result<LoaderState> {
        let steps = self.plan(given.epoch)?.steps();
        Ok(match given.step + 1 < steps {
            true => LoaderState {
                epoch: given.epoch,
                step: given.step + 1,
            },
            false => LoaderState {
                epoch: given.epoch + 1,
                step: 0,
            },
        })
    }
}
