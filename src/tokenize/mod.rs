//! Tokenizers: any Hugging Face `tokenizer.json`, or a built-in one (`o200k_base`, `cl100k_base`) that
//! needs no download. Prompts and outputs are always encoded separately and without special tokens
//! (`add_special_tokens = false`), as CS336 does, so no BPE merge crosses the prompt/output boundary.

mod builtin;
mod encodings;
pub(crate) mod fast;
mod rows;

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rayon::prelude::*;

pub use builtin::{builtin_tokenizer, BUILTIN_TOKENIZERS};
pub use encodings::Encodings;
pub use fast::{CacheStats, CacheUse, LoadCache};
pub use rows::{tokenize_pairs, tokenize_rows};

/// Split regexes as `tokenizer.json` files write them: the ones the fast engine runs hand-compiled
/// (GPT-2, Llama 3, Qwen2, cl100k, o200k) and real ones its compiler takes (DeepSeek-V3, Tekken). Any
/// regex of the compiler's subset runs fast too; one outside it sends a tokenizer to `tokenizers`.
pub mod split_patterns {
    pub use super::fast::patterns::{CL100K, DEEPSEEK_V3, GPT2, LLAMA3, O200K, QWEN2, TEKKEN};
}

use crate::{Error, Result};
use fast::FastBpe;

/// The token used as padding when neither the caller nor the tokenizer names one.
pub const ENDOFTEXT: &str = "<|endoftext|>";

/// Which encoder a [`Tokenizer`] runs: `auto`, `fast` or `tokenizers`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EngineChoice {
    /// The fast encoder when it supports the tokenizer, else `tokenizers`.
    #[default]
    Auto,
    /// The fast encoder, or an error saying why it cannot run this tokenizer.
    Fast,
    /// Hugging Face `tokenizers`.
    Tokenizers,
}

crate::names::named_enum!(EngineChoice as "engine" {
    Auto = "auto",
    Fast = "fast",
    Tokenizers = "tokenizers",
});

/// The encoder a [`Tokenizer`] runs, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Engine {
    /// This crate's BPE encoder (same ids as `tokenizers`); `detail` names its model, normalizers and
    /// pre-tokenizer.
    Fast { detail: String },
    /// Hugging Face `tokenizers`: asked for, or the fallback (`reason` says why the fast one could not).
    Tokenizers { reason: String },
}

impl std::fmt::Display for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Engine::Fast { detail } => write!(f, "fast ({detail})"),
            Engine::Tokenizers { reason } => write!(f, "tokenizers ({reason})"),
        }
    }
}

impl Engine {
    /// `"fast"` or `"tokenizers"`.
    pub fn name(&self) -> &'static str {
        match self {
            Engine::Fast { .. } => "fast",
            Engine::Tokenizers { .. } => "tokenizers",
        }
    }
}

/// The encoder that runs, held once.
#[derive(Clone)]
enum Encoder {
    Fast(Arc<FastBpe>),
    /// Hugging Face `tokenizers`; `reason` says why (asked for, or why the fast one could not).
    Tokenizers {
        reason: String,
    },
}

/// Where the `tokenizers` form comes from when it is first needed.
enum Source {
    File(PathBuf),
    Builtin(String),
    Json(Arc<str>),
    Given,
}

/// A tokenizer with the few things collation needs: batch encoding without special tokens, and the pad id.
///
/// Byte-level BPE tokenizers (Qwen2/2.5/3, Llama 3, GPT-2, the built-ins) run on the fast encoder, which
/// gives the ids `tokenizers` gives; anything else runs on `tokenizers`. [`Tokenizer::engine`] says which.
/// The `tokenizers` form is built only when something needs it.
#[derive(Clone)]
pub struct Tokenizer {
    name: String,
    configured_pad: Option<u32>,
    encoder: Encoder,
    source: Arc<Source>,
    hf: Arc<OnceLock<std::result::Result<tokenizers::Tokenizer, String>>>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("name", &self.name)
            .field("engine", &self.engine())
            .field("vocab_size", &self.vocab_size())
            .field("pad_id", &self.pad_id())
            .finish()
    }
}

impl Tokenizer {
    /// A built-in name (see [`BUILTIN_TOKENIZERS`]), or a path to a `tokenizer.json` (or to a directory that
    /// holds one).
    pub fn load(path_or_name: &str) -> Result<Self> {
        Self::load_with(path_or_name, EngineChoice::Auto)
    }

