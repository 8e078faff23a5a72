//! What a collation should produce: [`CollateSpec`] and the small option types it is made of.
//! Names follow the Hugging Face vocabulary (`pad_to_multiple_of`, `ignore_index`, `max_len`).

use crate::ragged::{LengthLimit, Truncation};
use crate::{Error, Result};

/// How `labels` are written where `response_mask` is false.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LabelFormat {
    /// As CS336: labels hold the real next token everywhere, and `pad_id` past the end of the sequence.
    /// The loss must then use `response_mask`.
    #[default]
    Pad,
    /// The Hugging Face / PyTorch convention: the given value (normally -100, PyTorch's default
    /// `ignore_index`) wherever the mask is false, so `cross_entropy(..., ignore_index=-100)` needs no mask.
    IgnoreIndex(i64),
}

impl LabelFormat {
    /// PyTorch's default `ignore_index`.
    pub const IGNORE_INDEX: LabelFormat = LabelFormat::IgnoreIndex(-100);
    /// The names the CLI takes: `pad`, and `ignore-index` for [`LabelFormat::IGNORE_INDEX`].
    pub const NAMES: &'static [&'static str] = &["pad", "ignore-index"];
}

impl std::str::FromStr for LabelFormat {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "pad" => Ok(LabelFormat::Pad),
            "ignore-index" => Ok(LabelFormat::IGNORE_INDEX),
            _ => Err(Error::InvalidOption {
                name: "labels",
                reason: format!("{s:?} is not one of: pad, ignore-index"),
            }),
        }
    }
}

/// The integer type of `input_ids` and `labels`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum IdDtype {
    /// 32-bit ids (CS336's choice, half the bytes).
    #[default]
    I32,
    /// 64-bit ids (`torch.long`, what `nn.Embedding` and `cross_entropy` take without a cast).
    I64,
}

impl IdDtype {
    /// Whether `id` can be stored in this dtype.
    pub fn fits(self, id: i64) -> bool {
        match self {
            IdDtype::I32 => i32::try_from(id).is_ok(),
            IdDtype::I64 => true,
        }
    }

    /// Size of one element in bytes.
    pub fn size(self) -> usize {
        match self {
            IdDtype::I32 => 4,
            IdDtype::I64 => 8,
        }
    }
}

crate::names::named_enum!(IdDtype as "id_dtype" {
    I32 = "i32",
    I64 = "i64",
});

/// Everything that decides the tensors a batch collates to, apart from the tokens themselves.
///
/// ```
/// use sft_collate::{CollateSpec, IdDtype, LabelFormat, Truncation};
/// let spec = CollateSpec {
///     pad_id: Some(151643),
///     max_len: Some(2048),
///     truncation: Truncation::PromptLeft,
///     pad_to_multiple_of: Some(64),
///     label_format: LabelFormat::IGNORE_INDEX,
///     id_dtype: IdDtype::I64,
///     attention_mask: false,
/// };
/// spec.validate().unwrap();
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct CollateSpec {
    /// The pad id. `None`: the tokenizer's configured pad token, else its `<|endoftext|>`, else
    /// [`Error::NoPadToken`]. Never a silent 0.
    pub pad_id: Option<u32>,
    /// The longest sequence (prompt + output tokens) allowed; the tensors are then at most
    /// `max_len - 1` wide (before `pad_to_multiple_of`).
    pub max_len: Option<usize>,
    /// What happens to a sequence longer than `max_len`.
    pub truncation: Truncation,
    /// Round the tensors' width (`L - 1`) up to a multiple of this. A width that is already a multiple
    /// stays as it is, and a width of 0 stays 0.
    pub pad_to_multiple_of: Option<usize>,
    /// How labels are written where the mask is false.
    pub label_format: LabelFormat,
    /// The integer type of `input_ids` and `labels`.
    pub id_dtype: IdDtype,
    /// Also produce `attention_mask` (true where `input_ids` holds a real token, false on padding).
    pub attention_mask: bool,
}

impl CollateSpec {
    /// Refuse options that make no sense: `max_len` or `pad_to_multiple_of` of 0, an ignore index that does
    /// not fit the id dtype.
    pub fn validate(&self) -> Result<()> {
        if self.max_len == Some(0) {
            return Err(Error::InvalidOption {
                name: "max_len",
                reason: "must be at least 1".into(),
            });
        }
        if self.pad_to_multiple_of == Some(0) {
            return Err(Error::InvalidOption {
                name: "pad_to_multiple_of",
                reason: "must be at least 1".into(),
            });
        }
        if let LabelFormat::IgnoreIndex(v) = self.label_format {
            if !self.id_dtype.fits(v) {
                return Err(Error::IdOverflow {
                    id: v,
                    dtype: self.id_dtype.name(),
                });
            }
        }
        Ok(())
    }

    /// The tensors' width for a batch whose longest sequence has `max_seq_len` tokens.
    pub fn width_for(&self, max_seq_len: usize) -> usize {
        let width = max_seq_len.saturating_sub(1);
        match self.pad_to_multiple_of {
            Some(m) if m > 1 => width.div_ceil(m) * m,
            _ => width,
        }
    }

    /// The length limit (`max_len` and its truncation policy) rows are cut to before collation.
    pub fn limit(&self) -> LengthLimit {
        LengthLimit {
            max_len: self.max_len,
            truncation: self.truncation,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn width_rounds_up_but_never_adds_a_block() {
        let mut s = CollateSpec {
            pad_to_multiple_of: Some(8),
            ..Default::default()
        };
        assert_eq!(s.width_for(0), 0);
        assert_eq!(s.width_for(1), 0);
        assert_eq!(s.width_for(9), 8);
        assert_eq!(s.width_for(10), 16);
        s.pad_to_multiple_of = None;
        assert_eq!(s.width_for(10), 9);
    }
}
