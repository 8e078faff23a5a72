//! Added tokens (`<|im_start|>`, ...): found in the text with Aho-Corasick, leftmost-longest, as
//! `tokenizers` does, and cut out before anything else sees the text.

use aho_corasick::{AhoCorasick, MatchKind};

/// A set of added tokens and their ids.
pub(super) struct AddedSet {
    automaton: AhoCorasick,
    ids: Vec<u32>,
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
        Ok(Some(AddedSet {
            automaton,
            ids: tokens.into_iter().map(|(_, id)| id).collect(),
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
    for m in set.automaton.find_iter(text) {
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
