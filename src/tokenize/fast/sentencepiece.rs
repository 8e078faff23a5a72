//! SentencePiece-style BPE as `transformers`' converters write it (Llama 2, Mistral 7B, TinyLlama, Gemma):
//! spaces become `▁` (a `Replace` normalizer, or the `Metaspace` pre-tokenizer), a `▁` goes in front of
//! the text (a `Prepend` normalizer, or Metaspace's `prepend_scheme`), and the BPE merges characters,
//! with `<0xNN>` byte tokens for characters the vocabulary lacks (see [`super::bpe::Alphabet`]).
//!
//! Without a pre-tokenizer that splits, the whole text is one word for `tokenizers`. The fast engine cuts
//! it into the words the vocabulary's merges can never join — before each `▁` that follows another
//! character, when no merge joins a token ending in something else to one starting with `▁` (checked
//! when the file loads) — so that the words repeat and hit the cache; the ids are the same.

use std::borrow::Cow;

/// The character SentencePiece writes for a space.
pub(crate) const SPACE: char = '▁';

/// When Metaspace puts its replacement in front of a piece.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum PrependScheme {
    Always,
    /// Only the piece that starts the input.
    First,
    Never,
}

/// The `Metaspace` pre-tokenizer.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Metaspace {
    pub replacement: char,
    pub prepend: PrependScheme,
    /// Split before every replacement character.
    pub split: bool,
}

impl Metaspace {
    /// From its `tokenizer.json` object (`tokenizers`' defaults: `always`, `split`).
    pub(crate) fn parse(step: &serde_json::Value) -> Result<Metaspace, String> {
        let replacement = step
            .get("replacement")
            .and_then(|r| r.as_str())
            .and_then(|r| {
                let mut chars = r.chars();
                chars.next().filter(|_| chars.next().is_none())
            })
            .ok_or_else(|| format!("Metaspace replacement {}", step["replacement"]))?;
        let prepend = match step.get("prepend_scheme").and_then(|p| p.as_str()) {
            None | Some("always") => PrependScheme::Always,
            Some("first") => PrependScheme::First,
            Some("never") => PrependScheme::Never,
            Some(other) => return Err(format!("Metaspace prepend_scheme {other:?}")),
        };
        // Older files write `add_prefix_space`; `tokenizers` refuses `false` with any scheme but never.
        if step.get("add_prefix_space").and_then(|a| a.as_bool()) == Some(false)
            && prepend != PrependScheme::Never
        {
            return Err("Metaspace add_prefix_space false with a prepend_scheme".into());
        }
        Ok(Metaspace {
            replacement,
            prepend,
            split: step.get("split").and_then(|s| s.as_bool()).unwrap_or(true),
        })
    }

    pub(crate) fn name(&self) -> String {
        let prepend = match self.prepend {
            PrependScheme::Always => "always",
            PrependScheme::First => "first",
            PrependScheme::Never => "never",
        };
        format!("Metaspace(prepend {prepend}, split {})", self.split)
    }

    /// A piece with spaces replaced and the replacement put in front as the scheme says; `at_start`:
    /// the piece begins the input.
    pub(crate) fn apply<'t>(&self, piece: &'t str, at_start: bool) -> Cow<'t, str> {
        let prepend = match self.prepend {
            PrependScheme::Always => true,
            PrependScheme::First => at_start,
            PrependScheme::Never => false,
        } && !piece.starts_with([self.replacement, ' ']);
        if !prepend && !piece.contains(' ') {
            return Cow::Borrowed(piece);
        }
        let mut out = String::with_capacity(piece.len() + 4);
        if prepend {
            out.push(self.replacement);
        }
        for c in piece.chars() {
            out.push(if c == ' ' { self.replacement } else { c });
        }
        Cow::Owned(out)
    }
}

/// Where a text is cut into the words the BPE sees.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Cuts {
    /// The whole text is one word.
    None,
    /// Before every `c` (Metaspace with `split`).
    Before(char),
    /// Before every `c` that follows another character (no merge crosses such a point).
    BeforeRunOf(char),
}

/// Call `f` with each word of `text`, in order.
#[inline]
pub(crate) fn words<'t>(text: &'t str, cuts: Cuts, mut f: impl FnMut(&'t str)) {
    let (c, runs) = match cuts {
        Cuts::None => return f(text),
        Cuts::Before(c) => (c, false),
        Cuts::BeforeRunOf(c) => (c, true),
    };
    let mut start = 0;
    let mut previous = None;
    for (i, ch) in text.char_indices() {
        if ch == c && i > start && !(runs && previous == Some(c)) {
            f(&text[start..i]);
            start = i;
        }
        previous = Some(ch);
    }
    if start < text.len() {
        f(&text[start..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cut(text: &str, cuts: Cuts) -> Vec<&str> {
        let mut out = Vec::new();
        words(text, cuts, |w| out.push(w));
        out
    }

    #[test]
    fn words_are_cut_where_said() {
        let t = "▁▁a▁b▁▁c▁";
        assert_eq!(cut(t, Cuts::None), [t]);
        assert_eq!(
            cut(t, Cuts::Before(SPACE)),
            ["▁", "▁a", "▁b", "▁", "▁c", "▁"]
        );
        assert_eq!(cut(t, Cuts::BeforeRunOf(SPACE)), ["▁▁a", "▁b", "▁▁c", "▁"]);
        assert_eq!(cut("", Cuts::Before(SPACE)), Vec::<&str>::new());
    }

    #[test]
    fn metaspace_prepends_as_its_scheme_says() {
        let m = |prepend| Metaspace {
            replacement: SPACE,
            prepend,
            split: false,
        };
        assert_eq!(m(PrependScheme::Always).apply("a b", false), "▁a▁b");
        assert_eq!(m(PrependScheme::Always).apply(" a", false), "▁a");
        assert_eq!(m(PrependScheme::First).apply("a", false), "a");
        assert_eq!(m(PrependScheme::First).apply("a", true), "▁a");
        assert_eq!(m(PrependScheme::Never).apply("a ", true), "a▁");
    }
}
