//! Normalizers: the steps of a `tokenizer.json` `"normalizer"` the fast engine runs, each as `tokenizers`
//! computes it (same Unicode crate, same per-character rules), applied to each piece of text between added
//! tokens.

use std::borrow::Cow;

use unicode_normalization_alignments::{
    char::is_combining_mark, is_nfc_quick, IsNormalized, UnicodeNormalization,
};

/// One normalizer step.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Normalize {
    Nfc,
    Nfd,
    Nfkc,
    Nfkd,
    /// Each character's `char::to_lowercase` (not `str::to_lowercase`, whose final sigma differs).
    Lowercase,
    /// Combining marks removed.
    StripAccents,
    /// Every occurrence of a (non-empty) string, left to right, replaced.
    Replace {
        from: String,
        to: String,
    },
    /// Put in front of a non-empty text.
    Prepend(String),
    /// Leading and/or trailing whitespace (`char::is_whitespace`) removed.
    Strip {
        left: bool,
        right: bool,
    },
}

impl Normalize {
    /// The step a `tokenizer.json` normalizer object describes, `Err` naming what is not supported.
    /// `Sequence`s are flattened into `out`.
    pub(crate) fn parse(n: &serde_json::Value, out: &mut Vec<Normalize>) -> Result<(), String> {
        let kind = n.get("type").and_then(|t| t.as_str()).unwrap_or_default();
        let flag = |key: &str| n.get(key).and_then(|v| v.as_bool());
        let text = |key: &str| n.get(key).and_then(|v| v.as_str()).map(str::to_string);
        let step = match kind {
            "Sequence" => {
                let list = n
                    .get("normalizers")
                    .and_then(|l| l.as_array())
                    .ok_or("normalizer Sequence without normalizers")?;
                for one in list {
                    Normalize::parse(one, out)?;
                }
                return Ok(());
            }
            "NFC" => Normalize::Nfc,
            "NFD" => Normalize::Nfd,
            "NFKC" => Normalize::Nfkc,
            "NFKD" => Normalize::Nfkd,
            "Lowercase" => Normalize::Lowercase,
            "StripAccents" => Normalize::StripAccents,
            "Replace" => {
                let from = n
                    .get("pattern")
                    .and_then(|p| p.get("String"))
                    .and_then(|s| s.as_str())
                    .filter(|s| !s.is_empty())
                    .ok_or_else(|| {
                        format!(
                            "normalizer Replace of {} (only a non-empty string)",
                            n["pattern"]
                        )
                    })?;
                Normalize::Replace {
                    from: from.to_string(),
                    to: text("content").ok_or("normalizer Replace without content")?,
                }
            }
            "Prepend" => Normalize::Prepend(text("prepend").ok_or("Prepend without prepend")?),
            // Both fields are required, as `tokenizers` reads them.
            "Strip" => Normalize::Strip {
                left: flag("strip_left").ok_or("Strip without strip_left")?,
                right: flag("strip_right").ok_or("Strip without strip_right")?,
            },
            _ => return Err(format!("normalizer {n}")),
        };
        out.push(step);
        Ok(())
    }

    pub(crate) fn name(&self) -> String {
        match self {
            Normalize::Nfc => "NFC".into(),
            Normalize::Nfd => "NFD".into(),
            Normalize::Nfkc => "NFKC".into(),
            Normalize::Nfkd => "NFKD".into(),
            Normalize::Lowercase => "Lowercase".into(),
            Normalize::StripAccents => "StripAccents".into(),
            Normalize::Replace { from, to } => format!("Replace({from:?} → {to:?})"),
            Normalize::Prepend(p) => format!("Prepend({p:?})"),
            Normalize::Strip { left, right } => format!("Strip(left {left}, right {right})"),
        }
    }

    /// Whether this step can remove the first character of a text, so that the text's start no longer
    /// maps to where it started (what Metaspace's `prepend_scheme: first` looks at).
    pub(crate) fn may_drop_start(&self) -> bool {
        match self {
            Normalize::Strip { left, .. } => *left,
            Normalize::Replace { to, .. } => to.is_empty(),
            Normalize::StripAccents => true,
            _ => false,
        }
    }

    fn apply<'t>(&self, text: Cow<'t, str>) -> Cow<'t, str> {
        let owned = |s: String| -> Cow<'t, str> { Cow::Owned(s) };
        match self {
            // ASCII is invariant under the four forms, lowercase aside.
            Normalize::Nfc | Normalize::Nfd | Normalize::Nfkc | Normalize::Nfkd
                if text.is_ascii() =>
            {
                text
            }
            Normalize::Nfc if is_nfc_quick(text.chars()) == IsNormalized::Yes => text,
            Normalize::Nfc => owned(text.nfc().map(|(c, _)| c).collect()),
            Normalize::Nfd => owned(text.nfd().map(|(c, _)| c).collect()),
            Normalize::Nfkc => owned(text.nfkc().map(|(c, _)| c).collect()),
            Normalize::Nfkd => owned(text.nfkd().map(|(c, _)| c).collect()),
            Normalize::Lowercase if !text.chars().any(|c| c.is_uppercase() || !c.is_ascii()) => {
                text
            }
            Normalize::Lowercase => owned(text.chars().flat_map(char::to_lowercase).collect()),
            Normalize::StripAccents if text.is_ascii() => text,
            Normalize::StripAccents => {
                owned(text.chars().filter(|&c| !is_combining_mark(c)).collect())
            }
            Normalize::Replace { from, to } if text.contains(from.as_str()) => {
                owned(text.replace(from.as_str(), to))
            }
            Normalize::Replace { .. } => text,
            Normalize::Prepend(p) if !text.is_empty() => owned(format!("{p}{text}")),
            Normalize::Prepend(_) => text,
            Normalize::Strip { left, right } => {
                let mut s: &str = &text;
                if *left {
                    s = s.trim_start_matches(char::is_whitespace);
                }
                if *right {
                    s = s.trim_end_matches(char::is_whitespace);
                }
                if s.len() == text.len() {
                    text
                } else {
                    owned(s.to_string())
                }
            }
        }
    }
}

/// `text` through every step in turn (borrowed when nothing changes it).
pub(crate) fn normalize<'t>(steps: &[Normalize], text: &'t str) -> Cow<'t, str> {
    steps
        .iter()
        .fold(Cow::Borrowed(text), |text, step| step.apply(text))
}

/// Whether text out of these steps can never contain `c`: some step replaces every `c` with text without
/// it, and no later step can bring one back.
pub(crate) fn removes(steps: &[Normalize], c: char) -> bool {
    steps.iter().fold(false, |gone, step| match step {
        Normalize::Replace { from, to } if from.chars().eq([c]) => !to.contains(c),
        Normalize::Replace { to, .. } | Normalize::Prepend(to) => gone && !to.contains(c),
        // Compatibility forms map some characters to spaces (U+00A0 → ' '), and so on.
        Normalize::Nfkc | Normalize::Nfkd => false,
        _ => gone,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_as_tokenizers_computes_them() {
        let steps = [
            Normalize::Strip {
                left: true,
                right: false,
            },
            Normalize::Lowercase,
            Normalize::Prepend("▁".into()),
            Normalize::Replace {
                from: " ".into(),
                to: "▁".into(),
            },
        ];
        assert_eq!(normalize(&steps, "  Hello ΣΑΣ "), "▁hello▁σασ▁");
        assert_eq!(normalize(&steps, "   "), "");
        assert!(removes(&steps, ' '));
        assert!(!removes(&steps[..2], ' '));
        assert!(!removes(&[steps[3].clone(), Normalize::Nfkc], ' '));
    }
}
