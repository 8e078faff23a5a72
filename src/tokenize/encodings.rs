//! [`Encodings`]: the ids of a batch of texts in one buffer, and where each text's ids start (Arrow's
//! list layout; the `cu_seqlens` of the texts packed end to end).

/// The ids of a batch of texts in one buffer: text `i`'s ids are `ids()[offsets()[i]..offsets()[i + 1]]`.
/// What [`crate::Tokenizer::encode_batch_flat`] gives: one allocation for a whole batch rather than a
/// vector per text.
///
/// ```
/// let tokenizer = sft_collate::Tokenizer::builtin("o200k_base")?;
/// let encodings = tokenizer.encode_batch_flat(&["Hello, world!", "", "2 + 2 = 4"])?;
/// assert_eq!(encodings.len(), 3);
/// assert_eq!(encodings.get(0), Some(&tokenizer.encode("Hello, world!")?[..]));
/// assert_eq!(encodings.get(1), Some(&[][..]));
/// assert_eq!(encodings.offsets().len(), 4);
/// # Ok::<(), sft_collate::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Encodings {
    ids: Vec<u32>,
    /// `0`, then the end of each text's ids.
    offsets: Vec<usize>,
}

impl Default for Encodings {
    fn default() -> Self {
        Encodings {
            ids: Vec::new(),
            offsets: vec![0],
        }
    }
}

impl Encodings {
    /// From the ids of each text, one after the other, and their offsets: `0`, then where each text's
    /// ids end.
    pub(crate) fn from_offsets(ids: Vec<u32>, offsets: Vec<usize>) -> Encodings {
        debug_assert_eq!(offsets.first(), Some(&0));
        debug_assert!(offsets.windows(2).all(|w| w[0] <= w[1]));
        debug_assert_eq!(offsets.last(), Some(&ids.len()));
        Encodings { ids, offsets }
    }

    /// Join parts encoded apart (one per thread), in order.
    pub(crate) fn concat(mut parts: Vec<Encodings>) -> Encodings {
        if parts.len() == 1 {
            return parts.pop().expect("one part");
        }
        let ids_len = parts.iter().map(|p| p.ids.len()).sum();
        let texts = parts.iter().map(Encodings::len).sum::<usize>();
        let mut all = Encodings {
            ids: Vec::with_capacity(ids_len),
            offsets: Vec::with_capacity(texts + 1),
        };
        all.offsets.push(0);
        for part in parts {
            let base = all.ids.len();
            all.ids.extend_from_slice(&part.ids);
            all.offsets
                .extend(part.offsets[1..].iter().map(|&end| base + end));
        }
        all
    }

    /// The number of texts.
    pub fn len(&self) -> usize {
        self.offsets.len() - 1
    }

    /// Whether there are no texts.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Text `i`'s ids, `None` past the last text.
    pub fn get(&self, i: usize) -> Option<&[u32]> {
        let (&from, &to) = (self.offsets.get(i)?, self.offsets.get(i + 1)?);
        Some(&self.ids[from..to])
    }

    /// Each text's ids, in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &[u32]> + '_ {
        self.offsets.windows(2).map(|w| &self.ids[w[0]..w[1]])
    }

    /// Every text's ids, one after the other.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Where each text's ids start, then the end of the last: `len() + 1` of them, from 0.
    pub fn offsets(&self) -> &[usize] {
        &self.offsets
    }

    /// The ids and the offsets, owned.
    pub fn into_parts(self) -> (Vec<u32>, Vec<usize>) {
        (self.ids, self.offsets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_join_in_order() {
        let a = Encodings::from_offsets(vec![1, 2, 3], vec![0, 2, 2, 3]);
        let b = Encodings::default();
        let c = Encodings::from_offsets(vec![4, 5], vec![0, 0, 2]);
        let all = Encodings::concat(vec![a, b, c]);
        let texts: Vec<&[u32]> = all.iter().collect();
        assert_eq!(texts, [&[1, 2][..], &[], &[3], &[], &[4, 5]]);
        assert_eq!(all.offsets(), [0, 2, 2, 3, 3, 5]);
        assert_eq!(all.get(4), Some(&[4, 5][..]));
        assert_eq!(all.get(5), None);
        assert_eq!(Encodings::concat(vec![]), Encodings::default());
        assert!(Encodings::default().is_empty());
    }
}
