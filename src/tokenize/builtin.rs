//! Built-in tokenizers: OpenAI's `o200k_base` and `cl100k_base`, from the BPE ranks that the
//! `tiktoken-rs` crate ships, decoded at build time into compact tables compiled into the library
//! (build.rs): the fast engine loads from them directly (a built-in job costs no more than one on a
//! `tokenizer.json`); for `tokenizers` they are converted into a `tokenizers::Tokenizer` (byte-level BPE,
//! the tiktoken split regex) on first use. Nothing is downloaded.
//!
//! The conversion for `tokenizers` is the one `transformers` uses for tiktoken models: the vocabulary is
//! the rank table with bytes written in GPT-2's byte-to-unicode alphabet, and each multi-byte token gets
//! the one merge that tiktoken's own algorithm performs last when encoding that token (replaying lower
//! ranks only; done on first use, since it takes a while). The fast engine needs no merge list: it merges
//! by rank as tiktoken does. `ignore_merges` is on because tiktoken looks a whole pre-token up in the
//! ranks before merging.

use std::collections::HashMap;
use std::sync::OnceLock;

use rayon::prelude::*;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use super::fast::patterns::{self, Pattern};
use super::fast::vocab::VocabBuilder;
use super::fast::{to_byte_level, AddedSpec, BpeSpec, MergeList, Symbols};
use crate::{Error, Result};

/// The rank tables, decoded from `tiktoken-rs`'s at build time (build.rs).
static O200K_TABLE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/o200k_base.ranks"));
static CL100K_TABLE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/cl100k_base.ranks"));

/// Names accepted by [`builtin_tokenizer`] and wherever a tokenizer is taken.
pub const BUILTIN_TOKENIZERS: &[&str] = &["o200k_base", "cl100k_base"];

/// What a built-in tokenizer is made of, from which both engines are built.
pub(crate) struct BuiltinParts {
    /// Token bytes by rank (= id).
    pub by_rank: Vec<&'static [u8]>,
    /// For each multi-byte token in rank order, the two parts its last merge joins: only `tokenizers`
    /// needs them (the fast engine merges by rank), so they are recovered on first use.
    merges: OnceLock<Vec<(Vec<u8>, Vec<u8>)>>,
    /// Special tokens and their ids, by id.
    pub specials: Vec<(String, u32)>,
    pub pattern: &'static str,
}

/// The parts of a built-in tokenizer by name. The conversion takes a moment, so each is done once per
/// process.
pub(crate) fn builtin_parts(name: &str) -> Result<&'static BuiltinParts> {
    static O200K_PARTS: OnceLock<Parts> = OnceLock::new();
    static CL100K_PARTS: OnceLock<Parts> = OnceLock::new();
    let parts = match name {
        "o200k_base" => O200K_PARTS.get_or_init(|| parts(O200K_TABLE, patterns::O200K)),
        "cl100k_base" => CL100K_PARTS.get_or_init(|| parts(CL100K_TABLE, patterns::CL100K)),
        _ => {
            return Err(Error::Tokenizer {
                name: name.to_string(),
                reason: format!(
                    "not a built-in tokenizer ({})",
                    BUILTIN_TOKENIZERS.join(", ")
                ),
            })
        }
    };
    parts.as_ref().map_err(|reason| Error::Tokenizer {
        name: name.to_string(),
        reason: reason.clone(),
    })
}

/// A built-in tokenizer by name, as a `tokenizers::Tokenizer`.
pub fn builtin_tokenizer(name: &str) -> Result<tokenizers::Tokenizer> {
    to_tokenizers(builtin_parts(name)?).map_err(|reason| Error::Tokenizer {
        name: name.to_string(),
        reason,
    })
}

/// The fast engine's form of a built-in tokenizer: the same vocabulary, merges, specials and pattern as
/// [`builtin_tokenizer`] gives `tokenizers`.
pub(crate) fn builtin_spec(parts: &BuiltinParts) -> std::result::Result<BpeSpec, String> {
    let bytes = parts.by_rank.iter().map(|t| t.len()).sum();
    let mut vocab = VocabBuilder::with_capacity(parts.by_rank.len() + parts.specials.len(), bytes);
    for (rank, token) in parts.by_rank.iter().enumerate() {
        vocab.push(token, rank as u32);
    }
    for (text, id) in &parts.specials {
        vocab.push(text.as_bytes(), *id);
    }
    let pattern = Pattern::recognize(parts.pattern).ok_or("pattern not known to the fast path")?;
    Ok(BpeSpec {
        symbols: Symbols::Bytes,
        vocab_size: vocab.len(),
        vocab: vocab.finish()?,
        merges: MergeList::FromRanks,
        ignore_merges: true,
        added: parts
            .specials
            .iter()
            .map(|(t, id)| AddedSpec {
                content: t.clone(),
                id: *id,
                normalized: false,
            })
            .collect(),
        normalizers: Vec::new(),
        patterns: vec![pattern],
        metaspace: None,
        other_vocab: Vec::new(),
    })
}

