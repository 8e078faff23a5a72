//! What a collation should produce: [`CollateSpec`] and the small option types it is made of.
//! Names follow the Hugging Face vocabulary (`pad_to_multiple_of`, `ignore_index`, `max_len`).

use crate::error::Location;
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

/// What to do with a sequence longer than `max_len`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Truncation {
    /// Refuse it with [`Error::SequenceTooLong`].
    #[default]
    Error,
    /// Drop tokens from the start of the prompt (the end of the prompt, next to the response, is kept);
    /// when the prompt is gone and the sequence is still too long, cut the output at its end.
    PromptLeft,
    /// Cut the output at its end; when the prompt alone is still too long, drop tokens from the start of
    /// the prompt as [`Truncation::PromptLeft`] does.
    OutputRight,
}

crate::names::named_enum!(Truncation {
    Error = "error",
    PromptLeft = "prompt-left",
    OutputRight = "output-right",
});

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

crate::names::named_enum!(IdDtype {
    I32 = "i32",
    I64 = "i64",
});

/// Everything that decides the tensors a batch collates to, apart from the tokens themselves.
///
/// ```
/// use sft_collate::collate::{CollateSpec, IdDtype, LabelFormat, Truncation};
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
                    dtype: self.id_dtype,
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

    /// Apply `max_len` and the truncation policy to one (prompt, output) pair of token lists. `row` only
    /// names the row in an error.
    pub fn truncate<'a>(
        &self,
        row: usize,
        prompt: &'a [u32],
        output: &'a [u32],
    ) -> Result<(&'a [u32], &'a [u32])> {
        let Some(max_len) = self.max_len else {
            return Ok((prompt, output));
        };
        let len = prompt.len() + output.len();
        if len <= max_len {
            return Ok((prompt, output));
        }
        match self.truncation {
            Truncation::Error => Err(Error::SequenceTooLong {
                len,
                prompt_len: prompt.len(),
                output_len: output.len(),
                max_len,
                limit: "max_len",
            }
            .at(Location::Row(row))),
            Truncation::PromptLeft => {
                let keep_prompt = max_len.saturating_sub(output.len()).min(prompt.len());
                let prompt = &prompt[prompt.len() - keep_prompt..];
                let keep_output = max_len - prompt.len();
                Ok((prompt, &output[..keep_output.min(output.len())]))
            }
            Truncation::OutputRight => {
                let keep_prompt = prompt.len().min(max_len);
                let prompt = &prompt[prompt.len() - keep_prompt..];
                let keep_output = (max_len - prompt.len()).min(output.len());
                Ok((prompt, &output[..keep_output]))
            }
        }
    }
}

impl CollateSpec {
    /// Apply `max_len` to a multi-segment row: `Error` refuses it, `PromptLeft` drops tokens from the
    /// start (the oldest turns of a conversation go first), `OutputRight` drops tokens from the end.
    /// Returns the segments that remain (empty ones dropped). `row` only names the row in an error.
    pub fn truncate_segments(
        &self,
        row: usize,
        segments: &[(Vec<u32>, bool)],
    ) -> Result<Vec<(Vec<u32>, bool)>> {
        let len: usize = segments.iter().map(|(t, _)| t.len()).sum();
        let Some(max_len) = self.max_len.filter(|&m| len > m) else {
            return Ok(segments.to_vec());
        };
        let (mut skip, keep) = match self.truncation {
            Truncation::Error => {
                let leading: usize = segments
                    .iter()
                    .take_while(|(_, t)| !t)
                    .map(|(s, _)| s.len())
                    .sum();
                return Err(Error::SequenceTooLong {
                    len,
                    prompt_len: leading,
                    output_len: len - leading,
                    max_len,
                    limit: "max_len",
                }
                .at(Location::Row(row)));
            }
            Truncation::PromptLeft => (len - max_len, max_len),
            Truncation::OutputRight => (0, max_len),
        };
        let mut left = keep;
        let mut out = Vec::new();
        for (tokens, trained) in segments {
            let from = skip.min(tokens.len());
            skip -= from;
            let take = (tokens.len() - from).min(left);
            left -= take;
            if take > 0 {
                out.push((tokens[from..from + take].to_vec(), *trained));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(max_len: usize, truncation: Truncation) -> CollateSpec {
        CollateSpec {
            max_len: Some(max_len),
            truncation,
            ..Default::default()
        }
    }

    #[test]
    fn prompt_left_keeps_the_end_of_the_prompt_then_cuts_the_output() {
        let s = spec(4, Truncation::PromptLeft);
        assert_eq!(
            s.truncate(0, &[1, 2, 3], &[4, 5]).unwrap(),
            (&[2, 3][..], &[4, 5][..])
        );
        assert_eq!(
            s.truncate(0, &[1, 2], &[3, 4, 5, 6, 7]).unwrap(),
            (&[][..], &[3, 4, 5, 6][..])
        );
    }

    #[test]
    fn output_right_cuts_the_output_then_the_start_of_the_prompt() {
        let s = spec(4, Truncation::OutputRight);
        assert_eq!(
            s.truncate(0, &[1, 2, 3], &[4, 5]).unwrap(),
            (&[1, 2, 3][..], &[4][..])
        );
        assert_eq!(
            s.truncate(0, &[1, 2, 3, 4, 5], &[6]).unwrap(),
            (&[2, 3, 4, 5][..], &[][..])
        );
    }

    #[test]
    fn error_policy_names_the_row() {
        let err = spec(2, Truncation::Error)
            .truncate(7, &[1, 2], &[3])
            .unwrap_err();
        let Error::At {
            at: Location::Row(7),
            source,
        } = err
        else {
            panic!("{err:?}")
        };
        assert!(matches!(
            *source,
            Error::SequenceTooLong {
                len: 3,
                max_len: 2,
                ..
            }
        ));
    }

    #[test]
    fn segments_truncate_from_either_end() {
        let segments = vec![(vec![1, 2], false), (vec![3, 4], true), (vec![5], false)];
        let left = spec(3, Truncation::PromptLeft)
            .truncate_segments(0, &segments)
            .unwrap();
        assert_eq!(left, vec![(vec![3, 4], true), (vec![5], false)]);
        let right = spec(3, Truncation::OutputRight)
            .truncate_segments(0, &segments)
            .unwrap();
        assert_eq!(right, vec![(vec![1, 2], false), (vec![3], true)]);
        assert!(spec(3, Truncation::Error)
            .truncate_segments(0, &segments)
            .is_err());
        assert_eq!(
            spec(9, Truncation::Error)
                .truncate_segments(0, &segments)
                .unwrap(),
            segments
        );
    }

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
