//! The per-thread cache from pre-token bytes to ids in front of the merge loop. SFT text repeats a lot
//! (every row's prompt repeats its template), so most pre-tokens never reach the merge loop. No locks:
//! each thread keeps its own caches, for up to [`CACHES_PER_THREAD`] tokenizers (least recently used
//! dropped), each bounded in entries and word length.

use std::cell::RefCell;

use rustc_hash::FxHashMap;

/// Entries one thread's cache holds before it starts afresh.
const CACHE_ENTRIES: usize = 1 << 16;
/// Longer pre-tokens (base64, long runs) rarely repeat; keeping them would let a few inputs fill the
/// cache's memory, so they are encoded every time.
pub(super) const CACHE_WORD_MAX: usize = 256;
/// Tokenizers a thread keeps a cache for at once (a trainer may alternate between a policy's and a reward
/// model's).
const CACHES_PER_THREAD: usize = 4;

/// Cache counters, for reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CacheStats {
    /// Pre-tokens found in the cache (or a single byte, which needs no lookup).
    pub hits: u64,
    /// Pre-tokens that went through the merge loop.
    pub misses: u64,
}

impl CacheStats {
    /// Hits over lookups, 0 when there were none.
    pub fn hit_rate(&self) -> f64 {
        let total = self.hits + self.misses;
        if total == 0 {
            0.0
        } else {
            self.hits as f64 / total as f64
        }
    }
}

/// One tokenizer's cache on one thread.
#[derive(Default)]
pub(super) struct Cache {
    key: u64,
    map: FxHashMap<Box<[u8]>, (u32, u32)>,
    ids: Vec<u32>,
    pub(super) hits: u64,
    pub(super) misses: u64,
}

impl Cache {
    /// The ids cached for `word`.
    #[inline]
    pub(super) fn get(&self, word: &[u8]) -> Option<&[u32]> {
        let &(start, len) = self.map.get(word)?;
        Some(&self.ids[start as usize..(start + len) as usize])
    }

    /// Remember `ids` for `word` (a word over [`CACHE_WORD_MAX`] bytes is not kept).
    pub(super) fn insert(&mut self, word: &[u8], ids: &[u32]) {
        if word.len() > CACHE_WORD_MAX {
            return;
        }
        if self.map.len() >= CACHE_ENTRIES {
            self.map.clear();
            self.ids.clear();
        }
        let at = self.ids.len() as u32;
        self.ids.extend_from_slice(ids);
        self.map.insert(word.into(), (at, ids.len() as u32));
    }
}

thread_local! {
    /// Most recently used last.
    static CACHES: RefCell<Vec<Cache>> = const { RefCell::new(Vec::new()) };
}

/// Run `f` with this thread's cache for the tokenizer `key`, made most recently used (created, evicting
/// the least recently used, when missing).
pub(super) fn with_cache<R>(key: u64, f: impl FnOnce(&mut Cache) -> R) -> R {
    CACHES.with(|caches| {
        let mut caches = caches.borrow_mut();
        match caches.iter().position(|c| c.key == key) {
            Some(at) => {
                let mine = caches.remove(at);
                caches.push(mine);
            }
            None => {
                if caches.len() == CACHES_PER_THREAD {
                    caches.remove(0);
                }
                caches.push(Cache {
                    key,
                    ..Cache::default()
                });
            }
        }
        f(caches.last_mut().expect("just pushed"))
    })
}
