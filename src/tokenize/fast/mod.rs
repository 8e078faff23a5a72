//! The fast encoder: byte-level BPE with the ids `tokenizers` gives, several times faster.
//!
//! Same pipeline as `tokenizers` (`added tokens → normalizer → pre-tokenizer → BPE`), specialised for the
//! configurations trainers use, one file per concern:
//!
//! | file | concern |
//! | --- | --- |
//! | [`json`] | `tokenizer.json` → [`BpeSpec`], and why a file is not supported |
//! | [`added`] | added tokens, found with Aho-Corasick (leftmost-longest, non-normalized ones first) |
//! | [`patterns`] | the split regexes, hand-compiled, run by a small backtracking matcher |
//! | [`compile`] | any other split regex of the subset patterns use, compiled to the matcher's atoms |
//! | [`unicode`] | Oniguruma's character classes, from a table generated from Oniguruma itself |
//! | [`byte_level`] | GPT-2's byte alphabet |
//! | [`bpe`] | the merge loop |
//! | [`cache`] | the per-thread cache from pre-token bytes to ids |
//!
//! This file holds the encoder itself ([`FastBpe`]): the neutral [`BpeSpec`] both sources (a
//! `tokenizer.json`, a built-in rank table) become, and the encode pipeline.

mod added;
mod bpe;
mod byte_level;
mod cache;
mod compile;
mod json;
pub(crate) mod patterns;
pub(crate) mod unicode;

use std::borrow::Cow;
use std::sync::atomic::{AtomicU64, Ordering};

use rustc_hash::FxHashMap;

use added::{split_added, AddedSet, Piece};
use bpe::Merges;
use byte_level::from_byte_level;
pub(crate) use byte_level::to_byte_level;
use cache::Cache;
pub use cache::CacheStats;
use patterns::Pattern;