    /// [`Tokenizer::load`] with a choice of engine.
    pub fn load_with(path_or_name: &str, engine: EngineChoice) -> Result<Self> {
        if BUILTIN_TOKENIZERS.contains(&path_or_name) {
            return Self::builtin_with(path_or_name, engine);
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
        Self::from_file_with(path, engine)
    }

    /// A built-in tokenizer, built from the BPE ranks the `tiktoken-rs` crate ships.
    pub fn builtin(name: &str) -> Result<Self> {
        Self::builtin_with(name, EngineChoice::Auto)
    }

    /// [`Tokenizer::builtin`] with a choice of engine.
    pub fn builtin_with(name: &str, engine: EngineChoice) -> Result<Self> {
        let parts = builtin::builtin_parts(name)?;
        let fast = match engine {
            EngineChoice::Tokenizers => Err("asked for".to_string()),
            _ => builtin::builtin_spec(parts).and_then(FastBpe::new),
        };
        Self::assemble(
            name.to_string(),
            engine,
            fast,
            Source::Builtin(name.to_string()),
            None,
        )
    }

    /// Load a `tokenizer.json` (or the one in a directory). A `tokenizer_config.json` beside it is read for
    /// its `pad_token`, as `transformers.AutoTokenizer` would.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        Self::from_file_with(path, EngineChoice::Auto)
    }

    /// [`Tokenizer::from_file`] with a choice of engine.
    pub fn from_file_with(path: impl AsRef<Path>, engine: EngineChoice) -> Result<Self> {
        let mut path: PathBuf = path.as_ref().to_path_buf();
        if path.is_dir() {
            path.push("tokenizer.json");
        }
        let name = path.display().to_string();
        let mut tokenizer = match engine {
            EngineChoice::Tokenizers => Self::assemble(
                name,
                engine,
                Err("asked for".into()),
                Source::File(path.clone()),
                None,
            )?,
            _ => {
                let bytes = crate::io::read_file(&path).map_err(|e| Error::Tokenizer {
                    name: name.clone(),
                    reason: e.to_string(),
                })?;
                let json = simdutf8::basic::from_utf8(&bytes).map_err(|_| Error::Tokenizer {
                    name: name.clone(),
                    reason: "not UTF-8 text".into(),
                })?;
                Self::from_json_text(json, name, engine, Source::File(path.clone()))?
            }
        };
        if tokenizer.configured_pad.is_none() {
            tokenizer.configured_pad =
                pad_from_config(&path.with_file_name("tokenizer_config.json"))
                    .and_then(|token| tokenizer.token_to_id(&token));
        }
        Ok(tokenizer)
    }

    /// A tokenizer from the text of a `tokenizer.json` (what `tokenizers.Tokenizer.to_str()` gives in
    /// Python); `name` is what manifests and messages call it.
    pub fn from_json_str(
        json: &str,
        name: impl Into<String>,
        engine: EngineChoice,
    ) -> Result<Self> {
        let source = Source::Json(Arc::from(json));
        Self::from_json_text(json, name.into(), engine, source)
    }

    fn from_json_text(
        json: &str,
        name: String,
        engine: EngineChoice,
        source: Source,
    ) -> Result<Self> {
        let fast = match engine {
            EngineChoice::Tokenizers => Err("asked for".to_string()),
            _ => FastBpe::from_json(json, fast::cache_dir().as_deref()),
        };
        // A fallback parses the text already read rather than reading it again.
        let fallback = (fast.is_err() && engine != EngineChoice::Fast).then(|| {
            json.parse::<tokenizers::Tokenizer>()
                .map_err(|e| e.to_string())
        });
        Self::assemble(name, engine, fast, source, fallback)
    }

    /// The tokenizer from its engine attempt: the fast one, an error if it was required and failed, or
    /// `tokenizers` loaded now (so that a file it rejects fails here, not later).
    /// `tokenizers_form`, when given, is the `tokenizers` form already built from the same source.
    fn assemble(
        name: String,
        choice: EngineChoice,
        fast: std::result::Result<FastBpe, String>,
        source: Source,
        tokenizers_form: Option<std::result::Result<tokenizers::Tokenizer, String>>,
    ) -> Result<Self> {
        let hf = OnceLock::new();
        if let Some(built) = tokenizers_form {
            let _ = hf.set(built);
        }
        let mut tokenizer = Tokenizer {
            name,
            configured_pad: None,
            encoder: Encoder::Tokenizers {
                reason: String::new(),
            },
            source: Arc::new(source),
            hf: Arc::new(hf),
        };
        match fast {
            Ok(fast) => tokenizer.encoder = Encoder::Fast(Arc::new(fast)),
            Err(reason) if choice == EngineChoice::Fast => {
                return Err(Error::Tokenizer {
                    name: tokenizer.name,
                    reason: format!("the fast engine does not support it: {reason}"),
                })
            }
            Err(reason) => {
                tokenizer.encoder = Encoder::Tokenizers {
                    reason: if choice == EngineChoice::Tokenizers {
                        reason
                    } else {
                        format!("fallback: {reason}")
                    },
                };
                tokenizer.configured_pad = tokenizer.inner()?.get_padding().map(|p| p.pad_id);
            }
        }
        Ok(tokenizer)
    }

