//! A compiler from the subset of regex syntax split patterns are written in to the matcher's atoms
//! ([`super::patterns`]), so that a new model's pattern runs on the fast path without new code.
//!
//! Taken (Oniguruma's Ruby syntax, as `tokenizers` runs it): alternation at the top level; literal
//! characters and escapes (`\r`, `\n`, `\t`, `\f`, `\v`, `\\`, an escaped punctuation character);
//! `\s`, `\S`, `\p{X}` and `\P{X}` for the categories the table holds (`L`, `N`, `Lu`, `Lt`, `Ll`, `Lm`,
//! `Lo`, `M`, `P`, `S`); classes `[...]` and `[^...]` of those, literals and ranges; the quantifiers
//! `?`, `*`, `+`, `{m}`, `{m,}`, `{m,n}`, and the possessive `?+`, `*+`, `++`; `(?!\S)`; `$`; and the
//! English contractions group `(?i:'s|'t|'re|'ve|'m|'ll|'d)`, optionally `?`. Everything else — other
//! groups, lazy quantifiers, `{m,n}+` (a nested repetition in Ruby syntax, not a possessive one), `.`,
//! `\d`, `\w`, `\b`, anchors, case-insensitive groups, nested classes, and an alternative that can match
//! the empty string — is refused with the construct named, and the tokenizer falls back to `tokenizers`.
//! Every compiled pattern is checked against Oniguruma on random patterns and texts (tests below).

use super::patterns::{Atom, Pattern, INF, NO_SET};
use super::unicode::*;

/// The hand-compiled form of a known regex, else the compiled one, else why not.
pub(super) fn pattern(regex: &str) -> Result<Pattern, String> {
    if let Some(p) = Pattern::recognize(regex) {
        return Ok(p);
    }
    let (alternatives, sets) = compile(regex)?;
    Ok(Pattern::from_parts("compiled", alternatives, sets))
}

/// Alternatives (tried in order) and the range sets their classes name.
pub(super) type Compiled = (Vec<Vec<Atom>>, Vec<Vec<(u32, u32)>>);

pub(super) fn compile(regex: &str) -> Result<Compiled, String> {
    let mut parser = Parser {
        chars: regex.chars().collect(),
        at: 0,
        sets: Vec::new(),
    };
    let mut alternatives = vec![Vec::new()];
    while let Some(c) = parser.peek() {
        if c == '|' {
            parser.at += 1;
            alternatives.push(Vec::new());
            continue;
        }
        let atom = parser.item()?;
        alternatives.last_mut().expect("one at least").push(atom);
    }
    for alt in &alternatives {
        let may_be_empty = alt.iter().all(|a| match a {
            Atom::Class { min, .. } => *min == 0,
            Atom::Contraction { optional, .. } => *optional,
            Atom::EndOfLine | Atom::NotBeforeNonSpace => true,
        });
        if may_be_empty {
            return Err("an alternative that can match the empty string".into());
        }
    }
    Ok((alternatives, parser.sets))
}

struct Parser {
    chars: Vec<char>,
    at: usize,
    sets: Vec<Vec<(u32, u32)>>,
}

/// A class before its quantifier: flags, ranges, negation.
struct ClassSpec {
    mask: u32,
    ranges: Vec<(u32, u32)>,
    negated: bool,
}

/// The flags a literal character has a flag of its own for (cheaper than a range).
fn literal_flag(c: char) -> u32 {
    match c {
        '\r' => CR,
        '\n' => LF,
        ' ' => SPACE,
        '/' => SLASH,
        _ => 0,
    }
}

fn category(name: &str) -> Result<u32, String> {
    Ok(match name {
        "L" => L,
        "N" => N,
        "Lu" => LU,
        "Lt" => LT,
        "Ll" => LL,
        "Lm" => LM,
        "Lo" => LO,
        "M" => M,
        "P" => P,
        "S" => SYM,
        other => return Err(format!("the category \\p{{{other}}}")),
    })
}

const CONTRACTIONS: &str = "(?i:'s|'t|'re|'ve|'m|'ll|'d)";

