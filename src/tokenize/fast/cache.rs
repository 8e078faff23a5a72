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

/// One tokenizer's cache on one thread. Words of up to [`MEDIUM`] bytes (nearly all of them) are keyed
/// by their bytes packed into integers, in tables of their own ([`PackedTable`]: a multiply to hash, a
/// compare to check, one cache line per lookup); longer words in a hash map. A word of one token (most of
/// them) keeps its id in its entry; the ids of longer ones are in `ids`.
#[derive(Default)]
pub(super) struct Cache {
    key: u64,
    short: PackedTable<u64>,
    medium: PackedTable<[u64; 2]>,
    map: FxHashMap<Box<[u8]>, Entry>,
    ids: Vec<u32>,
    /// Words that went through the merge loop (the hits are counted by the caller, from the words).
    pub(super) misses: u64,
}

/// A cached word's ids: `n` of them, the id itself when `n` is 1, else their start in [`Cache::ids`].
#[derive(Clone, Copy, Default)]
struct Entry {
    at: u32,
    n: u32,
}

/// Words this long or shorter go in [`Cache::short`].
const SHORT: usize = 7;
/// Words longer than [`SHORT`] and this long or shorter go in [`Cache::medium`].
const MEDIUM: usize = 15;

/// A short word's bytes and length in one `u64` (the length in the top byte keeps "a" and "a\0" apart,
/// and no word's key is 0), from overlapping loads rather than a copy into a buffer (whose stores the load
/// would wait for).
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

/// A medium word (8 to 15 bytes): its first eight bytes, then the rest and its length as [`pack`] lays
/// them out (from the last eight bytes, shifted down past the overlap).
#[inline(always)]
fn pack_medium(word: &[u8]) -> [u64; 2] {
    let n = word.len();
    debug_assert!((SHORT + 1..=MEDIUM).contains(&n));
    let lo = u64::from_le_bytes(word[..8].try_into().expect("8 bytes"));
    let last = u64::from_le_bytes(word[n - 8..].try_into().expect("8 bytes"));
    // `n - 8` bytes past the first eight, at most 7: the top byte is free for the length. (`n == 8`
    // shifts by 64, which `checked_shr` turns into no bytes.)
    let rest = last.checked_shr(8 * (16 - n) as u32).unwrap_or(0);
    [lo, rest | (n as u64) << 56]
}

/// A key of a [`PackedTable`]: never equal to `Default::default()`, which marks an empty slot.
trait PackedKey: Copy + Default + PartialEq {
    fn mix(self) -> u64;
}

impl PackedKey for u64 {
    #[inline(always)]
    fn mix(self) -> u64 {
        self
    }
}

impl PackedKey for [u64; 2] {
    #[inline(always)]
    fn mix(self) -> u64 {
        self[0] ^ self[1].wrapping_mul(0xC2B2_AE3D_27D4_EB4F).rotate_left(31)
    }
}

/// Open addressing over packed keys, linear probing, at most half full: key and entry in one slot, so a
/// hit reads one cache line (a general map reads its control bytes, then the slot). Never empty (a
/// lookup needs no check for that), and `shift` kept beside the slots so that a lookup's index is one
/// multiply and one shift.
struct PackedTable<K> {
    slots: Vec<(K, Entry)>,
    shift: u32,
    len: usize,
}

impl<K: PackedKey> Default for PackedTable<K> {
    fn default() -> Self {
        PackedTable::with_slots(Self::FIRST)
    }
}

impl<K: PackedKey> PackedTable<K> {
    const FIRST: usize = 1 << 12;

    fn with_slots(n: usize) -> Self {
        debug_assert!(n.is_power_of_two());
        PackedTable {
            slots: vec![(K::default(), Entry::default()); n],
            shift: 64 - n.trailing_zeros(),
            len: 0,
        }
    }

    #[inline(always)]
    fn home(&self, key: K) -> usize {
        // Fibonacci hashing: the top bits of the product, which every key bit reaches.
        (key.mix().wrapping_mul(0x9E37_79B9_7F4A_7C15) >> self.shift) as usize
    }

    #[inline(always)]
    fn get(&self, key: K) -> Option<&Entry> {
        let mask = self.slots.len() - 1;
        let mut at = self.home(key);
        loop {
            let (k, ref entry) = self.slots[at];
            if k == key {
                return Some(entry);
            }
            if k == K::default() {
                return None;
            }
            at = (at + 1) & mask;
        }
    }

    fn insert(&mut self, key: K, entry: Entry) {
        if (self.len + 1) * 2 > self.slots.len() {
            let old = std::mem::replace(self, PackedTable::with_slots(self.slots.len() * 2)).slots;
            for (k, e) in old {
                if k != K::default() {
                    self.insert(k, e);
                }
            }
        }
        let mask = self.slots.len() - 1;
        let mut at = self.home(key);
        while self.slots[at].0 != K::default() && self.slots[at].0 != key {
            at = (at + 1) & mask;
        }
        if self.slots[at].0 == K::default() {
            self.len += 1;
        }
        self.slots[at] = (key, entry);
    }

