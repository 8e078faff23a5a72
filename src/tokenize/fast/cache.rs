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

/// One tokenizer's cache on one thread. Words of up to [`SHORT`] bytes (most of them) are keyed by their
/// bytes packed into a `u64`: one multiply to hash and one compare to check, no allocation per entry.
#[derive(Default)]
pub(super) struct Cache {
    key: u64,
    short: FxHashMap<u64, (u32, u32)>,
    map: FxHashMap<Box<[u8]>, (u32, u32)>,
    ids: Vec<u32>,
    pub(super) hits: u64,
    pub(super) misses: u64,
}

/// Words this long or shorter go in [`Cache::short`].
const SHORT: usize = 7;

/// A short word's bytes and length in one `u64` (the length in the top byte keeps "a" and "a\0" apart),
/// from overlapping loads rather than a copy into a buffer (whose stores the load would wait for).
#[inline(always)]
fn pack(word: &[u8]) -> u64 {
    let n = word.len();
    debug_assert!((1..=SHORT).contains(&n));
    let bytes = if n >= 4 {
        let lo = u32::from_le_bytes(word[..4].try_into().expect("4 bytes")) as u64;
        let hi = u32::from_le_bytes(word[n - 4..].try_into().expect("4 bytes")) as u64;
        // The overlap holds the same bytes in both.
        lo | hi << (8 * (n - 4))
    } else {
        word[0] as u64
            | (word[n / 2] as u64) << (8 * (n / 2))
            | (word[n - 1] as u64) << (8 * (n - 1))
    };
    bytes | (n as u64) << 56
}

impl Cache {
    /// The ids cached for `word` (not empty).
    #[inline]
    pub(super) fn get(&self, word: &[u8]) -> Option<&[u32]> {
        let &(start, len) = if word.len() <= SHORT {
            self.short.get(&pack(word))?
        } else {
            self.map.get(word)?
        };
        Some(&self.ids[start as usize..(start + len) as usize])
    }

    /// Remember `ids` for `word` (a word over [`CACHE_WORD_MAX`] bytes is not kept).
    pub(super) fn insert(&mut self, word: &[u8], ids: &[u32]) {
        if word.len() > CACHE_WORD_MAX {
            return;
        }
        if self.map.len() + self.short.len() >= CACHE_ENTRIES {
            self.map.clear();
            self.short.clear();
            self.ids.clear();
        }
        let at = self.ids.len() as u32;
        self.ids.extend_from_slice(ids);
        let entry = (at, ids.len() as u32);
        if word.len() <= SHORT {
            self.short.insert(pack(word), entry);
        } else {
            self.map.insert(word.into(), entry);
        }
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
            Some(at) if at + 1 == caches.len() => {}
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Every word of up to 7 bytes packs to its own key (all of them over a small alphabet, with 0).
    #[test]
    fn packed_keys_tell_words_apart() {
        let alphabet = [0u8, 1, b'a', 0xFF];
        let mut seen = std::collections::HashSet::new();
        let mut words = 0;
        for n in 1..=SHORT {
            for k in 0..alphabet.len().pow(n as u32) {
                let word: Vec<u8> = (0..n)
                    .map(|i| alphabet[k / alphabet.len().pow(i as u32) % alphabet.len()])
                    .collect();
                assert!(seen.insert(pack(&word)), "{word:?}");
                words += 1;
            }
        }
        assert_eq!(seen.len(), words);
    }
}
