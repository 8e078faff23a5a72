//! `tokenizer.json` → [`BpeSpec`]: the parts of a Hugging Face tokenizer file the fast encoder needs, read
//! directly (borrowed strings, vocabulary and merges converted on every core), and the reason when the
//! file is outside what the encoder supports.

use std::borrow::Cow;

use rayon::prelude::*;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use rustc_hash::{FxHashMap, FxHashSet};

use super::byte_level::from_byte_level_into;
use super::compile;
use super::normalize::{self, Normalize};
use super::patterns::{Pattern, GPT2};
use super::sentencepiece::{Metaspace, PrependScheme};
use super::vocab::{Vocab, VocabBuilder};
use super::{AddedSpec, BpeSpec, MergeList, Symbols};

/// The parts of a `tokenizer.json` the engine reads. Serialized, it is the file's rest: what the load
/// cache keeps as JSON, with the vocabulary and merges written empty (the cache holds them converted).
#[derive(Deserialize, Serialize)]
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

#[derive(Deserialize, Serialize)]
struct AddedTokenJson {
    /// What the file says; `tokenizers` does not use it (see `number_added_tokens`).
    #[allow(dead_code)]
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
    #[serde(default)]
    special: bool,
}

#[derive(Deserialize, Serialize)]
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
    #[serde(borrow, serialize_with = "empty_map")]
    vocab: VocabJson<'a>,
    #[serde(borrow, default, serialize_with = "empty_seq")]
    merges: Vec<MergeJson<'a>>,
}

fn empty_map<S: Serializer, T>(_: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_map(std::iter::empty::<((), ())>())
}

fn empty_seq<S: Serializer, T>(_: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(std::iter::empty::<()>())
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

struct VocabJson<'a>(Vec<(Cow<'a, str>, u32)>);

impl<'de: 'a, 'a> Deserialize<'de> for VocabJson<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = VocabJson<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map from token to id")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<VocabJson<'a>, A::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(0));
                while let Some((k, v)) = map.next_entry::<Str<'a>, u32>()? {
                    out.push((k.0, v));
                }
                Ok(VocabJson(out))
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

/// The normalizer's steps (none when absent).
fn normalizers_of(n: Option<&serde_json::Value>) -> Result<Vec<Normalize>, String> {
    let mut steps = Vec::new();
    if let Some(n) = n.filter(|n| !n.is_null()) {
        Normalize::parse(n, &mut steps)?;
    }
    Ok(steps)
}

/// What the pre-tokenizer does: split patterns in turn, then `ByteLevel` (byte-level BPE) or `Metaspace`
/// or nothing (SentencePiece-style BPE).
struct PreTokenizer {
    patterns: Vec<Pattern>,
    byte_level: bool,
    metaspace: Option<Metaspace>,
}