type Parts = std::result::Result<BuiltinParts, String>;

/// A rank table as build.rs writes it (see `write_rank_tables` there).
fn parts(table: &'static [u8], pattern: &'static str) -> Parts {
    let mut r = Reader { table, at: 0 };
    let n = r.u32()?;
    let offsets: Vec<usize> = (0..=n)
        .map(|_| r.u32())
        .collect::<std::result::Result<_, _>>()?;
    let bytes = r.bytes(offsets[n])?;
    let by_rank = offsets.windows(2).map(|w| &bytes[w[0]..w[1]]).collect();
    let mut specials = Vec::new();
    for _ in 0..r.u32()? {
        let id = r.u32()? as u32;
        let len = r.u32()?;
        let text = std::str::from_utf8(r.bytes(len)?).map_err(|e| e.to_string())?;
        specials.push((text.to_string(), id));
    }
    Ok(BuiltinParts {
        by_rank,
        merges: OnceLock::new(),
        specials,
        pattern,
    })
}

/// Reads a rank table front to back.
struct Reader {
    table: &'static [u8],
    at: usize,
}

impl Reader {
    fn bytes(&mut self, len: usize) -> std::result::Result<&'static [u8], String> {
        let out = self
            .table
            .get(self.at..self.at + len)
            .ok_or("rank table cut short")?;
        self.at += len;
        Ok(out)
    }

    fn u32(&mut self) -> std::result::Result<usize, String> {
        let word = self.bytes(4)?;
        Ok(u32::from_le_bytes(word.try_into().expect("4 bytes")) as usize)
    }
}

impl BuiltinParts {
    /// The merge list `tokenizers` needs: for each multi-byte token the pair tiktoken's algorithm joins
    /// last (its merges replayed with lower ranks only). Recovered once, on first use.
    fn merges(&self) -> &[(Vec<u8>, Vec<u8>)] {
        self.merges.get_or_init(|| {
            let ranks: HashMap<&[u8], u32> = self
                .by_rank
                .iter()
                .enumerate()
                .map(|(rank, bytes)| (&bytes[..], rank as u32))
                .collect();
            self.by_rank
                .par_iter()
                .enumerate()
                .filter(|(_, token)| token.len() > 1)
                .filter_map(|(rank, token)| {
                    let parts = replay_merges(&ranks, token, rank as u32);
                    (parts.len() == 2).then(|| (parts[0].to_vec(), parts[1].to_vec()))
                })
                .collect()
        })
    }
}

fn to_tokenizers(parts: &BuiltinParts) -> std::result::Result<tokenizers::Tokenizer, String> {
    let to_str = to_byte_level;
    let mut vocab: tokenizers::models::bpe::Vocab = parts
        .by_rank
        .iter()
        .enumerate()
        .map(|(rank, bytes)| (to_str(bytes), rank as u32))
        .collect();
    // Special tokens go into the model's vocabulary with their own ids, so that `add_special_tokens` below
    // finds them there instead of numbering them after the last rank.
    for (text, id) in &parts.specials {
        vocab.insert(text.clone(), *id);
    }
    let merges = parts
        .merges()
        .iter()
        .map(|(a, b)| (to_str(a), to_str(b)))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(true)
        .build()
        .map_err(|e| e.to_string())?;
    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    let split = Split::new(
        SplitPattern::Regex(parts.pattern.to_string()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| e.to_string())?;
    tokenizer.with_pre_tokenizer(Some(Sequence::new(vec![
        split.into(),
        ByteLevel::new(false, false, false).into(),
    ])));
    tokenizer.with_decoder(Some(ByteLevel::new(false, false, false)));
    let added: Vec<AddedToken> = parts
        .specials
        .iter()
        .map(|(text, _)| AddedToken::from(text.clone(), true))
        .collect();
    tokenizer
        .add_special_tokens(added)
        .map_err(|e| e.to_string())?;
    for (text, id) in &parts.specials {
        if tokenizer.token_to_id(text) != Some(*id) {
            return Err(format!("special token {text} did not keep id {id}"));
        }
    }
    Ok(tokenizer)
}

/// tiktoken's merge loop on `token`'s bytes, using only ranks below `max_rank`: what is left is the pair
/// that the final merge (the one producing `token`) joins.
fn replay_merges<'a>(ranks: &HashMap<&[u8], u32>, token: &'a [u8], max_rank: u32) -> Vec<&'a [u8]> {
    // Parts are (start, end) byte ranges of `token`.
    let mut parts: Vec<(usize, usize)> = (0..token.len()).map(|i| (i, i + 1)).collect();
    loop {
        let best = parts
            .windows(2)
            .enumerate()
            .filter_map(|(i, w)| {
                ranks
                    .get(&token[w[0].0..w[1].1])
                    .filter(|&&r| r < max_rank)
                    .map(|&r| (r, i))
            })
            .min();
        let Some((_, i)) = best else { break };
        parts[i].1 = parts[i + 1].1;
        parts.remove(i + 1);
    }
    parts.iter().map(|&(s, e)| &token[s..e]).collect()
}
