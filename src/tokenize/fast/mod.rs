//! The fast encoder: byte-level BPE with the ids `tokenizers` gives, several times faster.
//!
//! Same pipeline as `tokenizers` (`added tokens → normalizer → pre-tokenizer → BPE`), specialised for the
//! configurations trainers use: added tokens found with Aho-Corasick (leftmost-longest, the non-normalized
//! ones first, as `tokenizers` does), NFC with the very crate `tokenizers` uses, the split regex replaced by
//! a hand-compiled matcher ([`pretok`]) over Oniguruma's own character classes ([`unicode`]), and a
//! per-thread cache from pre-token bytes to ids in front of the BPE merge loop ([`bpe`]). Pre-tokens
//! repeat a lot (SFT prompts repeat their template on every row), so most never reach the merge loop.
//!
//! [`FastBpe::from_json`] says why when a `tokenizer.json` is outside what it supports; the caller then
//! uses `tokenizers` itself.

mod bpe;
pub(crate) mod pretok;
pub(crate) mod unicode;

use std::borrow::Cow;
use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};

use aho_corasick::{AhoCorasick, MatchKind};
use rayon::prelude::*;
use rustc_hash::FxHashMap;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

pub(crate) use bpe::Merges;
use pretok::Pattern;

/// A byte-level BPE tokenizer in the neutral form both sources (a `tokenizer.json`, a built-in rank table)
/// are turned into.
pub(crate) struct BpeSpec {
    /// Token bytes and id, for every token of the model's vocabulary that is made of bytes.
    pub vocab: Vec<(Vec<u8>, u32)>,
    /// Merges in rank order, as (left bytes, right bytes).
    pub merges: Vec<(Vec<u8>, Vec<u8>)>,
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

/// Cache counters, for reports.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
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

struct AddedSet {
    automaton: AhoCorasick,
    ids: Vec<u32>,
}

impl AddedSet {
    fn new(tokens: Vec<(String, u32)>) -> Result<Option<AddedSet>, String> {
        if tokens.is_empty() {
            return Ok(None);
        }
        let automaton = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(tokens.iter().map(|(c, _)| c.as_str()))
            .map_err(|e| e.to_string())?;
        Ok(Some(AddedSet {
            automaton,
            ids: tokens.into_iter().map(|(_, id)| id).collect(),
        }))
    }
}

/// Entries one thread's cache holds before it starts afresh.
const CACHE_ENTRIES: usize = 1 << 16;
/// Longer pre-tokens are encoded every time.
const CACHE_WORD_MAX: usize = 256;

#[derive(Default)]
struct Cache {
    key: u64,
    map: FxHashMap<Box<[u8]>, (u32, u32)>,
    ids: Vec<u32>,
    hits: u64,
    misses: u64,
}

/// Tokenizers a thread keeps a cache for at once (a trainer may alternate between a policy's and a reward
/// model's); the least recently used one is dropped for a new one.
const CACHES_PER_THREAD: usize = 4;

thread_local! {
    /// Most recently used last.
    static CACHES: RefCell<Vec<Cache>> = const { RefCell::new(Vec::new()) };
}

/// GPT-2's byte-to-character alphabet, inverted: `INVERSE[c]` is the byte that character `c` stands for
/// (all of them are below U+0144), or -1.
fn byte_level_inverse() -> &'static [i16; 0x144] {
    static INVERSE: std::sync::OnceLock<[i16; 0x144]> = std::sync::OnceLock::new();
    INVERSE.get_or_init(|| {
        let mut inverse = [-1i16; 0x144];
        let printable = |b: usize| {
            (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
        };
        let mut next = 256usize;
        for b in 0..256usize {
            let c = if printable(b) {
                b
            } else {
                next += 1;
                next - 1
            };
            inverse[c] = b as i16;
        }
        inverse
    })
}

/// The bytes a byte-level token string stands for, or `None` if it has a character outside the alphabet.
fn from_byte_level(token: &str) -> Option<Vec<u8>> {
    let inverse = byte_level_inverse();
    // Exactly sized: these become hash keys, and a shrinking reallocation per token is measurable when
    // loading 150k of them.
    let mut out = Vec::with_capacity(token.chars().count());
    for c in token.chars() {
        let b = *inverse.get(c as usize)?;
        if b < 0 {
            return None;
        }
        out.push(b as u8);
    }
    Some(out)
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
            *slot = *vocab
                .get(&[b as u8][..])
                .ok_or_else(|| format!("byte {b:#04x} has no token of its own"))?;
        }
        let merges = Merges::new(&spec.merges, &vocab, byte_ids)?;

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
        FastBpe::new(spec_from_json(json)?)
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
        CACHES.with(|caches| {
            let mut caches = caches.borrow_mut();
            match caches.iter().position(|c| c.key == self.key) {
                Some(at) => {
                    let mine = caches.remove(at);
                    caches.push(mine);
                }
                None => {
                    if caches.len() == CACHES_PER_THREAD {
                        caches.remove(0);
                    }
                    caches.push(Cache {
                        key: self.key,
                        ..Cache::default()
                    });
                }
            }
            let cache = caches.last_mut().expect("just pushed");
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
                            Piece::Text(t) => {
                                self.pre_tokenize(t, &self.patterns, &mut *cache, &mut out)
                            }
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
        if let Some(&(start, len)) = cache.map.get(word) {
            cache.hits += 1;
            out.extend_from_slice(&cache.ids[start as usize..(start + len) as usize]);
            return;
        }
        cache.misses += 1;
        let start = out.len();
        match self.ignore_merges.then(|| self.vocab.get(word)).flatten() {
            Some(&id) => out.push(id),
            None => self.merges.encode(word, out),
        }
        // Long pre-tokens (base64, long runs) rarely repeat; keeping them would let a few inputs fill the
        // cache's memory.
        if word.len() > CACHE_WORD_MAX {
            return;
        }
        if cache.map.len() >= CACHE_ENTRIES {
            cache.map.clear();
            cache.ids.clear();
        }
        let at = cache.ids.len() as u32;
        cache.ids.extend_from_slice(&out[start..]);
        cache
            .map
            .insert(word.into(), (at, (out.len() - start) as u32));
    }
}

enum Piece<'t> {
    Added(u32),
    Text(&'t str),
}

/// `text` cut at the added tokens of `set` (leftmost-longest), in order. An empty text is one empty piece.
fn split_added<'t>(text: &'t str, set: Option<&AddedSet>, mut f: impl FnMut(Piece<'t>)) {
    let Some(set) = set else {
        f(Piece::Text(text));
        return;
    };
    let mut last = 0;
    for m in set.automaton.find_iter(text) {
        if m.start() > last {
            f(Piece::Text(&text[last..m.start()]));
        }
        f(Piece::Added(set.ids[m.pattern().as_usize()]));
        last = m.end();
    }
    if last < text.len() || text.is_empty() {
        f(Piece::Text(&text[last..]));
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

// ---- tokenizer.json → BpeSpec

#[derive(Deserialize)]
struct TokenizerJson<'a> {
    #[serde(default)]
    added_tokens: Vec<AddedTokenJson>,
    #[serde(default)]
    normalizer: Option<serde_json::Value>,
    #[serde(default)]
    pre_tokenizer: Option<serde_json::Value>,
    #[serde(default)]
    truncation: Option<serde_json::Value>,
    #[serde(default)]
    padding: Option<serde_json::Value>,
    #[serde(borrow)]
    model: ModelJson<'a>,
}

#[derive(Deserialize)]
struct AddedTokenJson {
    id: u32,
    content: String,
    #[serde(default)]
    single_word: bool,
    #[serde(default)]
    lstrip: bool,
    #[serde(default)]
    rstrip: bool,
    #[serde(default)]
    normalized: bool,
}

#[derive(Deserialize)]
struct ModelJson<'a> {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    dropout: Option<f64>,
    #[serde(default)]
    continuing_subword_prefix: Option<String>,
    #[serde(default)]
    end_of_word_suffix: Option<String>,
    #[serde(default)]
    byte_fallback: bool,
    #[serde(default)]
    ignore_merges: bool,
    #[serde(borrow)]
    vocab: Vocab<'a>,
    #[serde(borrow, default)]
    merges: Vec<MergeJson<'a>>,
}

/// A JSON string, borrowed from the input when it has no escapes.
struct Str<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Str<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Str<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Str<'a>, E> {
                Ok(Str(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Str<'a>, E> {
                Ok(Str(Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_str(V(std::marker::PhantomData))
    }
}

struct Vocab<'a>(Vec<(Cow<'a, str>, u32)>);

impl<'de: 'a, 'a> Deserialize<'de> for Vocab<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Vocab<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map from token to id")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Vocab<'a>, A::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(0));
                while let Some((k, v)) = map.next_entry::<Str<'a>, u32>()? {
                    out.push((k.0, v));
                }
                Ok(Vocab(out))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// `["a", "b"]` or the older `"a b"`.
