//! Added tokens (`<|im_start|>`, ...): found in the text with Aho-Corasick, leftmost-longest, as
//! `tokenizers` does, and cut out before anything else sees the text.

use aho_corasick::{AhoCorasick, Input, MatchKind};
use memchr::memmem;

/// A set of added tokens and their ids.
pub(super) struct AddedSet {
    automaton: AhoCorasick,
    ids: Vec<u32>,
    /// The bytes every token starts with (`<|` for Qwen's and Llama 3's), when there are any: no match
    /// starts elsewhere, so the text is searched for them first (a `memmem` over SIMD blocks), and the
    /// automaton runs only where they occur. Texts with many `<` (GSM8K's `<<48/2=24>>`) otherwise keep
    /// stopping the automaton's one-byte prefilter.
    prefix: Option<memmem::Finder<'static>>,
}

impl AddedSet {
    /// `None` for an empty set.
    pub(super) fn new(tokens: Vec<(String, u32)>) -> Result<Option<AddedSet>, String> {
        if tokens.is_empty() {
            return Ok(None);
        }
        let automaton = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(tokens.iter().map(|(c, _)| c.as_str()))
            .map_err(|e| e.to_string())?;
        let first = tokens[0].0.as_bytes();
        let common = tokens.iter().fold(first.len(), |n, (t, _)| {
            n.min(
                first
                    .iter()
                    .zip(t.as_bytes())
                    .take_while(|(a, b)| a == b)
                    .count(),
            )
        });
        // One byte is what the automaton's own prefilter already looks for.
        let prefix = (common >= 2).then(|| memmem::Finder::new(&first[..common]).into_owned());
        Ok(Some(AddedSet {
            automaton,
            ids: tokens.into_iter().map(|(_, id)| id).collect(),
            prefix,
        }))
    }
}

/// A piece of text cut at added tokens.
pub(super) enum Piece<'t> {
    Added(u32),
    Text(&'t str),
}

/// `text` cut at the added tokens of `set` (leftmost-longest), in order. An empty text is one empty piece.
pub(super) fn split_added<'t>(text: &'t str, set: Option<&AddedSet>, mut f: impl FnMut(Piece<'t>)) {
    let Some(set) = set else {
        f(Piece::Text(text));
        return;
    };
    let mut last = 0;
    loop {
        // The leftmost-longest match in `text[last..]`: the automaton from the prefix's first occurrence
        // on (none starts before it), the same match `find_iter` gives.
        let from = match &set.prefix {
            Some(prefix) => match prefix.find(&text.as_bytes()[last..]) {
                Some(at) => last + at,
                None => break,
            },
            None => last,
        };
        let Some(m) = set.automaton.find(Input::new(text).range(from..)) else {
            break;
        };
        if m.start() > last {
            f(Piece::Text(&text[last..m.start()]));
        }
        f(Piece::Added(set.ids[m.pattern().as_usize()]));
        last = m.end();
    }
    if last < text.len() || text.is_empty() {
        f(Piece::Text(&text[last..]));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(text: &str, set: &AddedSet) -> Vec<Result<u32, String>> {
        let mut out = vec![];
        split_added(text, Some(set), |p| {
            out.push(match p {
                Piece::Added(id) => Ok(id),
                Piece::Text(t) => Err(t.to_string()),
            })
        });
        out
    }

    /// With a shared prefix (searched first) and without one (the automaton alone), the pieces are the
    /// automaton's leftmost-longest matches and the text between them, on texts full of near-misses.
    #[test]
    fn prefix_search_finds_what_the_automaton_finds() {
        let sets = [
            vec!["<|a|>", "<|ab|>", "<|b", "<|"],
            vec!["<|a|>", "<|ab|>", "<|b"],
            vec!["<|a|>", "b|>", "<"],
        ];
        let mut state = 0x9E37_79B9u64;
        for tokens in sets {
            let set = AddedSet::new(
                tokens
                    .iter()
                    .enumerate()
                    .map(|(i, t)| (t.to_string(), i as u32))
                    .collect(),
            )
            .unwrap()
            .unwrap();
            assert_eq!(
                set.prefix.is_some(),
                tokens[0].starts_with("<|") && tokens.iter().all(|t| t.starts_with("<|"))
            );
            for _ in 0..2000 {
                let n = (state % 12) as usize;
                let text: String = (0..n)
                    .map(|_| {
                        state = state
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        ['<', '|', 'a', 'b', '>', 'é'][(state >> 33) as usize % 6]
                    })
                    .collect();
                let mut want = vec![];
                let mut last = 0;
                for m in set.automaton.find_iter(&text) {
                    if m.start() > last {
                        want.push(Err(text[last..m.start()].to_string()));
                    }
                    want.push(Ok(m.pattern().as_u32()));
                    last = m.end();
                }
                if last < text.len() || text.is_empty() {
                    want.push(Err(text[last..].to_string()));
                }
                assert_eq!(pieces(&text, &set), want, "{text:?} with {tokens:?}");
                state = state.wrapping_add(0x632B_E59B_D9B4_E019);
            }
        }
    }
}
