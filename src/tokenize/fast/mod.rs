//! The fast encoder: BPE with the ids `tokenizers` gives, several times faster — byte-level (GPT-2, Llama
//! 3, Qwen, the tiktoken built-ins) and SentencePiece-style with byte fallback (Llama 2, Mistral, Gemma).
//!
//! Same pipeline as `tokenizers` (`added tokens → normalizer → pre-tokenizer → BPE`), specialised for the
//! configurations trainers use, one file per concern:
//!
//! | file | concern |
//! | --- | --- |
//! | [`json`] | `tokenizer.json` → [`BpeSpec`], and why a file is not supported |
//! | [`disk`] | the load cache: a `tokenizer.json` prepared once, read back at the next load |
//! | [`added`] | added tokens, found with Aho-Corasick (leftmost-longest, non-normalized ones first) |
//! | [`normalize`] | normalizers (NFC, NFKC, Lowercase, Replace, Prepend, Strip, ...) |
//! | [`patterns`] | the split regexes, hand-compiled, run by a small backtracking matcher |
//! | [`compile`] | any other split regex of the subset patterns use, compiled to the matcher's atoms |
//! | [`unicode`] | Oniguruma's character classes, from a table generated from Oniguruma itself |
//! | [`byte_level`] | GPT-2's byte alphabet |
//! | [`sentencepiece`] | `▁` for spaces (Metaspace), and where a SentencePiece-style text may be cut |
//! | [`bpe`] | the merge loop |
//! | [`cache`] | the per-thread cache from pre-token bytes to ids |
//! | [`vocab`] | the vocabulary: tokens in one buffer, by id and by bytes |
//!
//! This file holds the encoder itself ([`FastBpe`]): the neutral [`BpeSpec`] both sources (a
//! `tokenizer.json`, a built-in rank table) become, and the encode pipeline.

mod added;
mod bpe;
mod byte_level;
mod cache;
mod compile;
mod disk;
mod json;
mod normalize;
pub(crate) mod patterns;
mod sentencepiece;
pub(crate) mod unicode;
pub(crate) mod vocab;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rustc_hash::FxHashMap;

use added::{split_added, AddedSet, Piece};
use bpe::{Alphabet, Merges};
use byte_level::from_byte_level;
pub(crate) use byte_level::to_byte_level;
use cache::Cache;
pub use cache::CacheStats;
pub(crate) use disk::{cache_dir, load_cache};
pub use disk::{CacheUse, LoadCache};
use normalize::{normalize, Normalize};
use patterns::Pattern;
use sentencepiece::{Cuts, Metaspace};
use vocab::Vocab;

/// Where a tokenizer's merges come from.
pub(crate) enum MergeList {
    /// Merges in rank order, as (left id, right id, merged id).
    Ids(Vec<(u32, u32, u32)>),
    /// tiktoken's rule instead of a merge list: any two adjacent tokens whose bytes together are a token
    /// merge, the lowest such token id (= rank) first. The built-ins use it: it is how tiktoken encodes,
    /// and it needs no merge list recovered first.
    FromRanks,
}

/// What a vocabulary's tokens are made of.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Symbols {
    /// Bytes, written in GPT-2's byte alphabet in a `tokenizer.json` (byte-level BPE).
    Bytes,
    /// Characters, with a `<0xNN>` token for each byte for the characters the vocabulary lacks
    /// (SentencePiece-style BPE with `byte_fallback`).
    Chars,
}