struct MergeJson<'a>(Cow<'a, str>, Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for MergeJson<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = MergeJson<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a merge: [\"a\", \"b\"] or \"a b\"")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<MergeJson<'a>, E> {
                let mut parts = v.split(' ');
                match (parts.next(), parts.next(), parts.next()) {
                    (Some(a), Some(b), None) => Ok(MergeJson(Cow::Borrowed(a), Cow::Borrowed(b))),
                    _ => Err(E::custom(format!("merge {v:?} is not two tokens"))),
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<MergeJson<'a>, E> {
                let m = self.visit_borrowed_str::<E>(v)?;
                Ok(MergeJson(
                    Cow::Owned(m.0.into_owned()),
                    Cow::Owned(m.1.into_owned()),
                ))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<MergeJson<'a>, A::Error> {
                let a: Str<'a> = seq
                    .next_element()?
                    .ok_or_else(|| de::Error::custom("empty merge"))?;
                let b: Str<'a> = seq
                    .next_element()?
                    .ok_or_else(|| de::Error::custom("short merge"))?;
                if seq.next_element::<de::IgnoredAny>()?.is_some() {
                    return Err(de::Error::custom("merge of more than two tokens"));
                }
                Ok(MergeJson(a.0, b.0))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

fn is_type(v: &serde_json::Value, kind: &str) -> bool {
    v.get("type").and_then(|t| t.as_str()) == Some(kind)
}

/// Whether a normalizer is NFC (`Ok(true)`), absent (`Ok(false)`) or something else.
fn normalizer_is_nfc(n: Option<&serde_json::Value>) -> Result<bool, String> {
    let Some(n) = n.filter(|n| !n.is_null()) else {
        return Ok(false);
    };
    if is_type(n, "NFC") {
        return Ok(true);
    }
    if is_type(n, "Sequence") {
        if let Some(list) = n.get("normalizers").and_then(|l| l.as_array()) {
            match list.as_slice() {
                [] => return Ok(false),
                [one] => return normalizer_is_nfc(Some(one)),
                _ => {}
            }
        }
    }
    Err(format!("normalizer {n} (only none or NFC)"))
}

/// The split patterns of a pre-tokenizer: a `Split` regex and/or `ByteLevel`, which must be there.
fn patterns_of(p: Option<&serde_json::Value>) -> Result<Vec<Pattern>, String> {
    let p = p
        .filter(|p| !p.is_null())
        .ok_or("no pre-tokenizer (a byte-level BPE needs ByteLevel)")?;
    let steps: Vec<&serde_json::Value> = if is_type(p, "Sequence") {
        p.get("pretokenizers")
            .and_then(|l| l.as_array())
            .ok_or("Sequence without pretokenizers")?
            .iter()
            .collect()
    } else {
        vec![p]
    };
    let mut patterns = Vec::new();
    let mut byte_level = false;
    for (k, step) in steps.iter().enumerate() {
        if is_type(step, "Split") && !byte_level {
            let regex = step
                .get("pattern")
                .and_then(|p| p.get("Regex"))
                .and_then(|r| r.as_str())
                .ok_or_else(|| format!("Split pattern {} (only regexes)", step["pattern"]))?;
            let behavior = step.get("behavior").and_then(|b| b.as_str());
            let invert = step
                .get("invert")
                .and_then(|i| i.as_bool())
                .unwrap_or(false);
            if behavior != Some("Isolated") || invert {
                return Err(format!(
                    "Split behaviour {behavior:?}, invert {invert} (only Isolated)"
                ));
            }
            patterns.push(
                Pattern::recognize(regex).ok_or_else(|| {
                    format!("split regex {regex:?} is not one the fast path knows")
                })?,
            );
        } else if is_type(step, "ByteLevel") && k == steps.len() - 1 {
            if step.get("add_prefix_space").and_then(|a| a.as_bool()) == Some(true) {
                return Err("ByteLevel with add_prefix_space".into());
            }
            if step
                .get("use_regex")
                .and_then(|u| u.as_bool())
                .unwrap_or(true)
            {
                patterns.push(Pattern::recognize(pretok::GPT2).expect("GPT-2's regex is known"));
            }
            byte_level = true;
        } else {
            return Err(format!("pre-tokenizer step {step}"));
        }
    }
    if !byte_level {
        return Err("pre-tokenizer does not end with ByteLevel".into());
    }
    Ok(patterns)
}

pub(crate) fn spec_from_json(json: &str) -> Result<BpeSpec, String> {
    let t: TokenizerJson = serde_json::from_str(json).map_err(|e| e.to_string())?;
    let m = &t.model;
    if m.kind.as_deref() != Some("BPE") {
        return Err(format!("model {:?} (only BPE)", m.kind));
    }
    if m.dropout.is_some_and(|d| d > 0.0) {
        return Err("BPE dropout".into());
    }
    if m.continuing_subword_prefix.is_some() || m.end_of_word_suffix.is_some() {
        return Err("BPE with a subword prefix or suffix".into());
    }
    if m.byte_fallback {
        return Err("BPE byte_fallback".into());
    }
    if t.truncation.as_ref().is_some_and(|v| !v.is_null())
        || t.padding.as_ref().is_some_and(|v| !v.is_null())
    {
        return Err("truncation or padding configured in the file".into());
    }
    let nfc = normalizer_is_nfc(t.normalizer.as_ref())?;
    let patterns = patterns_of(t.pre_tokenizer.as_ref())?;
    for a in &t.added_tokens {
        if a.single_word || a.lstrip || a.rstrip {
            return Err(format!(
                "added token {:?} with single_word/lstrip/rstrip",
                a.content
            ));
        }
    }

    // Vocabulary strings to bytes, and merges to byte pairs, on every core (150k+ entries each).
    let (converted, merges) = rayon::join(
        || {
            m.vocab
                .0
                .par_iter()
                .map(|(token, id)| (from_byte_level(token), token, *id))
                .collect::<Vec<_>>()
        },
        || {
            m.merges
                .par_iter()
                .map(
                    |MergeJson(a, b)| match (from_byte_level(a), from_byte_level(b)) {
                        (Some(a), Some(b)) => Ok((a, b)),
                        _ => Err(format!("merge {a:?} {b:?} outside the byte alphabet")),
                    },
                )
                .collect::<Result<Vec<_>, String>>()
        },
    );
    let merges = merges?;
    let mut vocab = Vec::with_capacity(converted.len());
    // Tokens with characters outside the byte alphabet can never come out of byte-level BPE; they are
    // kept aside for `token_to_id`.
    let mut other_vocab = Vec::new();
    for (bytes, token, id) in converted {
        match bytes {
            Some(bytes) => vocab.push((bytes, id)),
            None => other_vocab.push((token.to_string(), id)),
        }
    }
    // `tokenizers`: model vocabulary + distinct added contents - those the model already has.
    let contents: rustc_hash::FxHashSet<&str> =
        t.added_tokens.iter().map(|a| a.content.as_str()).collect();
    let overlapping = m
        .vocab
        .0
        .iter()
        .filter(|(t, _)| contents.contains(t.as_ref()))
        .count();
    let vocab_size = m.vocab.0.len() + contents.len() - overlapping;
    Ok(BpeSpec {
        vocab,
        merges,
        ignore_merges: m.ignore_merges,
        added: t
            .added_tokens
            .iter()
            .map(|a| AddedSpec {
                content: a.content.clone(),
                id: a.id,
                normalized: a.normalized,
            })
            .collect(),
        nfc,
        patterns,
        vocab_size,
        other_vocab,
    })
}
