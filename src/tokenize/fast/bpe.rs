//! The BPE merge loop, with `tokenizers`' rule: repeatedly merge the adjacent pair of lowest merge rank,
//! the leftmost one on a tie. Short words (almost all pre-tokens) use a plain scan over an array of pair
//! ranks; long ones a heap over a linked list, as `tokenizers` does, so a 100 kB run of letters stays
//! O(n log n).
//!
//! A word starts as symbols of its [`Alphabet`]: one per byte (byte-level BPE), or one per character with
//! `<0xNN>` byte tokens for the characters the vocabulary lacks (SentencePiece-style BPE).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;

use rustc_hash::FxHashMap;

use super::vocab::Vocab;

/// Above this many bytes a word takes the heap path.
const SCAN_MAX: usize = 48;

pub(crate) struct Merges {
    pairs: Pairs,
    alphabet: Alphabet,
    /// Each one-byte word's id (a third of SFT text's words): one load, whatever the alphabet.
    one_byte: [u32; 256],
}

/// Which pairs merge, into what, at which rank.
enum Pairs {
    /// A merge list: (left id << 32 | right id) → (rank << 32 | merged id).
    Table(FxHashMap<u64, u64>),
    /// tiktoken's rule (ids are ranks): two adjacent tokens merge when their bytes joined are a token,
    /// into it, at its rank; looked up in the vocabulary as tiktoken does, so nothing is built at load.
    Ranks(Arc<Vocab>),
}

/// What a word's symbols are before any merge. (One per tokenizer, read on every word: the tables stay
/// inline rather than boxed.)
#[allow(clippy::large_enum_variant)]
pub(crate) enum Alphabet {
    /// Byte-level BPE: one symbol per byte, the byte's token.
    Bytes([u32; 256]),
    /// SentencePiece-style BPE, as `tokenizers` runs it with `byte_fallback`: one symbol per character
    /// the vocabulary has (`ascii` for the first 128), else one per byte of it, its `<0xNN>` token.
    Chars {
        ascii: [u32; 128],
        chars: FxHashMap<char, u32>,
        bytes: [u32; 256],
    },
}

impl Alphabet {
    /// The symbols `word` starts as, in order.
    #[inline]
    fn symbols(&self, word: &str, mut f: impl FnMut(u32)) {
        match self {
            Alphabet::Bytes(ids) => word.bytes().for_each(|b| f(ids[b as usize])),
            Alphabet::Chars {
                ascii,
                chars,
                bytes,
            } => {
                for c in word.chars() {
                    if c.is_ascii() {
                        f(ascii[c as usize]);
                    } else if let Some(&id) = chars.get(&c) {
                        f(id);
                    } else {
                        c.encode_utf8(&mut [0; 4])
                            .bytes()
                            .for_each(|b| f(bytes[b as usize]));
                    }
                }
            }
        }
    }
}

const NONE: u64 = u64::MAX;

/// Under tiktoken's rule, a pair that joins into token `id` merges at rank `id` into it.
#[inline]
fn ranked(id: Option<u32>) -> u64 {
    id.map_or(NONE, |id| (id as u64) << 32 | id as u64)
}

impl Merges {
    /// From (left id, right id, merged id) in rank order. The map is filled in rank order: a pair listed
    /// twice keeps its last rank, as `tokenizers`' map (built by collecting) does.
    pub(crate) fn new(merges: &[(u32, u32, u32)], alphabet: Alphabet) -> Merges {
        let mut pairs = FxHashMap::default();
        pairs.reserve(merges.len());
        pairs.extend(merges.iter().enumerate().map(|(rank, &(a, b, merged))| {
            (
                (a as u64) << 32 | b as u64,
                (rank as u64) << 32 | merged as u64,
            )
        }));
        Merges::with(Pairs::Table(pairs), alphabet)
    }