/// A BPE tokenizer in the neutral form both sources (a `tokenizer.json`, a built-in rank table) are turned
/// into.
pub(crate) struct BpeSpec {
    pub symbols: Symbols,
    /// Every token of the model's vocabulary that is made of bytes (with [`Symbols::Chars`], every
    /// token: its UTF-8).
    pub vocab: Vocab,
    pub merges: MergeList,
    pub ignore_merges: bool,
    pub added: Vec<AddedSpec>,
    pub normalizers: Vec<Normalize>,
    /// Split patterns applied in turn (a `Split` then `ByteLevel`'s own regex, say).
    pub patterns: Vec<Pattern>,
    /// The Metaspace pre-tokenizer, after the patterns ([`Symbols::Chars`] only).
    pub metaspace: Option<Metaspace>,
    /// What `tokenizers` reports as the vocabulary size with added tokens.
    pub vocab_size: usize,
    /// Vocabulary strings that are not byte-level (never produced by the model; kept for `token_to_id`).
    pub other_vocab: Vec<(String, u32)>,
}

pub(crate) struct AddedSpec {
    pub content: String,
    pub id: u32,
    pub normalized: bool,
}

/// The encoder.
pub(crate) struct FastBpe {
    merges: Merges,
    /// Tokens by bytes (a whole pre-token, for `ignore_merges`) and by id (for token texts); shared
    /// with the merges under tiktoken's rule.
    vocab: Arc<Vocab>,
    ignore_merges: bool,
    added_raw: Option<AddedSet>,
    added_normalized: Option<AddedSet>,
    added_by_content: FxHashMap<String, u32>,
    other_vocab: Vec<(String, u32)>,
    symbols: Symbols,
    normalizers: Vec<Normalize>,
    patterns: Vec<Pattern>,
    metaspace: Option<Metaspace>,
    /// Where a pre-token is cut into the words the merge loop sees.
    cuts: Cuts,
    ascii: [u32; 128],
    vocab_size: usize,
    /// Distinguishes this tokenizer's entries in the per-thread caches.
    key: u64,
    /// What loading it did with the load cache (`None`: not from a `tokenizer.json`).
    loaded: Option<CacheUse>,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl FastBpe {
    pub(crate) fn new(spec: BpeSpec) -> Result<FastBpe, String> {
        static NEXT_KEY: AtomicU64 = AtomicU64::new(1);
        let vocab = Arc::new(spec.vocab);
        let alphabet = match spec.symbols {
            Symbols::Bytes => Alphabet::Bytes(byte_tokens(&vocab)?),
            Symbols::Chars => char_tokens(&vocab)?,
        };
        let merges = match &spec.merges {
            MergeList::FromRanks => match alphabet {
                Alphabet::Bytes(byte_ids) => Merges::from_ranks(vocab.clone(), byte_ids),
                Alphabet::Chars { .. } => return Err("tiktoken ranks over characters".into()),
            },
            MergeList::Ids(list) => Merges::new(list, alphabet),
        };
        let token = |id: u32| vocab.token(id);
        let cuts = match (&spec.metaspace, spec.symbols) {
            (_, Symbols::Bytes) => Cuts::None,
            (Some(m), _) if m.split => Cuts::Before(m.replacement),
            // The whole pre-token is what `ignore_merges` looks up: it cannot be cut.
            _ if spec.ignore_merges => Cuts::None,
            (m, _) => {
                let space = m.as_ref().map_or(sentencepiece::SPACE, |m| m.replacement);
                let mut one = [0; 4];
                let in_vocab = vocab.contains(space.encode_utf8(&mut one).as_bytes());
                match in_vocab && !merges.merges_into(space, token) {
                    true => Cuts::BeforeRunOf(space),
                    false => Cuts::None,
                }
            }
        };

        let (mut raw, mut normalized) = (Vec::new(), Vec::new());
        let mut added_by_content = FxHashMap::default();
        for a in &spec.added {
            if a.content.is_empty() {
                continue;
            }
            added_by_content.insert(a.content.clone(), a.id);
            if a.normalized {
                let content = normalize(&spec.normalizers, &a.content).into_owned();
                normalized.push((content, a.id));
            } else {
                raw.push((a.content.clone(), a.id));
            }
        }
        Ok(FastBpe {
            merges,
            vocab,
            ignore_merges: spec.ignore_merges,
            added_raw: AddedSet::new(raw)?,
            added_normalized: AddedSet::new(normalized)?,
            added_by_content,
            other_vocab: spec.other_vocab,
            symbols: spec.symbols,
            normalizers: spec.normalizers,
            patterns: spec.patterns,
            metaspace: spec.metaspace,
            cuts,
            ascii: unicode::ascii_flags(),
            vocab_size: spec.vocab_size,
            key: NEXT_KEY.fetch_add(1, Ordering::Relaxed),
            loaded: None,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        })
    }

    /// Read a `tokenizer.json`, through the load cache in `cache` when given; `Err` says what is
    /// outside the fast path.
    pub(crate) fn from_json(
        json: &str,
        cache: Option<&std::path::Path>,
    ) -> Result<FastBpe, String> {
        let (spec, loaded) = disk::spec_from_json(json, cache)?;
        Ok(FastBpe {
            loaded: Some(loaded),
            ..FastBpe::new(spec)?
        })
    }

    /// What loading it did with the load cache.
    pub(crate) fn cache_use(&self) -> Option<&CacheUse> {
        self.loaded.as_ref()
    }

    /// A one-line description: model, normalizers, pre-tokenizer.
    pub(crate) fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.symbols == Symbols::Chars {
            parts.push("SentencePiece-style BPE with byte fallback".to_string());
        }
        parts.extend(self.normalizers.iter().map(Normalize::name));
        if !self.patterns.is_empty() {
            let patterns: Vec<&str> = self.patterns.iter().map(|p| p.name()).collect();
            parts.push(format!("{} split", patterns.join(" + ")));
        }
        parts.extend(self.metaspace.iter().map(Metaspace::name));
        match self.cuts {
            Cuts::BeforeRunOf(c) => parts.push(format!("words cut before {c}")),
            Cuts::None if self.symbols == Symbols::Chars => {
                parts.push("whole pieces (merges join words)".into())
            }
            _ => {}
        }
        parts.join(", ")
    }

