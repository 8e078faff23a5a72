//! The length limit rows are cut to: `max_len` and what to do past it ([`Truncation`]), for (prompt,
//! output) pairs and for rows of segments.

use crate::error::Location;
use crate::{Error, Result};

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

crate::names::named_enum!(Truncation as "truncation" {
    Error = "error",
    PromptLeft = "prompt-left",
    OutputRight = "output-right",
});

/// `max_len` (prompt + output tokens) and the policy past it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LengthLimit {
    pub max_len: Option<usize>,
    pub truncation: Truncation,
}

impl LengthLimit {
    /// Refuse a `max_len` of 0.
    pub fn validate(&self) -> Result<()> {
        if self.max_len == Some(0) {
            return Err(Error::InvalidOption {
                name: "max_len",
                reason: "must be at least 1".into(),
            });
        }
        Ok(())
    }

    /// Apply `max_len` and the truncation policy to one (prompt, output) pair of token lists. `row` only
    /// names the row in an error.
    pub fn truncate_pair<'a>(
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

    /// Apply `max_len` to a multi-segment row: `Error` refuses it, `PromptLeft` drops tokens from the
    /// start (the oldest turns of a conversation go first), `OutputRight` drops tokens from the end.
    /// Returns the segments that remain (empty ones dropped). `row` only names the row in an error.
    pub fn truncate_segments<S: AsRef<[u32]>>(
        &self,
        row: usize,
        segments: &[(S, bool)],
    ) -> Result<Vec<(Vec<u32>, bool)>> {
        let len: usize = segments.iter().map(|(t, _)| t.as_ref().len()).sum();
        let Some(max_len) = self.max_len.filter(|&m| len > m) else {
            return Ok(segments
                .iter()
                .map(|(t, f)| (t.as_ref().to_vec(), *f))
                .collect());
        };
        let (mut skip, keep) = match self.truncation {
            Truncation::Error => {
                let leading: usize = segments
                    .iter()
                    .take_while(|(_, t)| !t)
                    .map(|(s, _)| s.as_ref().len())
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
            let tokens = tokens.as_ref();
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

    fn spec(max_len: usize, truncation: Truncation) -> LengthLimit {
        LengthLimit {
            max_len: Some(max_len),
            truncation,
        }
    }

    #[test]
    fn prompt_left_keeps_the_end_of_the_prompt_then_cuts_the_output() {
        let s = spec(4, Truncation::PromptLeft);
        assert_eq!(
            s.truncate_pair(0, &[1, 2, 3], &[4, 5]).unwrap(),
            (&[2, 3][..], &[4, 5][..])
        );
        assert_eq!(
            s.truncate_pair(0, &[1, 2], &[3, 4, 5, 6, 7]).unwrap(),
            (&[][..], &[3, 4, 5, 6][..])
        );
    }

    #[test]
    fn output_right_cuts_the_output_then_the_start_of_the_prompt() {
        let s = spec(4, Truncation::OutputRight);
        assert_eq!(
            s.truncate_pair(0, &[1, 2, 3], &[4, 5]).unwrap(),
            (&[1, 2, 3][..], &[4][..])
        );
        assert_eq!(
            s.truncate_pair(0, &[1, 2, 3, 4, 5], &[6]).unwrap(),
            (&[2, 3, 4, 5][..], &[][..])
        );
    }

    #[test]
    fn error_policy_names_the_row() {
        let err = spec(2, Truncation::Error)
            .truncate_pair(7, &[1, 2], &[3])
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
}
