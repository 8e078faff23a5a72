//! The vocabulary in one buffer: each token's id, length and bytes side by side, an index from id to
//! token, and an open-addressing table from bytes to token. Loading 150k tokens fills three buffers
//! rather than allocating 150k boxes (a `HashMap<Box<[u8]>, u32>` cost more to build and to drop than
//! the rest of a load), and a lookup touches two places: its slot, and the token the slot names.

/// Bytes before each token in the arena: its id and its length, both `u32` little-endian.
const HEADER: usize = 8;
/// `by_id` for an id no token has.
const NONE: u32 = u32::MAX;

/// Tokens by id and by bytes. Two tokens may share an id (as in `tokenizers`, both then encode to it;
/// the last one is the id's token); the same bytes listed twice keep the last id, as a JSON object
/// read into a map does.
pub(crate) struct Vocab {
    /// Tokens one after another: id, length, bytes.
    arena: Vec<u8>,
    /// Where each id's token starts in `arena`, or [`NONE`].
    by_id: Vec<u32>,
    /// `fingerprint << 32 | (offset + 1)`, 0 when empty; a power of two long, at most half full.
    slots: Vec<u64>,
}

/// Tokens pushed in order, then indexed once by [`VocabBuilder::finish`].
pub(crate) struct VocabBuilder {
    arena: Vec<u8>,
    count: usize,
    max_id: Option<u32>,
}

impl VocabBuilder {
    /// Room for `tokens` tokens of `bytes` bytes in all.
    pub(crate) fn with_capacity(tokens: usize, bytes: usize) -> VocabBuilder {
        VocabBuilder {
            arena: Vec::with_capacity(tokens * HEADER + bytes),
            count: 0,
            max_id: None,
        }
    }

    pub(crate) fn push(&mut self, token: &[u8], id: u32) {
        self.push_with(id, |buf| {
            buf.extend_from_slice(token);
            true
        });
    }

    /// A token `write` appends to the buffer itself (converting as it goes); when it returns false,
    /// whatever it wrote is dropped and no token is added.
    pub(crate) fn push_with(&mut self, id: u32, write: impl FnOnce(&mut Vec<u8>) -> bool) -> bool {
        let start = self.arena.len();
        self.arena.extend_from_slice(&id.to_le_bytes());
        self.arena.extend_from_slice(&[0; 4]);
        if !write(&mut self.arena) {
            self.arena.truncate(start);
            return false;
        }
        let len = (self.arena.len() - start - HEADER) as u32;
        self.arena[start + 4..start + HEADER].copy_from_slice(&len.to_le_bytes());
        self.count += 1;
        self.max_id = self.max_id.max(Some(id));
        true
    }

    pub(crate) fn len(&self) -> usize {
        self.count
    }

    /// A builder holding the tokens of an arena as [`Vocab::arena`] gave it (read back from the load
    /// cache); `None` unless every entry is whole.
    pub(crate) fn from_arena(arena: Vec<u8>) -> Option<VocabBuilder> {
        let (mut offset, mut count, mut max_id) = (0usize, 0usize, None);
        while offset < arena.len() {
            let header = arena.get(offset..offset.checked_add(HEADER)?)?;
            let id = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
            let len = u32::from_le_bytes(header[4..].try_into().expect("4 bytes")) as usize;
            offset = offset.checked_add(HEADER)?.checked_add(len)?;
            if offset > arena.len() {
                return None;
            }
            count += 1;
            max_id = max_id.max(Some(id));
        }
        Some(VocabBuilder {
            arena,
            count,
            max_id,
        })
    }

    /// The indexed vocabulary; `Err` for one this engine does not take (ids far beyond its size, or
    /// more than 4 GiB of tokens).
    pub(crate) fn finish(self) -> Result<Vocab, String> {
        let VocabBuilder {
            arena,
            count,
            max_id,
        } = self;
        if u32::try_from(arena.len()).is_err() {
            return Err("a vocabulary over 4 GiB".into());
        }
        let ids = max_id.map_or(0, |m| m as usize + 1);
        // Ids index a table; a file with ids far beyond its size is not one this engine takes.
        if ids > 4 * count + (1 << 20) {
            return Err(format!("token id {} in a vocabulary of {count}", ids - 1));
        }
        let mut vocab = Vocab {
            by_id: vec![NONE; ids],
            slots: vec![0; (2 * count).next_power_of_two().max(16)],
            arena,
        };
        let mut offset = 0;
        while offset < vocab.arena.len() {
            let (id, token) = entry(&vocab.arena, offset);
            vocab.by_id[id as usize] = offset as u32;
            let next = offset + HEADER + token.len();
            vocab.insert(offset as u32);
            offset = next;
        }
        Ok(vocab)
    }
}

/// The token at `offset` in the arena: its id and bytes.
#[inline(always)]
fn entry(arena: &[u8], offset: usize) -> (u32, &[u8]) {
    let header = &arena[offset..offset + HEADER];
    let id = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
    let len = u32::from_le_bytes(header[4..].try_into().expect("4 bytes")) as usize;
    (id, &arena[offset + HEADER..offset + HEADER + len])
}

impl Vocab {
    /// The slot of `token` (of hash `h`): the one holding it (and its id), or the empty one where it
    /// would go.
    #[inline]
    fn probe(&self, token: &[u8], h: u64) -> (usize, Option<u32>) {
        let mask = self.slots.len() - 1;
        let mut i = h as usize & mask;
        loop {
            let slot = self.slots[i];
            if slot == 0 {
                return (i, None);
            }
            if (slot >> 32) as u32 == (h >> 32) as u32 {
                let (id, bytes) = entry(&self.arena, (slot as u32 - 1) as usize);
                if bytes == token {
                    return (i, Some(id));
                }
            }
            i = (i + 1) & mask;
        }
    }