    fn clear(&mut self) {
        self.slots.fill((K::default(), Entry::default()));
        self.len = 0;
    }
}

impl Cache {
    /// The ids cached for `word` (not empty).
    #[inline(always)]
    pub(super) fn get(&self, word: &[u8]) -> Option<&[u32]> {
        let entry = if word.len() <= SHORT {
            self.short.get(pack(word))?
        } else if word.len() <= MEDIUM {
            self.medium.get(pack_medium(word))?
        } else {
            self.get_long(word)?
        };
        Some(match entry.n {
            1 => std::slice::from_ref(&entry.at),
            n => &self.ids[entry.at as usize..(entry.at + n) as usize],
        })
    }

    #[inline(never)]
    fn get_long(&self, word: &[u8]) -> Option<&Entry> {
        self.map.get(word)
    }

    /// Remember `ids` for `word` (a word over [`CACHE_WORD_MAX`] bytes is not kept).
    pub(super) fn insert(&mut self, word: &[u8], ids: &[u32]) {
        if word.len() > CACHE_WORD_MAX {
            return;
        }
        if self.map.len() + self.short.len + self.medium.len >= CACHE_ENTRIES {
            self.map.clear();
            self.short.clear();
            self.medium.clear();
            self.ids.clear();
        }
        let entry = match ids {
            [id] => Entry { at: *id, n: 1 },
            _ => {
                let at = self.ids.len() as u32;
                self.ids.extend_from_slice(ids);
                Entry {
                    at,
                    n: ids.len() as u32,
                }
            }
        };
        if word.len() <= SHORT {
            self.short.insert(pack(word), entry);
        } else if word.len() <= MEDIUM {
            self.medium.insert(pack_medium(word), entry);
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

    /// Every word of up to 7 bytes packs to its own key (all of them over a small alphabet, with 0), and
    /// every word of 8 to 15 bytes to its own medium key (over two bytes, 0 and 0xFF).
    #[test]
    fn packed_keys_tell_words_apart() {
        let words = |alphabet: &[u8], n: usize| -> Vec<Vec<u8>> {
            (0..alphabet.len().pow(n as u32))
                .map(|k| {
                    (0..n)
                        .map(|i| alphabet[k / alphabet.len().pow(i as u32) % alphabet.len()])
                        .collect()
                })
                .collect()
        };
        let mut seen = std::collections::HashSet::new();
        let mut count = 0;
        for n in 1..=SHORT {
            for word in words(&[0, 1, b'a', 0xFF], n) {
                let key = pack(&word);
                assert!(key != 0 && seen.insert(key), "{word:?}");
                count += 1;
            }
        }
        assert_eq!(seen.len(), count);
        let mut seen = std::collections::HashSet::new();
        count = 0;
        for n in SHORT + 1..=MEDIUM {
            for word in words(&[0, 0xFF], n) {
                let key = pack_medium(&word);
                assert!(key != [0, 0] && seen.insert(key), "{word:?}");
                count += 1;
            }
        }
        assert_eq!(seen.len(), count);
    }

    /// The cache against a plain map: words of every length class (short, medium, long, over the length
    /// kept), one id or several, through the tables' growth and the reset at [`CACHE_ENTRIES`].
    #[test]
    fn cache_is_a_map() {
        let mut cache = Cache::default();
        let mut model: std::collections::HashMap<Vec<u8>, Vec<u32>> = Default::default();
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let lengths = [
            1,
            2,
            3,
            7,
            8,
            9,
            15,
            16,
            17,
            40,
            CACHE_WORD_MAX,
            CACHE_WORD_MAX + 1,
        ];
        let mut inserted = 0;
        for round in 0..3 * CACHE_ENTRIES / 2 {
            let n = lengths[next() as usize % lengths.len()];
            // A small alphabet, so that words repeat and near-misses (one byte apart) are common.
            let word: Vec<u8> = (0..n).map(|_| b"ab\0\xFF"[next() as usize % 4]).collect();
            let ids: Vec<u32> = (0..1 + next() % 3 / 2).map(|_| next() as u32).collect();
            if let Some(want) = model.get(&word) {
                assert_eq!(cache.get(&word), Some(&want[..]), "round {round}: {word:?}");
                continue;
            }
            if inserted == CACHE_ENTRIES {
                // The reset: every entry is gone.
                model.clear();
                inserted = 0;
            }
            assert_eq!(cache.get(&word), None, "round {round}: {word:?}");
            cache.insert(&word, &ids);
            if n <= CACHE_WORD_MAX {
                model.insert(word.clone(), ids.clone());
                inserted += 1;
                assert_eq!(cache.get(&word), Some(&ids[..]));
            } else {
                assert_eq!(cache.get(&word), None, "kept a word over the length kept");
            }
        }
        for (word, ids) in &model {
            assert_eq!(cache.get(word), Some(&ids[..]), "{word:?}");
        }
    }
}