    fn with(pairs: Pairs, alphabet: Alphabet) -> Merges {
        // A one-byte word is ASCII (text is UTF-8): the Chars alphabet's ASCII ids, the rest unused.
        let one_byte = match &alphabet {
            Alphabet::Bytes(ids) => *ids,
            Alphabet::Chars { ascii, .. } => {
                std::array::from_fn(|b| ascii.get(b).copied().unwrap_or(0))
            }
        };
        Merges {
            pairs,
            alphabet,
            one_byte,
        }
    }

    /// tiktoken's merges, from the vocabulary alone (ids are ranks): any two adjacent tokens whose bytes
    /// joined are a token merge into it, with its rank.
    pub(crate) fn from_ranks(vocab: Arc<Vocab>, byte_ids: [u32; 256]) -> Merges {
        Merges::with(Pairs::Ranks(vocab), Alphabet::Bytes(byte_ids))
    }

    /// The id of a one-byte word (ASCII: a `str` of one byte).
    #[inline(always)]
    pub(crate) fn byte_id(&self, b: u8) -> u32 {
        self.one_byte[b as usize]
    }

    /// Whether a merge joins a symbol ending in anything but `c` to one starting with `c`: if none does,
    /// no merge crosses the point before a `c` that follows another character, and a word encodes as its
    /// pieces cut there do, each on its own. `token` gives an id's token bytes.
    pub(crate) fn merges_into<'v>(&self, c: char, token: impl Fn(u32) -> Option<&'v [u8]>) -> bool {
        let mut buf = [0; 4];
        let c = c.encode_utf8(&mut buf).as_bytes();
        // (Ranks: byte-level only, never cut; say that merges may cross.)
        let Pairs::Table(pairs) = &self.pairs else {
            return true;
        };
        pairs.keys().any(|&pair| {
            let (a, b) = (token((pair >> 32) as u32), token(pair as u32));
            match (a, b) {
                (Some(a), Some(b)) => !a.ends_with(c) && b.starts_with(c),
                _ => true,
            }
        })
    }

    /// `rank << 32 | merged id` of the pair `a b`, or [`NONE`].
    #[inline]
    fn pair(&self, a: u32, b: u32) -> u64 {
        match &self.pairs {
            Pairs::Table(pairs) => pairs
                .get(&((a as u64) << 32 | b as u64))
                .copied()
                .unwrap_or(NONE),
            Pairs::Ranks(vocab) => {
                let (Some(x), Some(y)) = (vocab.token(a), vocab.token(b)) else {
                    return NONE;
                };
                let mut joined = [0u8; 128];
                let id = match joined.get_mut(..x.len() + y.len()) {
                    Some(buf) => {
                        buf[..x.len()].copy_from_slice(x);
                        buf[x.len()..].copy_from_slice(y);
                        vocab.get(buf)
                    }
                    None => vocab.get(&[x, y].concat()),
                };
                ranked(id)
            }
        }
    }

    /// Append the ids of `word` (at least one byte).
    pub(crate) fn encode(&self, word: &str, out: &mut Vec<u32>) {
        if word.len() <= SCAN_MAX {
            self.encode_scan(word, out)
        } else {
            self.encode_heap(word, out)
        }
    }

    pub(crate) fn encode_scan(&self, word: &str, out: &mut Vec<u32>) {
        let mut ids = [0u32; SCAN_MAX];
        let mut ranks = [NONE; SCAN_MAX];
        assert!(word.len() <= SCAN_MAX);
        // At most one symbol per byte.
        let mut n0 = 0;
        self.alphabet.symbols(word, |id| {
            ids[n0] = id;
            n0 += 1;
        });
        // With tiktoken's rule symbols are bytes, and the pair at i is the word's bytes from symbol i's
        // start to symbol i + 1's end: looked up as they are, not joined from the two tokens.
        let mut starts = [0u8; SCAN_MAX + 1];
        let by_bytes = match &self.pairs {
            Pairs::Ranks(vocab) => {
                for (i, s) in starts.iter_mut().enumerate().take(n0 + 1) {
                    *s = i as u8;
                }
                Some(&**vocab)
            }
            Pairs::Table(_) => None,
        };
        let bytes = word.as_bytes();
        let pair = |ids: &[u32], starts: &[u8], i: usize| match by_bytes {
            Some(vocab) => ranked(vocab.get(&bytes[starts[i] as usize..starts[i + 2] as usize])),
            None => self.pair(ids[i], ids[i + 1]),
        };
        for (i, rank) in ranks.iter_mut().enumerate().take(n0.saturating_sub(1)) {
            *rank = pair(&ids, &starts, i);
        }
        let mut n = n0;
        while n > 1 {
            // ranks[i] pairs ids[i] and ids[i + 1]; the lowest, leftmost on ties (same rank = same pair).
            let (mut best, mut at) = (NONE, 0);
            for (i, &r) in ranks[..n - 1].iter().enumerate() {
                if r < best {
                    best = r;
                    at = i;
                }
            }
            if best == NONE {
                break;
            }
            ids[at] = best as u32;
            ids.copy_within(at + 2..n, at + 1);
            starts.copy_within(at + 2..n + 1, at + 1);
            ranks.copy_within(at + 1..n - 1, at);
            n -= 1;
            if at > 0 {
                ranks[at - 1] = pair(&ids, &starts, at - 1);
            }
            if at + 1 < n {
                ranks[at] = pair(&ids, &starts, at);
            }
            ranks[n - 1] = NONE;
        }
        out.extend_from_slice(&ids[..n]);
    }

    pub(crate) fn encode_heap(&self, word: &str, out: &mut Vec<u32>) {
        struct Symbol {
            id: u32,
            prev: u32,
            next: u32,
            alive: bool,
        }
        const END: u32 = u32::MAX;
        let mut initial = Vec::with_capacity(word.len());
        self.alphabet.symbols(word, |id| initial.push(id));
        let n = initial.len();
        let mut symbols: Vec<Symbol> = initial
            .into_iter()
            .enumerate()
            .map(|(i, id)| Symbol {
                id,
                prev: if i == 0 { END } else { i as u32 - 1 },
                next: if i + 1 == n { END } else { i as u32 + 1 },
                alive: true,
            })
            .collect();
        // (rank, position of the left symbol, merged id): the lowest rank, then the leftmost, first.
        let mut heap: BinaryHeap<Reverse<(u32, u32, u32)>> = BinaryHeap::new();
        let push = |heap: &mut BinaryHeap<_>, pos: u32, a: u32, b: u32| {
            let p = self.pair(a, b);
            if p != NONE {
                heap.push(Reverse(((p >> 32) as u32, pos, p as u32)));
            }
        };
        for i in 0..n - 1 {
            push(&mut heap, i as u32, symbols[i].id, symbols[i + 1].id);
        }
        while let Some(Reverse((_, pos, merged))) = heap.pop() {
            let s = &symbols[pos as usize];
            if !s.alive || s.next == END {
                continue;
            }
            let next = s.next;
            // Stale entries: the pair at `pos` is no longer the one this entry was for.
            let current = self.pair(s.id, symbols[next as usize].id);
            if current == NONE || current as u32 != merged {
                continue;
            }
            let after = symbols[next as usize].next;
            symbols[next as usize].alive = false;
            let s = &mut symbols[pos as usize];
            s.id = merged;
            s.next = after;
            let prev = s.prev;
            if after != END {
                symbols[after as usize].prev = pos;
                push(&mut heap, pos, merged, symbols[after as usize].id);
            }
            if prev != END {
                push(&mut heap, prev, symbols[prev as usize].id, merged);
            }
        }
        out.extend(symbols.iter().filter(|s| s.alive).map(|s| s.id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenize::fast::vocab::VocabBuilder;
    use proptest::prelude::*;

    /// A tiny vocabulary over the bytes a, b, c with random merges between them.
    fn merges_from(seq: &[(u8, u8)]) -> Merges {
        let mut vocab: FxHashMap<Box<[u8]>, u32> = FxHashMap::default();
        let mut byte_ids = [0u32; 256];
        for b in 0..=255u8 {
            byte_ids[b as usize] = b as u32;
            vocab.insert(vec![b].into_boxed_slice(), b as u32);
        }
        let mut tokens: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        let mut merges = Vec::new();
        for &(x, y) in seq {
            let (a, b) = (
                tokens[x as usize % tokens.len()].clone(),
                tokens[y as usize % tokens.len()].clone(),
            );
            if a.len() + b.len() > 6 || a.iter().chain(&b).any(|c| !b"abc".contains(c)) {
                continue;
            }
            let joined: Vec<u8> = a.iter().chain(&b).copied().collect();
            if !vocab.contains_key(&joined[..]) {
                vocab.insert(joined.clone().into_boxed_slice(), tokens.len() as u32);
                tokens.push(joined.clone());
            }
            merges.push((vocab[&a[..]], vocab[&b[..]], vocab[&joined[..]]));
        }
        Merges::new(&merges, Alphabet::Bytes(byte_ids))
    }

    /// tiktoken's rule on a vocabulary of the 256 bytes and random tokens over a, b, c (ids after the
    /// bytes, in the order drawn): looked up in the vocabulary, and as the table of every split of every
    /// token (how the rule was built before).
    fn ranks_both_ways(tokens: &[Vec<u8>]) -> (Merges, Merges) {
        let mut builder = VocabBuilder::with_capacity(0, 0);
        let mut byte_ids = [0u32; 256];
        for b in 0..=255u8 {
            byte_ids[b as usize] = b as u32;
            builder.push(&[b], b as u32);
        }
        let mut seen = std::collections::HashSet::new();
        let fresh = tokens
            .iter()
            .filter(|t| t.len() > 1 && seen.insert(t.to_vec()));
        for (next, t) in (256..).zip(fresh) {
            builder.push(t, next);
        }
        let vocab = Arc::new(builder.finish().unwrap());
        let mut table = FxHashMap::default();
        for (token, id) in vocab.iter().filter(|(t, _)| t.len() > 1) {
            for k in 1..token.len() {
                if let (Some(a), Some(b)) = (vocab.get(&token[..k]), vocab.get(&token[k..])) {
                    table.insert((a as u64) << 32 | b as u64, (id as u64) << 32 | id as u64);
                }
            }
        }
        let by_table = Merges::with(Pairs::Table(table), Alphabet::Bytes(byte_ids));
        (Merges::from_ranks(vocab, byte_ids), by_table)
    }

    proptest! {
        #[test]
        fn ranks_looked_up_equal_the_table_of_splits(
            tokens in prop::collection::vec("[abc]{2,6}", 0..60),
            word in "[abc]{1,80}",
        ) {
            let tokens: Vec<Vec<u8>> = tokens.into_iter().map(String::into_bytes).collect();
            let (ranks, table) = ranks_both_ways(&tokens);
            let (mut a, mut b) = (Vec::new(), Vec::new());
            ranks.encode(&word, &mut a);
            table.encode(&word, &mut b);
            prop_assert_eq!(&a, &b);
            if word.len() <= SCAN_MAX {
                let (mut c, mut d) = (Vec::new(), Vec::new());
                ranks.encode_heap(&word, &mut c);
                table.encode_scan(&word, &mut d);
                prop_assert_eq!((c, d), (a.clone(), a));
            }
        }

        #[test]
        fn scan_and_heap_agree(
            seq in prop::collection::vec((97u8..100, 97u8..100), 0..40),
            more in prop::collection::vec((0u8..=255, 0u8..=255), 0..200),
            word in "[abc]{1,48}",
        ) {
            let m = merges_from(&seq.iter().chain(&more).copied().collect::<Vec<_>>());
            let (mut a, mut b) = (Vec::new(), Vec::new());
            m.encode_scan(&word, &mut a);
            m.encode_heap(&word, &mut b);
            prop_assert_eq!(a, b);
        }
    }
}