impl Parser {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.at).copied()
    }

    fn rest_starts_with(&self, s: &str) -> bool {
        let n = s.chars().count();
        self.chars
            .get(self.at..self.at + n)
            .is_some_and(|rest| rest.iter().copied().eq(s.chars()))
    }

    fn next(&mut self, what: &str) -> Result<char, String> {
        let c = self
            .peek()
            .ok_or_else(|| format!("the pattern ends inside {what}"))?;
        self.at += 1;
        Ok(c)
    }

    /// One atom with its quantifier.
    fn item(&mut self) -> Result<Atom, String> {
        if self.rest_starts_with(CONTRACTIONS) {
            self.at += CONTRACTIONS.chars().count();
            let optional = self.peek() == Some('?');
            if optional {
                self.at += 1;
                if matches!(self.peek(), Some('?' | '+' | '*' | '{')) {
                    return Err("a quantifier after the contractions' `?`".into());
                }
            } else if matches!(self.peek(), Some('+' | '*' | '{')) {
                return Err("a repeated contractions group".into());
            }
            return Ok(Atom::Contraction {
                case_insensitive: true,
                optional,
            });
        }
        if self.rest_starts_with(r"(?!\S)") {
            self.at += 6;
            return self.no_quantifier(Atom::NotBeforeNonSpace, "(?!\\S)");
        }
        let c = self.next("an item")?;
        let class = match c {
            '$' => return self.no_quantifier(Atom::EndOfLine, "$"),
            '(' => return Err("a group other than the contractions' and (?!\\S)".into()),
            ')' => return Err("an unbalanced `)`".into()),
            '[' => self.class()?,
            '\\' => match self.escape(false)? {
                Escaped::Char(ch) => self.literal(ch),
                Escaped::Class { mask, negated } => ClassSpec {
                    mask,
                    ranges: Vec::new(),
                    negated,
                },
            },
            '.' | '^' => return Err(format!("`{c}`")),
            '?' | '*' | '+' | '{' => {
                return Err(format!("a quantifier `{c}` with nothing before it"))
            }
            c => self.literal(c),
        };
        let (min, max, possessive) = self.quantifier()?;
        let set = self.set_index(class.ranges)?;
        Ok(Atom::Class {
            mask: class.mask,
            set,
            negated: class.negated,
            min,
            max,
            possessive,
        })
    }

    fn no_quantifier(&self, atom: Atom, what: &str) -> Result<Atom, String> {
        match self.peek() {
            Some('?' | '*' | '+' | '{') => Err(format!("a quantifier after `{what}`")),
            _ => Ok(atom),
        }
    }

    fn literal(&self, c: char) -> ClassSpec {
        match literal_flag(c) {
            0 => ClassSpec {
                mask: 0,
                ranges: vec![(c as u32, c as u32)],
                negated: false,
            },
            flag => ClassSpec {
                mask: flag,
                ranges: Vec::new(),
                negated: false,
            },
        }
    }

    fn set_index(&mut self, mut ranges: Vec<(u32, u32)>) -> Result<u16, String> {
        if ranges.is_empty() {
            return Ok(NO_SET);
        }
        ranges.sort_unstable();
        let mut merged: Vec<(u32, u32)> = Vec::with_capacity(ranges.len());
        for (a, b) in ranges {
            match merged.last_mut() {
                Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        if let Some(k) = self.sets.iter().position(|s| *s == merged) {
            return Ok(k as u16);
        }
        if self.sets.len() >= NO_SET as usize {
            return Err("too many character classes".into());
        }
        self.sets.push(merged);
        Ok((self.sets.len() - 1) as u16)
    }

    /// After a `\\` outside or inside a class: a class (`\\s`, `\\p{L}`, ...) or a literal character.
    fn escape(&mut self, in_class: bool) -> Result<Escaped, String> {
        let c = self.next("an escape")?;
        let class = |mask: u32, negated: bool| Ok(Escaped::Class { mask, negated });
        match c {
            's' => class(S, false),
            'S' if !in_class => class(S, true),
            'p' | 'P' if self.peek() == Some('{') => {
                self.at += 1;
                let mut name = String::new();
                loop {
                    match self.next("\\p{...}")? {
                        '}' => break,
                        ch => name.push(ch),
                    }
                }
                let (name, caret) = match name.strip_prefix('^') {
                    Some(n) => (n.to_string(), true),
                    None => (name, false),
                };
                let negated = caret != (c == 'P');
                if negated && in_class {
                    return Err("a negated category inside a class".into());
                }
                class(category(&name)?, negated)
            }
            'r' => Ok(Escaped::Char('\r')),
            'n' => Ok(Escaped::Char('\n')),
            't' => Ok(Escaped::Char('\t')),
            'f' => Ok(Escaped::Char('\u{c}')),
            'v' => Ok(Escaped::Char('\u{b}')),
            c if c.is_ascii_punctuation() || c == ' ' => Ok(Escaped::Char(c)),
            other => Err(format!("the escape \\{other}")),
        }
    }

    /// After `[`: up to the closing `]`.
    fn class(&mut self) -> Result<ClassSpec, String> {
        let negated = self.peek() == Some('^');
        if negated {
            self.at += 1;
        }
        let mut out = ClassSpec {
            mask: 0,
            ranges: Vec::new(),
            negated,
        };
        let mut first = true;
        loop {
            let c = self.next("a class `[...]`")?;
            let single = match c {
                ']' if !first => return Ok(out),
                ']' => return Err("an empty class".into()),
                '[' => return Err("a nested class".into()),
                '&' if self.peek() == Some('&') => return Err("a class intersection `&&`".into()),
                '\\' => match self.escape(true)? {
                    Escaped::Char(ch) => ch,
                    Escaped::Class { mask, .. } => {
                        out.mask |= mask;
                        first = false;
                        continue;
                    }
                },
                c => c,
            };
            first = false;
            // A range `a-b` (a `-` before `]` is a literal).
            if self.peek() == Some('-') && self.chars.get(self.at + 1).is_some_and(|&n| n != ']') {
                self.at += 1;
                let end = match self.next("a range")? {
                    '\\' => match self.escape(true)? {
                        Escaped::Char(ch) => ch,
                        Escaped::Class { .. } => return Err("a range ending in a class".into()),
                    },
                    '[' => return Err("a nested class".into()),
                    e => e,
                };
                if end < single {
                    return Err(format!("the empty range {single:?}-{end:?}"));
                }
                out.ranges.push((single as u32, end as u32));
            } else {
                match literal_flag(single) {
                    0 => out.ranges.push((single as u32, single as u32)),
                    flag => out.mask |= flag,
                }
            }
        }
    }

    /// The quantifier after an atom: `(min, max, possessive)`.
    fn quantifier(&mut self) -> Result<(u32, u32, bool), String> {
        let (min, max, braces) = match self.peek() {
            Some('?') => {
                self.at += 1;
                (0, 1, false)
            }
            Some('*') => {
                self.at += 1;
                (0, INF, false)
            }
            Some('+') => {
                self.at += 1;
                (1, INF, false)
            }
            Some('{') => {
                self.at += 1;
                let min = self
                    .number()?
                    .ok_or("a `{` without a count (write `\\{`)")?;
                let max = if self.peek() == Some(',') {
                    self.at += 1;
                    self.number()?.unwrap_or(INF)
                } else {
                    min
                };
                if self.next("{m,n}")? != '}' {
                    return Err("a malformed `{m,n}`".into());
                }
                if max < min || max == 0 {
                    return Err(format!("the repeat {{{min},{max}}}"));
                }
                (min, max, true)
            }
            _ => return Ok((1, 1, false)),
        };
        let possessive = match self.peek() {
            Some('+') if braces => {
                return Err("`{m,n}+` (a nested repetition in Ruby syntax)".into())
            }
            Some('+') => {
                self.at += 1;
                true
            }
            Some('?') => return Err("a lazy quantifier".into()),
            Some('*' | '{') => return Err("a quantifier after a quantifier".into()),
            _ => false,
        };
        Ok((min, max, possessive))
    }

    /// Decimal digits, if any.
    fn number(&mut self) -> Result<Option<u32>, String> {
        let start = self.at;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.at += 1;
        }
        if self.at == start {
            return Ok(None);
        }
        let text: String = self.chars[start..self.at].iter().collect();
        text.parse::<u32>()
            .map(Some)
            .map_err(|_| format!("the repeat count {text}"))
    }
}