    pub(crate) fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub(crate) fn cache_stats(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
        }
    }

    /// The id `tokenizers`' `token_to_id` gives: an added token's, else the vocabulary's.
    pub(crate) fn token_to_id(&self, token: &str) -> Option<u32> {
        if let Some(&id) = self.added_by_content.get(token) {
            return Some(id);
        }
        if let Some(&(_, id)) = self.other_vocab.iter().find(|(t, _)| t == token) {
            return Some(id);
        }
        match self.symbols {
            Symbols::Bytes => self.vocab.get(&from_byte_level(token)?),
            Symbols::Chars => self.vocab.get(token.as_bytes()),
        }
    }

    /// The text of one token, as `tokenizers` decodes it alone (lossy for partial characters; a
    /// SentencePiece `▁` shown as the space it stands for, a `<0xNN>` token as its byte).
    pub(crate) fn token_text(&self, id: u32) -> Option<String> {
        if let Some((content, _)) = self.added_by_content.iter().find(|(_, &i)| i == id) {
            return Some(content.clone());
        }
        let bytes = self.vocab.token(id)?;
        let text = String::from_utf8_lossy(bytes);
        match self.symbols {
            _ if bytes.is_empty() => None,
            Symbols::Bytes => Some(text.into_owned()),
            Symbols::Chars => Some(match byte_token(&text) {
                Some(b) => String::from_utf8_lossy(&[b]).into_owned(),
                None => text.replace(sentencepiece::SPACE, " "),
            }),
        }
    }

    /// Encode one text (no special tokens added, as everywhere in this crate).
    pub(crate) fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 2 + 8);
        self.encode_each([text], &mut out, |_| {});
        out
    }

    /// Encode each text onto `out`, one after the other, calling `done` with `out`'s length after each:
    /// one flat buffer and one cache lookup for a whole batch, not a vector and a lookup per text.
    pub(crate) fn encode_each<'t>(
        &self,
        texts: impl IntoIterator<Item = &'t str>,
        out: &mut Vec<u32>,
        mut done: impl FnMut(usize),
    ) {
        cache::with_cache(self.key, |cache| {
            let m0 = cache.misses;
            let mut words = 0;
            for text in texts {
                words += self.encode_text(text, cache, out);
                done(out.len());
            }
            // Every word is looked up (a one-byte word's lookup is its byte's id) and missed at most once.
            let misses = cache.misses - m0;
            self.hits.fetch_add(words - misses, Ordering::Relaxed);
            self.misses.fetch_add(misses, Ordering::Relaxed);
        });
    }

    /// One text's ids onto `out`; returns its number of words.
    fn encode_text(&self, text: &str, cache: &mut Cache, out: &mut Vec<u32>) -> u64 {
        let mut words = 0;
        split_added(text, self.added_raw.as_ref(), |piece| match piece {
            Piece::Added(id) => out.push(id),
            // `tokenizers` drops empty pieces before normalizing (a `Prepend` adds nothing to them).
            Piece::Text("") => {}
            Piece::Text(raw) => {
                let normalized = normalize(&self.normalizers, raw);
                split_added(
                    &normalized,
                    self.added_normalized.as_ref(),
                    |piece| match piece {
                        Piece::Added(id) => out.push(id),
                        Piece::Text("") => {}
                        Piece::Text(t) => {
                            // Metaspace's `first`: the piece that starts the input.
                            let at_start = std::ptr::eq(raw.as_ptr(), text.as_ptr())
                                && std::ptr::eq(t.as_ptr(), normalized.as_ptr());
                            words += self.pre_tokenize(t, at_start, &self.patterns, cache, out)
                        }
                    },
                );
            }
        });
        words
    }

    /// The words of `text` encoded onto `out`; returns their number.
    fn pre_tokenize(
        &self,
        text: &str,
        at_start: bool,
        patterns: &[Pattern],
        cache: &mut Cache,
        out: &mut Vec<u32>,
    ) -> u64 {
        let mut words = 0;
        let word = |w: &str| {
            words += 1;
            self.word(w.as_bytes(), cache, out)
        };
        match (patterns.split_first(), &self.metaspace) {
            // Byte-level BPE's usual shape (one split regex, then the words as they are): each piece
            // straight to the word step, the count kept by the splitter.
            (Some((only, [])), None) if self.cuts == Cuts::None => {
                return only.split_bytes(
                    text,
                    &self.ascii,
                    #[inline(always)]
                    |piece| self.word(piece, cache, out),
                ) as u64
            }
            (None, None) => sentencepiece::words(text, self.cuts, word),
            (None, Some(metaspace)) => {
                let text = metaspace.apply(text, at_start);
                sentencepiece::words(&text, self.cuts, word)
            }
            (Some((first, rest)), _) => {
                first.split(text, &self.ascii, |piece| {
                    let at_start = at_start && std::ptr::eq(piece.as_ptr(), text.as_ptr());
                    words += self.pre_tokenize(piece, at_start, rest, cache, out)
                });
            }
        }
        words
    }

    /// One word's ids, from the cache or the merge loop. Inlined into the splitters' loops; the merge
    /// loop (under 1% of words on SFT text) is a call of its own, so that the hit path keeps a small frame.
    #[inline(always)]
    fn word(&self, word: &[u8], cache: &mut Cache, out: &mut Vec<u32>) {
        // (Splitters never give an empty word; the cache's packed keys assume none.)
        if word.len() <= 1 {
            if let [b] = word {
                out.push(self.merges.byte_id(*b));
            }
            return;
        }
        if let Some(ids) = cache.get(word) {
            // Most words are one token: a push, not a call to copy a slice of unknown length.
            match *ids {
                [id] => out.push(id),
                _ => out.extend_from_slice(ids),
            }
            return;
        }
        self.word_missed(word, cache, out)
    }

    /// [`FastBpe::word`] for a word not in the cache: merged, then cached.
    #[cold]
    #[inline(never)]
    fn word_missed(&self, word: &[u8], cache: &mut Cache, out: &mut Vec<u32>) {
        cache.misses += 1;
        // Splitters cut between characters; a word that is not whole characters would be a bug in one.
        let Ok(word) = std::str::from_utf8(word) else {
            unreachable!("a splitter cut inside a character: {word:?}")
        };
        let start = out.len();
        match self
            .ignore_merges
            .then(|| self.vocab.get(word.as_bytes()))
            .flatten()
        {
            Some(id) => out.push(id),
            None => self.merges.encode(word, out),
        }
        cache.insert(word.as_bytes(), &out[start..]);
    }
}