/// A byte-level BPE tokenizer in the neutral form both sources (a `tokenizer.json`, a built-in rank table)
/// are turned into.
pub(crate) struct BpeSpec {
    /// Token bytes and id, for every token of the model's vocabulary that is made of bytes.
    pub vocab: Vec<(Vec<u8>, u32)>,
    /// Merges in rank order, as (left bytes, right bytes).
    pub merges: Vec<(Vec<u8>, Vec<u8>)>,
    /// tiktoken's rule instead of a merge list: any two adjacent tokens whose bytes together are a token
    /// merge, the lowest such token id (= rank) first. The built-ins use it: it is how tiktoken encodes,
    /// and it needs no merge list recovered first.
    pub merges_from_ranks: bool,
    pub ignore_merges: bool,
    pub added: Vec<AddedSpec>,
    pub nfc: bool,
    /// Split patterns applied in turn (a `Split` then `ByteLevel`'s own regex, say).
    pub patterns: Vec<Pattern>,
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
    /// Whole pre-token → id, for `ignore_merges`.
    vocab: FxHashMap<Box<[u8]>, u32>,
    ignore_merges: bool,
    /// Token bytes by id (`bytes[spans[id]]`), for token texts.
    bytes: Vec<u8>,
    spans: Vec<(u32, u32)>,
    added_raw: Option<AddedSet>,
    added_normalized: Option<AddedSet>,
    added_by_content: FxHashMap<String, u32>,
    other_vocab: Vec<(String, u32)>,
    nfc: bool,
    patterns: Vec<Pattern>,
    ascii: [u32; 128],
    vocab_size: usize,
    /// Distinguishes this tokenizer's entries in the per-thread caches.
    key: u64,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl FastBpe {
    pub(crate) fn new(spec: BpeSpec) -> Result<FastBpe, String> {
        static NEXT_KEY: AtomicU64 = AtomicU64::new(1);
        let mut vocab: FxHashMap<Box<[u8]>, u32> = FxHashMap::default();
        vocab.reserve(spec.vocab.len());
        let max_id = spec.vocab.iter().map(|v| v.1).max().unwrap_or(0);
        // Ids index a table below; a file with ids far beyond its size is not one this engine takes.
        if max_id as usize > 4 * spec.vocab.len() + (1 << 20) {
            return Err(format!(
                "token id {max_id} in a vocabulary of {}",
                spec.vocab.len()
            ));
        }
        let mut spans = vec![(0u32, 0u32); max_id as usize + 1];
        let mut bytes = Vec::new();
        for (token, id) in spec.vocab {
            spans[id as usize] = (bytes.len() as u32, token.len() as u32);
            bytes.extend_from_slice(&token);
            vocab.insert(token.into_boxed_slice(), id);
        }
        let mut byte_ids = [0u32; 256];
        for (b, slot) in byte_ids.iter_mut().enumerate() {
            *slot = match vocab.get(&[b as u8][..]) {
                Some(&id) => id,
                // Bytes that never occur in UTF-8 (0xC0, 0xC1, 0xF5..=0xFF) never reach the encoder,
                // whose input is a `&str`: vocabularies that lack them (GPT-NeoX, Pythia) need none.
                None if matches!(b, 0xC0 | 0xC1 | 0xF5..=0xFF) => u32::MAX,
                None => return Err(format!("byte {b:#04x} has no token of its own")),
            };
        }
        let merges = match spec.merges_from_ranks {
            true => Merges::from_ranks(&vocab, byte_ids),
            false => Merges::new(&spec.merges, &vocab, byte_ids)?,
        };

        let normalize = |s: &str| -> String {
            if spec.nfc {
                nfc(s).into_owned()
            } else {
                s.to_string()
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
                normalized.push((normalize(&a.content), a.id));
            } else {
                raw.push((a.content.clone(), a.id));
            }
        }
        Ok(FastBpe {
            merges,
            vocab,
            ignore_merges: spec.ignore_merges,
            bytes,
            spans,
            added_raw: AddedSet::new(raw)?,
            added_normalized: AddedSet::new(normalized)?,
            added_by_content,
            other_vocab: spec.other_vocab,
            nfc: spec.nfc,
            patterns: spec.patterns,
            ascii: unicode::ascii_flags(),
            vocab_size: spec.vocab_size,
            key: NEXT_KEY.fetch_add(1, Ordering::Relaxed),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        })
    }

    /// Read a `tokenizer.json`; `Err` says what is outside the fast path.
    pub(crate) fn from_json(json: &str) -> Result<FastBpe, String> {
        FastBpe::new(json::spec_from_json(json)?)
    }

    /// A one-line description: split pattern(s) and normalizer.
    pub(crate) fn describe(&self) -> String {
        let patterns: Vec<&str> = self.patterns.iter().map(|p| p.name()).collect();
        format!(
            "{} split{}",
            patterns.join(" + "),
            if self.nfc { ", NFC" } else { "" }
        )
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
        self.vocab.get(&from_byte_level(token)?[..]).copied()
    }

    /// The text of one token, as `tokenizers` decodes it alone (lossy for partial characters).
    pub(crate) fn token_text(&self, id: u32) -> Option<String> {
        if let Some((content, _)) = self.added_by_content.iter().find(|(_, &i)| i == id) {
            return Some(content.clone());
        }
        let &(start, len) = self.spans.get(id as usize)?;
        let bytes = &self.bytes[start as usize..(start + len) as usize];
        (len > 0).then(|| String::from_utf8_lossy(bytes).into_owned())
    }

    /// Encode one text (no special tokens added, as everywhere in this crate).
    pub(crate) fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 1);
        cache::with_cache(self.key, |cache| {
            let (h0, m0) = (cache.hits, cache.misses);
            split_added(text, self.added_raw.as_ref(), |piece| match piece {
                Piece::Added(id) => out.push(id),
                Piece::Text(raw) => {
                    let normalized = if self.nfc {
                        nfc(raw)
                    } else {
                        Cow::Borrowed(raw)
                    };
                    split_added(
                        &normalized,
                        self.added_normalized.as_ref(),
                        |piece| match piece {
                            Piece::Added(id) => out.push(id),
                            Piece::Text(t) => self.pre_tokenize(t, &self.patterns, cache, &mut out),
                        },
                    );
                }
            });
            self.hits.fetch_add(cache.hits - h0, Ordering::Relaxed);
            self.misses.fetch_add(cache.misses - m0, Ordering::Relaxed);
        });
        out
    }

    fn pre_tokenize(
        &self,
        text: &str,
        patterns: &[Pattern],
        cache: &mut Cache,
        out: &mut Vec<u32>,
    ) {
        match patterns.split_first() {
            None => self.word(text.as_bytes(), cache, out),
            Some((first, rest)) => first.split(text, &self.ascii, |piece| {
                self.pre_tokenize(piece, rest, cache, out)
            }),
        }
    }

    /// One pre-token's ids, from the cache or the merge loop.
    #[inline]
    fn word(&self, word: &[u8], cache: &mut Cache, out: &mut Vec<u32>) {
        if word.len() == 1 {
            cache.hits += 1;
            out.push(self.merges.byte_id(word[0]));
            return;
        }
        if let Some(ids) = cache.get(word) {
            out.extend_from_slice(ids);
            cache.hits += 1;
            return;
        }
        cache.misses += 1;
        let start = out.len();
        match self.ignore_merges.then(|| self.vocab.get(word)).flatten() {
            Some(&id) => out.push(id),
            None => self.merges.encode(word, out),
        }
        cache.insert(word, &out[start..]);
    }
}

/// NFC as `tokenizers` computes it (same crate, same Unicode version), skipping text already known NFC.
fn nfc(text: &str) -> Cow<'_, str> {
    use unicode_normalization_alignments::{is_nfc_quick, IsNormalized, UnicodeNormalization};
    if text.is_ascii() || is_nfc_quick(text.chars()) == IsNormalized::Yes {
        Cow::Borrowed(text)
    } else {
        Cow::Owned(text.nfc().map(|(c, _)| c).collect())
    }
}