    /// Wrap a `tokenizers::Tokenizer` built elsewhere; `name` is what manifests and messages call it. It
    /// runs on `tokenizers` itself.
    pub fn from_tokenizers(inner: tokenizers::Tokenizer, name: impl Into<String>) -> Self {
        let configured_pad = inner.get_padding().map(|p| p.pad_id);
        Tokenizer {
            name: name.into(),
            configured_pad,
            encoder: Encoder::Tokenizers {
                reason: "given as a tokenizers::Tokenizer".into(),
            },
            source: Arc::new(Source::Given),
            hf: Arc::new(OnceLock::from(Ok(inner))),
        }
    }

    /// The name it was loaded by (a built-in name or a path).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Which encoder runs, and why.
    pub fn engine(&self) -> Engine {
        match &self.encoder {
            Encoder::Fast(fast) => Engine::Fast {
                detail: fast.describe(),
            },
            Encoder::Tokenizers { reason } => Engine::Tokenizers {
                reason: reason.clone(),
            },
        }
    }

    /// The fast encoder, when it is the one that runs.
    fn fast(&self) -> Option<&FastBpe> {
        match &self.encoder {
            Encoder::Fast(fast) => Some(fast),
            Encoder::Tokenizers { .. } => None,
        }
    }

    /// The fast encoder's cache counters since the tokenizer was loaded (shared by its clones); `None` on
    /// `tokenizers`.
    pub fn cache_stats(&self) -> Option<CacheStats> {
        self.fast().map(FastBpe::cache_stats)
    }

    /// The fast engine's load cache as a load would use it now (from `$SFT_COLLATE_CACHE`,
    /// `$XDG_CACHE_HOME/sft-collate` or `~/.cache/sft-collate`): its directory and what it holds; `None`
    /// when off.
    pub fn load_cache() -> Option<LoadCache> {
        fast::load_cache()
    }

    /// What loading a `tokenizer.json` on the fast engine did with the load cache (`None` for built-ins
    /// and for tokenizers `tokenizers` runs): see the README's "Tokenizers".
    pub fn cache_use(&self) -> Option<&CacheUse> {
        self.fast().and_then(FastBpe::cache_use)
    }

    /// This tokenizer as a `tokenizer.json` text, as Hugging Face `tokenizers` writes one: for a
    /// built-in, the `tokenizers` form of its tiktoken ranks. Load it in `tokenizers`, `transformers`
    /// or another engine to compare them on the same vocabulary (`scripts/tokenize-peers.py` does).
    ///
    /// ```
    /// # fn main() -> sft_collate::Result<()> {
    /// let o200k = sft_collate::Tokenizer::load("o200k_base")?;
    /// let json = o200k.to_json()?;
    /// let again = sft_collate::Tokenizer::from_json_str(&json, "o200k (json)", Default::default())?;
    /// assert_eq!(again.encode("Hello, world!")?, o200k.encode("Hello, world!")?);
    /// # Ok(()) }
    /// ```
    pub fn to_json(&self) -> Result<String> {
        self.inner()?
            .to_string(false)
            .map_err(|e| Error::Tokenizer {
                name: self.name.clone(),
                reason: e.to_string(),
            })
    }

    /// The `tokenizers::Tokenizer` of the same file or built-in, built on first use.
    pub fn inner(&self) -> Result<&tokenizers::Tokenizer> {
        let built = self.hf.get_or_init(|| match &*self.source {
            Source::File(path) => tokenizers::Tokenizer::from_file(path).map_err(|e| e.to_string()),
            Source::Builtin(name) => builtin_tokenizer(name).map_err(|e| e.to_string()),
            Source::Json(json) => json.parse().map_err(|e: tokenizers::Error| e.to_string()),
            Source::Given => Err("no tokenizers form".to_string()),
        });
        built.as_ref().map_err(|reason| Error::Tokenizer {
            name: self.name.clone(),
            reason: reason.clone(),
        })
    }