/// What an escape stands for.
enum Escaped {
    Char(char),
    Class { mask: u32, negated: bool },
}

#[cfg(test)]
mod tests {
    use super::super::patterns::{
        Pattern, CL100K, DEEPSEEK_V3, GPT2, LLAMA3, O200K, QWEN2, TEKKEN,
    };
    use super::super::unicode::ascii_flags;
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};
    use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
    use tokenizers::tokenizer::{
        normalizer::SplitDelimiterBehavior, OffsetReferential, OffsetType, PreTokenizedString,
        PreTokenizer,
    };

    /// Oniguruma's pieces (`tokenizers`' `Split`, `Isolated`).
    fn oniguruma(regex: &str, text: &str) -> Vec<String> {
        let split = Split::new(
            SplitPattern::Regex(regex.to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .unwrap();
        let mut pre = PreTokenizedString::from(text);
        split.pre_tokenize(&mut pre).unwrap();
        pre.get_splits(OffsetReferential::Original, OffsetType::Byte)
            .into_iter()
            .map(|(s, _, _)| s.to_string())
            .collect()
    }

    fn ours(pattern: &Pattern, text: &str) -> Vec<String> {
        let mut out = Vec::new();
        pattern.split(text, &ascii_flags(), |p| out.push(p.to_string()));
        out
    }

    fn compiled(regex: &str) -> Pattern {
        let (alternatives, sets) = compile(regex).unwrap_or_else(|e| panic!("{regex}: {e}"));
        Pattern::from_parts("test", alternatives, sets)
    }

    fn texts() -> impl Strategy<Value = String> {
        let chars = prop_oneof![
            4 => prop::sample::select(
                " \t\n\r\u{b}\u{c}\u{85}\u{a0}\u{3000}'\"/!?.,-_@[]\\^`{|}~#$%&()*+:;<=>0123456789aAsStTrReEvVmMlLdDzZ"
                    .chars()
                    .collect::<Vec<_>>()
            ),
            2 => prop::sample::select(
                "éÉßǅΣσЖж中字一龥ぁゟ゠ヿーア々가٣²½①\u{301}\u{93f}😀👍🏽\u{200d}€£©±§¶«»—“”"
                    .chars()
                    .collect::<Vec<_>>()
            ),
            1 => any::<char>(),
        ];
        prop::collection::vec(chars, 0..30).prop_map(|c| c.into_iter().collect())
    }

    /// Texts of long ASCII letter runs (what the scanners read eight bytes at a time), ended by every
    /// kind of character: another letter outside ASCII, `@`/`[`/`` ` ``/`{` (next to the letter ranges),
    /// digits, spaces, marks, the end.
    fn wordy_texts() -> impl Strategy<Value = String> {
        let pieces = prop_oneof![
            4 => "[A-Z]{0,10}[a-z]{0,12}",
            2 => "[a-zA-Z]{0,20}",
            2 => prop::sample::select(
                [" ", "\n", "'", "'s", "@", "[", "`", "{", "09", ".", "_", "é", "Ж", "中", "\u{301}", "😀", "\u{a0}"]
                    .map(String::from)
                    .to_vec()
            ),
        ];
        prop::collection::vec(pieces, 0..12).prop_map(|p| p.concat())
    }

    /// `pattern` cuts `cases` random texts as Oniguruma cuts them with `regex`.
    fn agrees_with_oniguruma(regex: &str, pattern: &Pattern, cases: u32) {
        TestRunner::new(Config::with_cases(cases))
            .run(&prop_oneof![texts(), wordy_texts()], |text| {
                prop_assert_eq!(ours(pattern, &text), oniguruma(regex, &text), "{}", regex);
                Ok(())
            })
            .unwrap();
    }

    #[test]
    fn known_patterns_compile_and_split_as_oniguruma() {
        for regex in [GPT2, LLAMA3, QWEN2, O200K] {
            let pattern = compiled(regex);
            agrees_with_oniguruma(regex, &pattern, 500);
        }
        // cl100k's `\s++$`-style tail and `'(?i:[sdmt]|ll|ve|re)` are outside the subset: hand-written.
        assert!(compile(CL100K).is_err());
    }

    /// The scanners written by hand for Llama 3's, Qwen2's, o200k's, cl100k's and GPT-2's patterns cut
    /// as Oniguruma does.
    #[test]
    fn hand_written_scanners_split_as_oniguruma() {
        for regex in [LLAMA3, QWEN2, O200K, CL100K, GPT2] {
            let pattern = Pattern::recognize(regex).unwrap();
            agrees_with_oniguruma(regex, &pattern, 3000);
        }
    }

    #[test]
    fn refuses_what_it_does_not_take() {
        for (regex, why) in [
            ("a|", "empty"),
            ("(ab)+", "group"),
            ("a+?", "lazy"),
            (r"\p{N}{1,3}+", "nested"),
            (r"\d+", "\\d"),
            (".+", "`.`"),
            (r"\p{Greek}", "category"),
            ("[[a]]", "nested class"),
            ("(?i:abc)", "group"),
            ("x{2,1}", "repeat"),
            ("[a-", "ends"),
            (r"\s*", "empty"),
        ] {
            let err = compile(regex).unwrap_err();
            assert!(err.contains(why), "{regex}: {err}");
        }
    }

    /// Patterns real tokenizers use (DeepSeek-V3's three, and Mistral's Tekken-style one), against
    /// Oniguruma on random text.
    #[test]
    fn real_patterns_split_as_oniguruma() {
        let regexes: Vec<&str> = DEEPSEEK_V3.iter().copied().chain([TEKKEN]).collect();
        for regex in regexes {
            let pattern = compiled(regex);
            agrees_with_oniguruma(regex, &pattern, 2000);
        }
    }

    /// Random patterns from the subset, against Oniguruma on random text.
    #[test]
    fn random_patterns_split_as_oniguruma() {
        let piece = prop_oneof![prop::sample::select(vec![
            r"\s",
            r"\S",
            r"\p{L}",
            r"\p{N}",
            r"\p{P}",
            r"\p{S}",
            r"\p{Lu}",
            r"\p{Ll}",
            r"\p{M}",
            r"\P{L}",
            "[^\\s\\p{L}\\p{N}]",
            "[\\r\\n]",
            "[^\r\n\\p{L}]",
            "[A-Za-z]",
            "[0-9]",
            "[一-龥ぁ-ゟ]",
            "[!-/:-@]",
            "[\\p{P}\\p{S}]",
            "a",
            "'",
            " ",
            "\\.",
            "/",
            "\\n",
            "-",
        ])
        .prop_map(String::from),];
        let quant = prop::sample::select(vec![
            "", "", "?", "*", "+", "{1,3}", "{2}", "{0,2}", "{1,}", "?+", "*+", "++",
        ]);
        let item = (piece, quant).prop_map(|(p, q)| p + q);
        let tail = prop::sample::select(vec!["", "", "", r"(?!\S)", "$"]);
        let alt = (prop::collection::vec(item, 1..4), tail).prop_map(|(i, t)| i.concat() + t);
        let pattern = prop::collection::vec(alt, 1..4).prop_map(|a| a.join("|"));
        let mut runner = TestRunner::new(Config::with_cases(1500));
        let taken = std::cell::Cell::new(0);
        runner
            .run(
                &(pattern, prop::collection::vec(texts(), 4)),
                |(regex, texts)| {
                    let Ok((alternatives, sets)) = compile(&regex) else {
                        return Ok(()); // refused (an alternative that can match empty): falls back
                    };
                    taken.set(taken.get() + 1);
                    let pattern = Pattern::from_parts("test", alternatives, sets);
                    for text in &texts {
                        prop_assert_eq!(ours(&pattern, text), oniguruma(&regex, text), "{}", regex);
                    }
                    Ok(())
                },
            )
            .unwrap();
        assert!(
            taken.get() >= 750,
            "only {} of 1500 patterns compiled",
            taken.get()
        );
    }
}