/// Each byte's token, for byte-level BPE.
fn byte_tokens(vocab: &Vocab) -> Result<[u32; 256], String> {
    let mut ids = [0u32; 256];
    for (b, slot) in ids.iter_mut().enumerate() {
        *slot = match vocab.get(&[b as u8]) {
            Some(id) => id,
            // Bytes that never occur in UTF-8 (0xC0, 0xC1, 0xF5..=0xFF) never reach the encoder, whose
            // input is a `&str`: vocabularies that lack them (GPT-NeoX, Pythia) need none.
            None if matches!(b, 0xC0 | 0xC1 | 0xF5..=0xFF) => u32::MAX,
            None => return Err(format!("byte {b:#04x} has no token of its own")),
        };
    }
    Ok(ids)
}

/// The byte of a `<0xNN>` byte-fallback token, as `tokenizers` writes them (upper-case hex).
fn byte_token(token: &str) -> Option<u8> {
    let hex = token.strip_prefix("<0x")?.strip_suffix('>')?;
    let upper = hex.len() == 2 && hex.bytes().all(|h| matches!(h, b'0'..=b'9' | b'A'..=b'F'));
    upper.then(|| u8::from_str_radix(hex, 16).ok()).flatten()
}

/// The symbols of a SentencePiece-style vocabulary: its one-character tokens, and a `<0xNN>` token for
/// every byte a character may fall back to (what `byte_fallback` needs; a vocabulary without one is not
/// one this engine takes). Byte tokens no character can need may be missing (`u32::MAX`, never used).
fn char_tokens(vocab: &Vocab) -> Result<Alphabet, String> {
    let mut bytes = [u32::MAX; 256];
    let mut chars = FxHashMap::default();
    for (token, id) in vocab.iter() {
        let Ok(token) = std::str::from_utf8(token) else {
            continue;
        };
        if let Some(b) = byte_token(token) {
            bytes[b as usize] = id;
        }
        let mut cs = token.chars();
        if let (Some(c), None) = (cs.next(), cs.next()) {
            chars.insert(c, id);
        }
    }
    // A byte token is needed where a character has no token of its own and falls back to its bytes.
    // An ASCII character with its own token never does (its byte is in no other character), and bytes
    // that valid UTF-8 never holds (0xC0, 0xC1, 0xF5..) are in no character: Gemma's vocabulary has a
    // tab token and no <0x09>. Any other missing byte token falls back to `tokenizers`.
    let needed = |b: usize| {
        let own_token = b < 0x80 && chars.contains_key(&(b as u8 as char));
        !own_token && !matches!(b, 0xC0 | 0xC1 | 0xF5..=0xFF)
    };
    if let Some(b) = (0..256).find(|&b| bytes[b] == u32::MAX && needed(b)) {
        return Err(format!(
            "byte_fallback without a <0x{b:02X}> token (a character may need it)"
        ));
    }
    let mut ascii = [0u32; 128];
    for (c, slot) in ascii.iter_mut().enumerate() {
        *slot = chars.remove(&(c as u8 as char)).unwrap_or(bytes[c]);
    }
    Ok(Alphabet::Chars {
        ascii,
        chars,
        bytes,
    })
}
