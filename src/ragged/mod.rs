//! [`RaggedBatch`]: the tokens of a batch, row after row with no padding, plus where each row starts and
//! which of its tokens are trained on (a prompt length, or per-token flags for multi-segment rows). This
//! is what travels from the tokenizer to a backend (and, for the GPU, the only thing copied to the
//! device): its size is the number of real tokens, not `rows × width`.

mod limit;

pub use limit::{LengthLimit, Truncation};

use crate::{Error, Result};

/// A row as owned segments: tokens and whether they are trainable.
pub type OwnedSegments = Vec<(Vec<u32>, bool)>;

/// The ragged form of a batch: `tokens[row_offsets[i]..row_offsets[i + 1]]` is row `i`, whose first
/// `prompt_lens[i]` tokens are prompt (not trained on) and whose remaining tokens are output.
///
/// A row may instead be a list of segments, each trainable or not (a conversation whose assistant turns
/// are trained): then the batch carries one `trainable` flag per token (0 or 1), and a label is trained
/// exactly when its token is flagged. `prompt_lens[i]` is then the length of the row's leading untrainable
/// run. Without flags, token `k` of row `i` is trainable when `k >= prompt_lens[i]`.
///
/// The fields are private so that every `RaggedBatch` a backend sees has passed [`RaggedBatch::validate`]
/// (or was built by the methods here, which keep it valid).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RaggedBatch {
    tokens: Vec<u32>,
    row_offsets: Vec<u64>,
    prompt_lens: Vec<u32>,
    trainable: Option<Vec<u8>>,
}

impl RaggedBatch {
    /// An empty batch (0 rows).
    pub fn new() -> Self {
        RaggedBatch {
            tokens: Vec::new(),
            row_offsets: vec![0],
            prompt_lens: Vec::new(),
            trainable: None,
        }
    }

    /// An empty batch with room for `rows` rows and `tokens` tokens.
    pub fn with_capacity(rows: usize, tokens: usize) -> Self {
        let mut row_offsets = Vec::with_capacity(rows + 1);
        row_offsets.push(0);
        RaggedBatch {
            tokens: Vec::with_capacity(tokens),
            row_offsets,
            prompt_lens: Vec::with_capacity(rows),
            trainable: None,
        }
    }

    /// Build from raw parts, checking them (see [`RaggedBatch::validate`]).
    pub fn from_parts(
        tokens: Vec<u32>,
        row_offsets: Vec<u64>,
        prompt_lens: Vec<u32>,
    ) -> Result<Self> {
        let batch = RaggedBatch {
            tokens,
            row_offsets,
            prompt_lens,
            trainable: None,
        };
        batch.validate()?;
        Ok(batch)
    }

    /// Build from raw parts with per-token trainable flags (0 or 1, one per token), checking them.
    pub fn from_parts_with_trainable(
        tokens: Vec<u32>,
        row_offsets: Vec<u64>,
        prompt_lens: Vec<u32>,
        trainable: Vec<u8>,
    ) -> Result<Self> {
        let batch = RaggedBatch {
            tokens,
            row_offsets,
            prompt_lens,
            trainable: Some(trainable),
        };
        batch.validate()?;
        Ok(batch)
    }

