//! Tokenizers: any Hugging Face `tokenizer.json`, or a built-in one (`o200k_base`, `cl100k_base`) that
//! needs no download. Prompts and outputs are always encoded separately and without special tokens
//! (`add_special_tokens = false`), as CS336 does, so no BPE merge crosses the prompt/output boundary.

mod builtin;

use std::path::{Path, PathBuf};

pub use builtin::{builtin_tokenizer, BUILTIN_TOKENIZERS};

use crate::{Error, Result};

/// The token used as padding when neither the caller nor the tokenizer names one.
pub const ENDOFTEXT: &str = "<|endoftext|>";

/// A tokenizer with the few things collation needs: batch encoding without special tokens, and the pad id.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    name: String,
    configured_pad: Option<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("name", &self.name)
            .field("vocab_size", &self.vocab_size())
            .field("pad_id", &self.pad_id())
            .finish()
    }
}

impl Tokenizer {
    /// A built-in name (see [`BUILTIN_TOKENIZERS`]), or a path to a `tokenizer.json` (or to a directory that
    /// holds one).
    pub fn load(path_or_name: &str) -> Result<Self> {
        if BUILTIN_TOKENIZERS.contains(&path_or_name) {
            return Self::builtin(path_or_name);
        }
        let path = Path::new(path_or_name);
        if !path.exists() {
            return Err(Error::Tokenizer {
                name: path_or_name.to_string(),
                reason: format!(
                    "no such file, and not a built-in tokenizer ({})",
                    BUILTIN_TOKENIZERS.join(", ")
                ),
            });
        }
        Self::from_file(path)
    }

    /// A built-in tokenizer, built from the BPE ranks the `tiktoken-rs` crate ships.
    pub fn builtin(name: &str) -> Result<Self> {
        Ok(Self::from_tokenizers(builtin_tokenizer(name)?, name))
    }

    /// Load a `tokenizer.json` (or the one in a directory). A `tokenizer_config.json` beside it is read for
    /// its `pad_token`, as `transformers.AutoTokenizer` would.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let mut path: PathBuf = path.as_ref().to_path_buf();
        if path.is_dir() {
            path.push("tokenizer.json");
        }
        let name = path.display().to_string();
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| Error::Tokenizer {
            name: name.clone(),
            reason: e.to_string(),
        })?;
        let mut tokenizer = Self::from_tokenizers(inner, name);
        if tokenizer.configured_pad.is_none() {
            tokenizer.configured_pad =
                pad_from_config(&path.with_file_name("tokenizer_config.json"))
                    .and_then(|token| tokenizer.inner.token_to_id(&token));
        }
        Ok(tokenizer)
    }

    /// Wrap a `tokenizers::Tokenizer` built elsewhere; `name` is what manifests and messages call it.
    pub fn from_tokenizers(inner: tokenizers::Tokenizer, name: impl Into<String>) -> Self {
        let configured_pad = inner.get_padding().map(|p| p.pad_id);
        Tokenizer {
            inner,
            name: name.into(),
            configured_pad,
        }
    }

    /// The name it was loaded by (a built-in name or a path).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The wrapped `tokenizers::Tokenizer`.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The tokenizer's own pad id: its configured pad token, else `<|endoftext|>` when it has one.
    pub fn pad_id(&self) -> Option<u32> {
        self.configured_pad
            .or_else(|| self.inner.token_to_id(ENDOFTEXT))
    }

    /// `explicit` when given, else [`Tokenizer::pad_id`], else [`Error::NoPadToken`].
    pub fn resolve_pad_id(&self, explicit: Option<u32>) -> Result<u32> {
        explicit.or_else(|| self.pad_id()).ok_or(Error::NoPadToken)
    }

    /// Encode each text separately, without special tokens, in parallel over the CPU cores.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        let encodings = self
            .inner
            .encode_batch_fast(texts.to_vec(), false)
            .map_err(|e| Error::Tokenizer {
                name: self.name.clone(),
                reason: e.to_string(),
            })?;
        Ok(encodings
            .into_iter()
            .map(|e| e.get_ids().to_vec())
            .collect())
    }

    /// Encode one text without special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self.encode_batch(&[text])?.pop().unwrap_or_default())
    }

    /// The text of one token, as it decodes on its own (a token holding part of a UTF-8 character decodes
    /// to U+FFFD).
    pub fn token_text(&self, id: u32) -> String {
        self.inner
            .decode(&[id], false)
            .ok()
            .filter(|s| !s.is_empty())
            .or_else(|| self.inner.id_to_token(id))
            .unwrap_or_default()
    }
}

/// `pad_token` from a `tokenizer_config.json`: a string, or an object with `content`.
fn pad_from_config(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let config: serde_json::Value = serde_json::from_str(&text).ok()?;
    match config.get("pad_token")? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}
