//! `tokenizer.json` → [`BpeSpec`]: the parts of a Hugging Face tokenizer file the fast encoder needs, read
//! directly (borrowed strings, vocabulary and merges converted on every core), and the reason when the
//! file is outside what the encoder supports.

use std::borrow::Cow;

use rayon::prelude::*;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

use super::byte_level::from_byte_level;
use super::patterns::{Pattern, GPT2};
use super::{AddedSpec, BpeSpec};

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
                patterns.push(Pattern::recognize(GPT2).expect("GPT-2's regex is known"));
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