    /// Pack rows given as segments (tokens, trainable).
    pub fn from_segments<'a, R>(rows: impl IntoIterator<Item = R>) -> Self
    where
        R: AsRef<[(&'a [u32], bool)]>,
    {
        let mut batch = RaggedBatch::new();
        for row in rows {
            batch.push_segments(row.as_ref());
        }
        batch
    }

    /// Pack (prompt ids, output ids) pairs as they are, with no length limit.
    pub fn from_pairs<P, O>(pairs: impl IntoIterator<Item = (P, O)>) -> Self
    where
        P: AsRef<[u32]>,
        O: AsRef<[u32]>,
    {
        let mut batch = RaggedBatch::new();
        for (prompt, output) in pairs {
            batch.push_row(prompt.as_ref(), output.as_ref());
        }
        batch
    }

    /// Pack pairs after applying `limit` (`max_len` and its truncation policy).
    pub fn from_pairs_truncated<P, O>(
        pairs: impl IntoIterator<Item = (P, O)>,
        limit: LengthLimit,
    ) -> Result<Self>
    where
        P: AsRef<[u32]>,
        O: AsRef<[u32]>,
    {
        let mut batch = RaggedBatch::new();
        for (row, (prompt, output)) in pairs.into_iter().enumerate() {
            let (prompt, output) = limit.truncate_pair(row, prompt.as_ref(), output.as_ref())?;
            batch.push_row(prompt, output);
        }
        Ok(batch)
    }

    /// Append one row.
    ///
    /// # Panics
    /// If the prompt has more than `u32::MAX` tokens (4 billion; no tokenizer output comes near).
    pub fn push_row(&mut self, prompt: &[u32], output: &[u32]) {
        let prompt_len = u32::try_from(prompt.len()).expect("a prompt of over 4G tokens");
        self.tokens.extend_from_slice(prompt);
        self.tokens.extend_from_slice(output);
        self.row_offsets.push(self.tokens.len() as u64);
        self.prompt_lens.push(prompt_len);
        if let Some(flags) = &mut self.trainable {
            flags.extend(std::iter::repeat_n(0, prompt.len()));
            flags.extend(std::iter::repeat_n(1, output.len()));
        }
    }

    /// Append one row made of segments, each trainable or not. Segments are concatenated as they are:
    /// tokenize each separately so that no BPE merge crosses a boundary. An (untrainable, trainable) pair
    /// is stored as a prompt length, without per-token flags.
    ///
    /// # Panics
    /// If the leading untrainable run has more than `u32::MAX` tokens.
    pub fn push_segments(&mut self, segments: &[(&[u32], bool)]) {
        // A (prompt, output) pair needs no flags: its prompt length says it all.
        if let [(prompt, false), (output, true)] = segments {
            self.push_row(prompt, output);
            return;
        }
        self.push_flagged(segments);
    }

    /// Append a row of segments with per-token flags, whatever their pattern (a conversation stays one,
    /// however its segments are split: text and a store's run-merged flags give the same row).
    fn push_flagged(&mut self, segments: &[(&[u32], bool)]) {
        if self.trainable.is_none() {
            // From now on every row carries flags: the prompt-length rows so far get theirs.
            let flags = (0..self.rows())
                .flat_map(|i| {
                    let p = self.prompt_lens[i] as usize;
                    (0..self.row_len(i)).map(move |k| u8::from(k >= p))
                })
                .collect();
            self.trainable = Some(flags);
        }
        let leading = segments
            .iter()
            .take_while(|(_, trained)| !trained)
            .map(|(t, _)| t.len())
            .sum::<usize>();
        let flags = self.trainable.as_mut().expect("set above");
        for (tokens, trained) in segments {
            self.tokens.extend_from_slice(tokens);
            flags.extend(std::iter::repeat_n(u8::from(*trained), tokens.len()));
        }
        self.row_offsets.push(self.tokens.len() as u64);
        self.prompt_lens
            .push(u32::try_from(leading).expect("a prompt of over 4G tokens"));
    }

    /// Append one row given as tokenized segments, cut to `limit` first: a row of exactly one untrainable
    /// then one trainable segment is a (prompt, output) pair (cut by the pair policy,
    /// [`LengthLimit::truncate_pair`]); any other row by [`LengthLimit::truncate_segments`]. `row` names
    /// the row in an error. This is the one rule by which tokenized text becomes rows, whether it was
    /// just tokenized or read back from a token store.
    pub fn push_limited<S: AsRef<[u32]>>(
        &mut self,
        row: usize,
        segments: &[(S, bool)],
        limit: &LengthLimit,
    ) -> Result<()> {
        match segments {
            [(prompt, false), (output, true)] => {
                let (prompt, output) =
                    limit.truncate_pair(row, prompt.as_ref(), output.as_ref())?;
                self.push_row(prompt, output);
                Ok(())
            }
            _ => self.push_segments_limited(row, segments, limit),
        }
    }

    /// Append a row of segments cut by the segments' policy ([`LengthLimit::truncate_segments`]),
    /// whatever their pattern: how a conversation's tokens are cut (even one whose flags form a single
    /// untrained then trained run).
    pub fn push_segments_limited<S: AsRef<[u32]>>(
        &mut self,
        row: usize,
        segments: &[(S, bool)],
        limit: &LengthLimit,
    ) -> Result<()> {
        let kept = limit.truncate_segments(row, segments)?;
        let refs: Vec<(&[u32], bool)> = kept.iter().map(|(t, f)| (t.as_slice(), *f)).collect();
        self.push_flagged(&refs);
        Ok(())
    }

    /// Per-token trainable flags, when rows were given as segments.
    pub fn trainable(&self) -> Option<&[u8]> {
        self.trainable.as_deref()
    }

    /// Which tokens of row `i` are trained on, as a predicate over positions in the row (looked up once per
    /// row, for loops over its positions).
    pub fn trainable_in_row(&self, i: usize) -> impl Fn(usize) -> bool + '_ {
        let start = self.row_offsets[i] as usize;
        let flags = self
            .trainable
            .as_deref()
            .map(|f| &f[start..start + self.row_len(i)]);
        let prompt_len = self.prompt_lens[i] as usize;
        move |k| flags.map_or(k >= prompt_len, |f| f[k] != 0)
    }

    /// Whether token `k` of row `i` is trained on (as a label).
    pub fn is_trainable(&self, i: usize, k: usize) -> bool {
        match &self.trainable {
            Some(flags) => flags[self.row_offsets[i] as usize + k] != 0,
            None => k >= self.prompt_lens[i] as usize,
        }
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.prompt_lens.len()
    }

    /// Whether there are no rows.
    pub fn is_empty(&self) -> bool {
        self.prompt_lens.is_empty()
    }

    /// All tokens, row after row.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// `rows + 1` offsets into [`RaggedBatch::tokens`]; row `i` is `row_offsets[i]..row_offsets[i + 1]`.
    pub fn row_offsets(&self) -> &[u64] {
        &self.row_offsets
    }

    /// How many tokens at the start of each row are prompt.
    pub fn prompt_lens(&self) -> &[u32] {
        &self.prompt_lens
    }

    /// The tokens of row `i`.
    pub fn row(&self, i: usize) -> &[u32] {
        &self.tokens[self.row_offsets[i] as usize..self.row_offsets[i + 1] as usize]
    }

    /// Length (prompt + output tokens) of row `i`.
    pub fn row_len(&self, i: usize) -> usize {
        (self.row_offsets[i + 1] - self.row_offsets[i]) as usize
    }

    /// The longest row's length (0 for an empty batch).
    pub fn max_row_len(&self) -> usize {
        (0..self.rows()).map(|i| self.row_len(i)).max().unwrap_or(0)
    }

    /// A new batch of the given rows of this one, in the given order (prompt boundaries kept).
    ///
    /// # Panics
    /// If an index is out of range.
    pub fn select(&self, rows: &[usize]) -> RaggedBatch {
        let tokens = rows.iter().map(|&i| self.row_len(i)).sum();
        let mut out = RaggedBatch::with_capacity(rows.len(), tokens);
        for &i in rows {
            match &self.trainable {
                None => {
                    let (prompt, output) = self.row(i).split_at(self.prompt_lens[i] as usize);
                    out.push_row(prompt, output);
                }
                Some(_) => out.push_segments(&self.row_segments(i)),
            }
        }
        out
    }

    /// Row `i` as (prompt tokens, output tokens): the leading untrainable run and the rest (exact for
    /// two-segment rows).
    pub fn row_parts(&self, i: usize) -> (&[u32], &[u32]) {
        self.row(i).split_at(self.prompt_lens[i] as usize)
    }

    /// Row `i` as its maximal runs of trainable and untrainable tokens.
    pub fn row_segments(&self, i: usize) -> Vec<(&[u32], bool)> {
        let row = self.row(i);
        let mut segments: Vec<(&[u32], bool)> = Vec::new();
        let mut start = 0;
        for k in 1..=row.len() {
            if k == row.len() || self.is_trainable(i, k) != self.is_trainable(i, start) {
                segments.push((&row[start..k], self.is_trainable(i, start)));
                start = k;
            }
        }
        segments
    }

    /// Check the invariants every backend relies on, so that a corrupted batch is a typed error and never
    /// an out-of-bounds access: `rows + 1` offsets starting at 0, non-decreasing, ending at the token
    /// count, and each prompt no longer than its row.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::InvalidBatch(msg));
        if self.row_offsets.len() != self.prompt_lens.len() + 1 {
            return bad(format!(
                "{} row offsets for {} rows (want rows + 1)",
                self.row_offsets.len(),
                self.prompt_lens.len()
            ));
        }
        if self.row_offsets[0] != 0 {
            return bad(format!(
                "first row offset is {}, not 0",
                self.row_offsets[0]
            ));
        }
        let last = *self.row_offsets.last().expect("at least one offset");
        if last != self.tokens.len() as u64 {
            return bad(format!(
                "last row offset {last} != token count {}",
                self.tokens.len()
            ));
        }
        for (i, w) in self.row_offsets.windows(2).enumerate() {
            if w[1] < w[0] {
                return bad(format!(
                    "row offsets decrease at row {i}: {} > {}",
                    w[0], w[1]
                ));
            }
            if u64::from(self.prompt_lens[i]) > w[1] - w[0] {
                return bad(format!(
                    "row {i}: prompt_len {} > row length {}",
                    self.prompt_lens[i],
                    w[1] - w[0]
                ));
            }
        }
        if let Some(flags) = &self.trainable {
            if flags.len() != self.tokens.len() {
                return bad(format!(
                    "{} trainable flags for {} tokens",
                    flags.len(),
                    self.tokens.len()
                ));
            }
            if let Some(at) = flags.iter().position(|&f| f > 1) {
                return bad(format!(
                    "trainable flag {} at token {at} is not 0 or 1",
                    flags[at]
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_catches_every_inconsistency() {
        assert!(RaggedBatch::from_parts(vec![1, 2], vec![0, 2], vec![1]).is_ok());
        assert!(RaggedBatch::from_parts(vec![], vec![0], vec![]).is_ok());
        for (tokens, offsets, prompts) in [
            (vec![1, 2], vec![0, 2], vec![]),              // offsets vs rows
            (vec![1, 2], vec![1, 2], vec![0]),             // not starting at 0
            (vec![1, 2], vec![0, 1], vec![0]),             // not ending at the token count
            (vec![1, 2], vec![0, 2, 1, 2], vec![0, 0, 0]), // decreasing
            (vec![1, 2], vec![0, 2], vec![3]),             // prompt longer than the row
            (vec![], vec![], vec![]),                      // no offsets at all
        ] {
            assert!(
                matches!(
                    RaggedBatch::from_parts(tokens.clone(), offsets.clone(), prompts.clone()),
                    Err(Error::InvalidBatch(_))
                ),
                "{tokens:?} {offsets:?} {prompts:?}"
            );
        }
    }
}