fn pre_tokenizer_of(
    p: Option<&serde_json::Value>,
    normalizers: &[Normalize],
) -> Result<PreTokenizer, String> {
    let steps: Vec<&serde_json::Value> = match p.filter(|p| !p.is_null()) {
        None => Vec::new(),
        Some(p) if is_type(p, "Sequence") => p
            .get("pretokenizers")
            .and_then(|l| l.as_array())
            .ok_or("Sequence without pretokenizers")?
            .iter()
            .collect(),
        Some(p) => vec![p],
    };
    let mut pre = PreTokenizer {
        patterns: Vec::new(),
        byte_level: false,
        metaspace: None,
    };
    for step in steps {
        if pre.byte_level || pre.metaspace.is_some() {
            return Err(format!(
                "pre-tokenizer step {step} after ByteLevel or Metaspace"
            ));
        }
        let invert = step
            .get("invert")
            .and_then(|i| i.as_bool())
            .unwrap_or(false);
        let space = step.get("pattern").and_then(|p| p.get("String")) == Some(&" ".into());
        if is_type(step, "Split") && space && !invert && normalize::removes(normalizers, ' ') {
            // Gemma's: a split at spaces after a normalizer that replaced them all does nothing.
        } else if is_type(step, "Split") {
            let regex = step
                .get("pattern")
                .and_then(|p| p.get("Regex"))
                .and_then(|r| r.as_str())
                .ok_or_else(|| format!("Split pattern {} (only regexes)", step["pattern"]))?;
            let behavior = step.get("behavior").and_then(|b| b.as_str());
            let compiled =
                || compile::pattern(regex).map_err(|why| format!("split regex {regex:?}: {why}"));
            pre.patterns.push(match (behavior, invert) {
                (Some("Isolated"), false) => compiled()?,
                // The matches are the pieces and the rest is dropped (converted tiktoken files).
                (Some("Removed"), true) => compiled()?.dropping_gaps(),
                _ => {
                    return Err(format!(
                        "Split behaviour {behavior:?}, invert {invert} (only Isolated, or Removed \
                         with invert)"
                    ))
                }
            });
        } else if is_type(step, "Digits") {
            let individual = step
                .get("individual_digits")
                .and_then(|i| i.as_bool())
                .unwrap_or(false);
            pre.patterns.push(Pattern::digits(individual));
        } else if is_type(step, "ByteLevel") {
            if step.get("add_prefix_space").and_then(|a| a.as_bool()) == Some(true) {
                return Err("ByteLevel with add_prefix_space".into());
            }
            if step
                .get("use_regex")
                .and_then(|u| u.as_bool())
                .unwrap_or(true)
            {
                pre.patterns
                    .push(Pattern::recognize(GPT2).expect("GPT-2's regex is known"));
            }
            pre.byte_level = true;
        } else if is_type(step, "Metaspace") {
            pre.metaspace = Some(Metaspace::parse(step)?);
        } else {
            return Err(format!("pre-tokenizer step {step}"));
        }
    }
    Ok(pre)
}

/// The large part of a file, in the engine's form: the vocabulary indexed, the merges as ids (what the
/// load cache keeps, see `disk`).
pub(super) struct Model {
    pub vocab: Vocab,
    /// Vocabulary strings that are not byte-level (never produced by the model; kept for `token_to_id`).
    pub other_vocab: Vec<(String, u32)>,
    pub merges: Vec<(u32, u32, u32)>,
    /// Entries of the file's vocabulary and merge lists, as written.
    pub file_vocab_len: usize,
    pub file_merges_len: usize,
}

/// What the small rest of the file says, checked: everything but the vocabulary and merges.
struct Config {
    normalizers: Vec<Normalize>,
    pre: PreTokenizer,
    symbols: Symbols,
}

/// What the load cache does with a file's rest and its model, once prepared.
pub(super) type Save<'s> = &'s mut dyn FnMut(&str, &Model);

/// A `tokenizer.json` → the engine's spec; `Err` says what is outside the fast path. With `save`, it
/// is called with the file's rest (as JSON, vocabulary and merges left empty) and its [`Model`] before
/// they are assembled: what the load cache stores.
pub(super) fn spec_from_json(json: &str, save: Option<Save<'_>>) -> Result<BpeSpec, String> {
    let t: TokenizerJson = serde_json::from_str(json).map_err(|e| unreadable(json, e))?;
    let config = config_of(&t, t.model.merges.len())?;
    let model = model_of(&t.model, config.symbols)?;
    if let Some(save) = save {
        save(
            &serde_json::to_string(&t).expect("JSON values serialize"),
            &model,
        );
    }
    Ok(assemble(&t, config, model))
}

/// Why the engine's reader refused a file, in the user's terms: a model other than BPE by its name (a
/// Unigram's vocabulary is a list of pairs, which the reader stops at first), else the JSON error.
fn unreadable(json: &str, e: serde_json::Error) -> String {
    let value: Option<serde_json::Value> = serde_json::from_str(json).ok();
    let kind = value.as_ref().and_then(|v| v["model"]["type"].as_str());
    match kind {
        Some(kind) if kind != "BPE" => format!("model {kind} (only BPE)"),
        _ => e.to_string(),
    }
}

/// The spec from a file's rest (see [`spec_from_json`]) and its [`Model`], read back.
pub(super) fn spec_from_saved(rest: &str, model: Model) -> Result<BpeSpec, String> {
    let t: TokenizerJson = serde_json::from_str(rest).map_err(|e| e.to_string())?;
    let config = config_of(&t, model.file_merges_len)?;
    Ok(assemble(&t, config, model))
}