    /// Index the token at `offset`: a new slot, or the slot of the same bytes taken over.
    fn insert(&mut self, offset: u32) {
        let token = entry(&self.arena, offset as usize).1;
        let h = hash(token);
        let i = self.probe(token, h).0;
        self.slots[i] = (h >> 32) << 32 | (offset as u64 + 1);
    }

    /// The id of the token with these bytes.
    #[inline]
    pub(crate) fn get(&self, token: &[u8]) -> Option<u32> {
        self.probe(token, hash(token)).1
    }

    pub(crate) fn contains(&self, token: &[u8]) -> bool {
        self.get(token).is_some()
    }

    /// The bytes of the token with this id.
    #[inline]
    pub(crate) fn token(&self, id: u32) -> Option<&[u8]> {
        match *self.by_id.get(id as usize)? {
            NONE => None,
            offset => Some(entry(&self.arena, offset as usize).1),
        }
    }

    /// Every token as pushed, in order: what [`VocabBuilder::from_arena`] reads back.
    pub(crate) fn arena(&self) -> &[u8] {
        &self.arena
    }

    /// Every token (by bytes, with the id a lookup gives), in no particular order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&[u8], u32)> + '_ {
        self.slots.iter().filter(|&&s| s != 0).map(|&s| {
            let (id, token) = entry(&self.arena, (s as u32 - 1) as usize);
            (token, id)
        })
    }
}

/// A hash of a token's bytes: 8 bytes at a time (the last load overlapping the one before), then
/// splitmix64's finalizer, so that both the low bits (the slot) and the high ones (the fingerprint) mix
/// every input bit.
#[inline(always)]
fn hash(bytes: &[u8]) -> u64 {
    const K: u64 = 0x9E37_79B9_7F4A_7C15;
    let n = bytes.len();
    let load8 = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
    let mut h = (n as u64).wrapping_mul(K);
    if n >= 8 {
        let mut at = 0;
        while at + 8 < n {
            h = (h ^ load8(at)).wrapping_mul(K).rotate_left(29);
            at += 8;
        }
        h ^= load8(n - 8);
    } else if n >= 4 {
        let load4 = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4")) as u64;
        h ^= load4(0) | load4(n - 4) << 32;
    } else if n > 0 {
        h ^= bytes[0] as u64 | (bytes[n / 2] as u64) << 8 | (bytes[n - 1] as u64) << 16;
    }
    let mut z = h;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    proptest! {
        /// Lookups agree with a `HashMap` filled in the same order (last id wins for repeated bytes),
        /// for present and absent tokens, and every id gives back its last token.
        #[test]
        fn agrees_with_a_map(
            tokens in prop::collection::vec((prop::collection::vec(0u8..4, 0..20), 0u32..300), 0..400),
            probes in prop::collection::vec(prop::collection::vec(0u8..4, 0..20), 0..100),
        ) {
            let mut builder = VocabBuilder::with_capacity(0, 0);
            let mut map = HashMap::new();
            let mut by_id = HashMap::new();
            for (token, id) in &tokens {
                builder.push(token, *id);
                map.insert(token.clone(), *id);
                by_id.insert(*id, token.clone());
            }
            let vocab = builder.finish().unwrap();
            for probe in probes.iter().chain(tokens.iter().map(|t| &t.0)) {
                prop_assert_eq!(vocab.get(probe), map.get(probe).copied());
            }
            for id in 0..310 {
                prop_assert_eq!(vocab.token(id), by_id.get(&id).map(|t| &t[..]));
            }
            let mut all: Vec<(Vec<u8>, u32)> = vocab.iter().map(|(t, id)| (t.to_vec(), id)).collect();
            let mut expected: Vec<(Vec<u8>, u32)> = map.into_iter().collect();
            all.sort();
            expected.sort();
            prop_assert_eq!(all, expected);
        }
    }

    #[test]
    fn a_refused_token_leaves_nothing() {
        let mut builder = VocabBuilder::with_capacity(2, 8);
        builder.push(b"ab", 0);
        assert!(!builder.push_with(1, |buf| {
            buf.extend_from_slice(b"zz");
            false
        }));
        let vocab = builder.finish().unwrap();
        assert_eq!(vocab.iter().count(), 1);
        assert_eq!(vocab.get(b"ab"), Some(0));
        assert_eq!(vocab.get(b"zz"), None);
        assert_eq!(vocab.token(1), None);
    }

    #[test]
    fn an_arena_reads_back_whole_or_not_at_all() {
        let mut builder = VocabBuilder::with_capacity(3, 8);
        builder.push(b"ab", 7);
        builder.push(b"", 2);
        builder.push(b"xyz", 0);
        let vocab = builder.finish().unwrap();
        let again = VocabBuilder::from_arena(vocab.arena().to_vec()).unwrap();
        assert_eq!(again.len(), 3);
        let again = again.finish().unwrap();
        assert_eq!(again.arena(), vocab.arena());
        assert_eq!((again.get(b"ab"), again.get(b"xyz")), (Some(7), Some(0)));
        for cut in 1..vocab.arena().len() {
            let arena = vocab.arena()[..cut].to_vec();
            let whole = [8 + 2, 8 + 2 + 8].contains(&cut);
            assert_eq!(
                VocabBuilder::from_arena(arena).is_some(),
                whole,
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn ids_far_beyond_the_size_are_refused() {
        let mut builder = VocabBuilder::with_capacity(1, 1);
        builder.push(b"a", 1 << 30);
        assert!(builder.finish().is_err());
    }
}