    /// Vocabulary size, added tokens included (as `tokenizers` counts it).
    pub fn vocab_size(&self) -> usize {
        match self.fast() {
            Some(fast) => fast.vocab_size(),
            None => self.inner().map_or(0, |t| t.get_vocab_size(true)),
        }
    }

    /// The id of a token string (an added token's content, or a vocabulary entry as `tokenizers` writes
    /// it).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match self.fast() {
            Some(fast) => fast.token_to_id(token),
            None => self.inner().ok()?.token_to_id(token),
        }
    }

    /// What identifies this tokenizer's ids, for checking that two runs tokenized alike: a built-in by
    /// name, a file or JSON by an FNV-1a hash of its bytes (a token store records it, and refuses to mix
    /// shards made with different tokenizers).
    pub fn fingerprint(&self) -> Result<String> {
        Ok(match &*self.source {
            Source::Builtin(name) => format!("builtin:{name}"),
            Source::File(path) => {
                let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
                format!("fnv1a64:{:016x}", fnv1a64(&bytes))
            }
            Source::Json(json) => format!("fnv1a64:{:016x}", fnv1a64(json.as_bytes())),
            Source::Given => format!("given:{}", self.name),
        })
    }

    /// The tokenizer's own pad id: its configured pad token, else `<|endoftext|>` when it has one.
    pub fn pad_id(&self) -> Option<u32> {
        self.configured_pad.or_else(|| self.token_to_id(ENDOFTEXT))
    }

    /// `explicit` when given, else [`Tokenizer::pad_id`], else [`Error::NoPadToken`].
    pub fn resolve_pad_id(&self, explicit: Option<u32>) -> Result<u32> {
        explicit.or_else(|| self.pad_id()).ok_or(Error::NoPadToken)
    }

    /// Encode each text separately, without special tokens, in parallel over the CPU cores.
    pub fn encode_batch(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        if let Some(fast) = self.fast() {
            return Ok(texts.par_iter().map(|t| fast.encode(t)).collect());
        }
        let encodings = self
            .inner()?
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

    /// [`Tokenizer::encode_batch`] into one buffer ([`Encodings`]): the same ids, with no vector per
    /// text. In parallel over the CPU cores, each thread encoding a run of texts into a buffer of its own
    /// (joined at the end); on one thread straight into the result.
    pub fn encode_batch_flat(&self, texts: &[&str]) -> Result<Encodings> {
        let Some(fast) = self.fast() else {
            let each = self.encode_batch(texts)?;
            let offsets = std::iter::once(0)
                .chain(each.iter().scan(0, |end, t| {
                    *end += t.len();
                    Some(*end)
                }))
                .collect();
            return Ok(Encodings::from_offsets(each.concat(), offsets));
        };
        let encode = |texts: &[&str]| {
            let bytes: usize = texts.iter().map(|t| t.len()).sum();
            // English runs about 4 bytes a token: a third of the bytes rarely needs to grow.
            let mut ids = Vec::with_capacity(bytes / 3 + 16);
            let mut offsets = Vec::with_capacity(texts.len() + 1);
            offsets.push(0);
            fast.encode_each(texts.iter().copied(), &mut ids, |end| offsets.push(end));
            Encodings::from_offsets(ids, offsets)
        };
        let threads = rayon::current_num_threads();
        if threads == 1 || texts.len() < 2 {
            return Ok(encode(texts));
        }
        // Several runs per thread, so that a thread given long texts does not hold up the rest.
        let run = texts.len().div_ceil(threads * 4);
        Ok(Encodings::concat(
            texts.par_chunks(run).map(encode).collect(),
        ))
    }

    /// Encode one text without special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        if let Some(fast) = self.fast() {
            return Ok(fast.encode(text));
        }
        Ok(self.encode_batch(&[text])?.pop().unwrap_or_default())
    }

    /// The text of one token, as it decodes on its own (a token holding part of a UTF-8 character decodes
    /// to U+FFFD).
    pub fn token_text(&self, id: u32) -> String {
        if let Some(fast) = self.fast() {
            return fast.token_text(id).unwrap_or_default();
        }
        let Ok(inner) = self.inner() else {
            return String::new();
        };
        inner
            .decode(&[id], false)
            .ok()
            .filter(|s| !s.is_empty())
            .or_else(|| inner.id_to_token(id))
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

/// FNV-1a, 64 bits: a stable hash of a tokenizer file's bytes (not cryptographic; it tells files apart).
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}