/// Everything the engine checks outside the vocabulary and merges (`merges`: how many the file lists).
fn config_of(t: &TokenizerJson, merges: usize) -> Result<Config, String> {
    let m = &t.model;
    match m.kind.as_deref() {
        Some("BPE") => {}
        // Files from before "type" was written: `tokenizers` takes the first model the fields fit, a BPE
        // when there are merges.
        None if merges > 0 => {}
        None => return Err("a model without \"type\" and without merges (not a BPE)".into()),
        Some(other) => return Err(format!("model {other} (only BPE)")),
    }
    if m.dropout.is_some_and(|d| d > 0.0) {
        return Err("BPE dropout".into());
    }
    // `transformers`' converters write "" for both (Qwen, GPT-2 and many more): nothing is added then.
    let nonempty = |s: &Option<String>| s.as_deref().is_some_and(|s| !s.is_empty());
    if nonempty(&m.continuing_subword_prefix) || nonempty(&m.end_of_word_suffix) {
        return Err(format!(
            "BPE with a subword prefix {:?} or suffix {:?}",
            m.continuing_subword_prefix, m.end_of_word_suffix
        ));
    }
    if t.truncation.as_ref().is_some_and(|v| !v.is_null())
        || t.padding.as_ref().is_some_and(|v| !v.is_null())
    {
        return Err("truncation or padding configured in the file".into());
    }
    let normalizers = normalizers_of(t.normalizer.as_ref())?;
    let pre = pre_tokenizer_of(t.pre_tokenizer.as_ref(), &normalizers)?;
    // Without ByteLevel, tokens are characters (SentencePiece-style); `tokenizers` then needs an unknown
    // token for characters outside the vocabulary, unless they fall back to bytes.
    let symbols = match pre.byte_level {
        true => Symbols::Bytes,
        false if m.byte_fallback => Symbols::Chars,
        false => {
            return Err(
                "a BPE over characters (no ByteLevel pre-tokenizer) without byte_fallback".into(),
            )
        }
    };
    if pre
        .metaspace
        .as_ref()
        .is_some_and(|m| m.prepend == PrependScheme::First)
        && normalizers.iter().any(Normalize::may_drop_start)
    {
        return Err(
            "Metaspace prepend_scheme first after a normalizer that removes characters".into(),
        );
    }
    for a in &t.added_tokens {
        if a.single_word || a.lstrip || a.rstrip {
            return Err(format!(
                "added token {:?} with single_word/lstrip/rstrip",
                a.content
            ));
        }
    }

    Ok(Config {
        normalizers,
        pre,
        symbols,
    })
}

/// A vocabulary string's bytes appended to `out`: GPT-2's alphabet decoded (false for a character
/// outside it), or a SentencePiece-style token's UTF-8.
fn to_bytes(symbols: Symbols, token: &str, out: &mut Vec<u8>) -> bool {
    match symbols {
        Symbols::Bytes => from_byte_level_into(token, out),
        Symbols::Chars => {
            out.extend_from_slice(token.as_bytes());
            true
        }
    }
}

/// The model's id of a vocabulary string: by its bytes, or among the strings outside the byte alphabet.
fn model_id(
    symbols: Symbols,
    vocab: &Vocab,
    other_vocab: &[(String, u32)],
    token: &str,
) -> Option<u32> {
    let mut bytes = Vec::new();
    match to_bytes(symbols, token, &mut bytes) {
        true => vocab.get(&bytes),
        false => other_vocab
            .iter()
            .find(|(o, _)| o == token)
            .map(|&(_, id)| id),
    }
}

/// The vocabulary and merges in the engine's form.
fn model_of(m: &ModelJson, symbols: Symbols) -> Result<Model, String> {
    // Vocabulary strings to bytes, written straight into one buffer. Tokens with characters outside
    // the byte alphabet can never come out of byte-level BPE; they are kept aside for `token_to_id`.
    let to_bytes = |token: &str, out: &mut Vec<u8>| to_bytes(symbols, token, out);
    let text_bytes: usize = m.vocab.0.iter().map(|(t, _)| t.len()).sum();
    let mut builder = VocabBuilder::with_capacity(m.vocab.0.len(), text_bytes);
    let mut other_vocab = Vec::new();
    for (token, id) in &m.vocab.0 {
        if !builder.push_with(*id, |out| to_bytes(token, out)) {
            other_vocab.push((token.to_string(), *id));
        }
    }
    let vocab = builder.finish()?;
    // Merges to ids through the vocabulary just built, on every core (150k+ of them): the two tokens'
    // bytes, then those bytes joined. A merge of a token outside the byte alphabet can never apply and
    // is left out (`tokenizers` keeps it, to the same effect).
    let merges = m
        .merges
        .par_iter()
        .map_init(
            || (Vec::new(), Vec::new()),
            |(a_bytes, b_bytes), MergeJson(a, b)| {
                let missing = |t: &str| format!("merge token {t:?} not in the vocabulary");
                a_bytes.clear();
                b_bytes.clear();
                if !to_bytes(a, a_bytes) || !to_bytes(b, b_bytes) {
                    let known = |t: &str| model_id(symbols, &vocab, &other_vocab, t).is_some();
                    return match (known(a), known(b)) {
                        (true, true) => Ok(None),
                        (false, _) => Err(missing(a)),
                        (_, false) => Err(missing(b)),
                    };
                }
                let ia = vocab.get(a_bytes).ok_or_else(|| missing(a))?;
                let ib = vocab.get(b_bytes).ok_or_else(|| missing(b))?;
                a_bytes.extend_from_slice(b_bytes);
                let joined = vocab
                    .get(a_bytes)
                    .ok_or_else(|| missing(&format!("{a}{b}")))?;
                Ok(Some((ia, ib, joined)))
            },
        )
        .filter_map(Result::transpose)
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Model {
        vocab,
        other_vocab,
        merges,
        file_vocab_len: m.vocab.0.len(),
        file_merges_len: m.merges.len(),
    })
}

/// The spec from the checked rest and the model.
fn assemble(t: &TokenizerJson, config: Config, model: Model) -> BpeSpec {
    let Model {
        vocab,
        other_vocab,
        merges,
        file_vocab_len,
        ..
    } = model;
    let symbols = config.symbols;
    // `tokenizers`: model vocabulary + distinct added contents - those the model already has (looked up
    // by content: few added tokens, 150k+ vocabulary entries).
    let contents: FxHashSet<&str> = t.added_tokens.iter().map(|a| a.content.as_str()).collect();
    let in_model: FxHashMap<&str, u32> = contents
        .iter()
        .filter_map(|&c| Some((c, model_id(symbols, &vocab, &other_vocab, c)?)))
        .collect();
    let vocab_size = file_vocab_len + contents.len() - in_model.len();
    BpeSpec {
        symbols,
        vocab,
        merges: MergeList::Ids(merges),
        ignore_merges: t.model.ignore_merges,
        added: number_added_tokens(&t.added_tokens, &in_model, file_vocab_len as u32),
        normalizers: config.normalizers,
        patterns: config.pre.patterns,
        metaspace: config.pre.metaspace,
        vocab_size,
        other_vocab,
    }
}

/// The ids `tokenizers` gives the added tokens when it loads a file: it adds them one by one, in the
/// file's order, ignoring the `id` written there. A content the model's vocabulary has keeps that id (as
/// does one added before); any other gets the model's vocabulary size (its entry count), or one past
/// the largest added id once that reaches it. A token identical to one added before, or empty, is
/// skipped. (The written ids agree with this in every file `tokenizers` itself saved; hand-edited ones
/// may not.)
fn number_added_tokens(
    tokens: &[AddedTokenJson],
    in_model: &FxHashMap<&str, u32>,
    model_size: u32,
) -> Vec<AddedSpec> {
    let mut ids: FxHashMap<&str, u32> = FxHashMap::default();
    let mut seen: FxHashSet<(&str, bool, bool)> = FxHashSet::default();
    let mut out = Vec::new();
    for a in tokens {
        let key = (a.content.as_str(), a.normalized, a.special);
        if a.content.is_empty() || !seen.insert(key) {
            continue;
        }
        let id = match ids
            .get(a.content.as_str())
            .or(in_model.get(a.content.as_str()))
        {
            Some(&id) => id,
            None => match ids.values().max() {
                None => model_size,
                Some(&max) if max >= model_size || model_size == 0 => max + 1,
                Some(_) => model_size,
            },
        };
        ids.insert(&a.content, id);
        out.push(AddedSpec {
            content: a.content.clone(),
            id,
            normalized: a.normalized,
        });
    }
    out
}
