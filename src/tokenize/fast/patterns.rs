//! Hand-compiled split patterns. Each known `Split` regex (and GPT-2's `ByteLevel` regex) is written here
//! as the alternatives Oniguruma tries, in order, at each position; a small backtracking matcher runs them
//! with the same greedy / possessive semantics, over classes looked up in a table instead of a regex
//! engine's general machinery. Only patterns listed in [`Pattern::recognize`] are taken: any other regex
//! Any other regex goes to the compiler (`compile.rs`), which takes the subset of regex syntax
//! these patterns are written in (and refuses the rest, sending the tokenizer to the `tokenizers`
//! fallback, so an unknown construct can never split differently).

use super::unicode::{self, *};

/// One piece of an alternative.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Atom {
    /// A character class (characters with a flag in `mask` or in the pattern's range set `set`; none
    /// of them when `negated`) repeated `min..=max` times, greedy (backtracks) or possessive (does not).
    Class {
        mask: u32,
        set: u16,
        negated: bool,
        min: u32,
        max: u32,
        possessive: bool,
    },
    /// `'s|'t|'re|'ve|'m|'ll|'d`, case-insensitive with `(?i:…)`, optional with `(…)?`.
    Contraction {
        case_insensitive: bool,
        optional: bool,
    },
    /// Ruby-syntax `$`: at the end of the text or before `\n`.
    EndOfLine,
    /// `(?!\S)`: at the end of the text or before a `\s` character.
    NotBeforeNonSpace,
}

pub(super) const INF: u32 = u32::MAX;
/// No range set: the class is its flags.
pub(super) const NO_SET: u16 = u16::MAX;

const fn class(mask: u32, min: u32, max: u32) -> Atom {
    Atom::Class {
        mask,
        set: NO_SET,
        negated: false,
        min,
        max,
        possessive: false,
    }
}
const fn not_class(mask: u32, min: u32, max: u32) -> Atom {
    Atom::Class {
        mask,
        set: NO_SET,
        negated: true,
        min,
        max,
        possessive: false,
    }
}
const fn possessive(atom: Atom) -> Atom {
    match atom {
        Atom::Class {
            mask,
            set,
            negated,
            min,
            max,
            ..
        } => Atom::Class {
            mask,
            set,
            negated,
            min,
            max,
            possessive: true,
        },
        other => other,
    }
}
const CONTRACTION_CI: Atom = Atom::Contraction {
    case_insensitive: true,
    optional: false,
};
const UPPERISH: u32 = LU | LT | LM | LO | M;
const LOWERISH: u32 = LL | LM | LO | M;

/// GPT-2 (`ByteLevel` with `use_regex`), also found as a `Split` regex.
pub const GPT2: &str =
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";
/// Llama 3 (and cl100k_base as `transformers` converts it).
pub const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2, Qwen2.5, Qwen3: Llama 3's with single digits.
pub const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// tiktoken's split pattern for cl100k_base. One change for Oniguruma: `\p{N}{1,3}+` (possessive in
/// tiktoken's regex engine) means `(\p{N}{1,3})+` in Oniguruma's Ruby syntax, so it is written `\p{N}{1,3}`,
/// which matches the same since nothing follows it in its alternative.
pub const CL100K: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s";
/// o200k_base's split pattern, as tiktoken writes it (`tests/builtin_tokenizers.rs` checks it is
/// `tiktoken_rs::O200K_BASE_PAT_STR`).
pub const O200K: &str = concat!(
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    "|",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    "|",
    r"\p{N}{1,3}",
    "|",
    r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
    "|",
    r"\s*[\r\n]+",
    "|",
    r"\s+(?!\S)",
    "|",
    r"\s+"
);

/// DeepSeek-V3's (and R1's) three `Split` regexes, applied in turn, as its `tokenizer.json` writes them:
/// runs of up to three digits, runs of CJK ideographs and kana, then the rest. Compiled, not hand-written.
pub const DEEPSEEK_V3: [&str; 3] = [
    r"\p{N}{1,3}",
    "[一-龥\u{3040}-ゟ゠-ヿ]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
];
/// Mistral's Tekken (Mistral Nemo and later; also what `transformers`' `fix_mistral_regex` writes):
/// o200k's pattern without the contractions, single digits. Compiled, not hand-written.
pub const TEKKEN: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A split pattern this module can run.
#[derive(Debug)]
pub(crate) struct Pattern {
    name: &'static str,
    alternatives: Vec<Vec<Atom>>,
    /// Sorted, disjoint code point ranges `[start, end]` of the classes whose `set` names them.
    sets: Vec<Vec<(u32, u32)>>,
    /// A scanner written for this pattern, run instead of the alternatives (the same pieces).
    scanner: Option<Scanner>,
    /// The stretches between matches are dropped, not pieces: `tokenizers`' `Split` with `Removed`
    /// behaviour and `invert` (what converted tiktoken files write, e.g. Xenova's gpt-4o).
    drop_gaps: bool,
}

/// Scanners written by hand for the most used patterns: one pass that decides, from the character at a
/// position and the one after it, which alternative matches, instead of trying them in turn.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Scanner {
    /// Llama 3's and Qwen2's pattern (they differ in how many digits `\p{N}{1,k}` takes):
    /// `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,k}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`.
    /// Every character starts a match of one of them, so there are no gaps.
    LlamaLike { digits: u32 },
    /// o200k_base's pattern, decided directly where every character that decides the match is ASCII
    /// (its letter classes overlap outside ASCII — `\p{Lm}`, `\p{Lo}`, `\p{M}` are both "upper" and
    /// "lower" — so anything else goes to the alternatives).
    O200kAscii,
    /// cl100k_base's pattern, the same way.
    Cl100kAscii,
    /// GPT-2's pattern (`ByteLevel`'s own regex): `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+|
    /// ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`. Every character starts a match, so there are no gaps.
    Gpt2,
}

impl Pattern {
    /// A pattern from its parts (the compiler's output).
    pub(super) fn from_parts(
        name: &'static str,
        alternatives: Vec<Vec<Atom>>,
        sets: Vec<Vec<(u32, u32)>>,
    ) -> Pattern {
        Pattern {
            name,
            alternatives,
            sets,
            scanner: None,
            drop_gaps: false,
        }
    }

    /// `tokenizers`' `Digits` pre-tokenizer: each numeric character (Rust's `char::is_numeric`) its own
    /// piece with `individual_digits`, else each run of them.
    pub(crate) fn digits(individual: bool) -> Pattern {
        Pattern {
            name: if individual { "digits" } else { "digit-runs" },
            alternatives: vec![vec![class(
                RUST_NUMERIC,
                1,
                if individual { 1 } else { INF },
            )]],
            sets: Vec::new(),
            scanner: None,
            drop_gaps: false,
        }
    }

    /// The hand-compiled form of a known regex, or `None`.
    pub(crate) fn recognize(regex: &str) -> Option<Pattern> {
        let sp = class(SPACE, 0, 1);
        let ws_tail = |alts: &mut Vec<Vec<Atom>>| {
            alts.push(vec![class(S, 0, INF), class(CR | LF, 1, INF)]);
            alts.push(vec![class(S, 1, INF), Atom::NotBeforeNonSpace]);
            alts.push(vec![class(S, 1, INF)]);
        };
        let llama_like = |digits: u32| {
            let mut alts = vec![
                vec![CONTRACTION_CI],
                vec![not_class(CR | LF | L | N, 0, 1), class(L, 1, INF)],
                vec![class(N, 1, digits)],
                vec![sp, not_class(S | L | N, 1, INF), class(CR | LF, 0, INF)],
            ];
            ws_tail(&mut alts);
            alts
        };
        let (name, alternatives, scanner) = if regex == GPT2 {
            let alts = vec![
                vec![Atom::Contraction {
                    case_insensitive: false,
                    optional: false,
                }],
                vec![sp, class(L, 1, INF)],
                vec![sp, class(N, 1, INF)],
                vec![sp, not_class(S | L | N, 1, INF)],
                vec![class(S, 1, INF), Atom::NotBeforeNonSpace],
                vec![class(S, 1, INF)],
            ];
            ("gpt2", alts, Scanner::Gpt2)
        } else if regex == LLAMA3 {
            ("llama3", llama_like(3), Scanner::LlamaLike { digits: 3 })
        } else if regex == QWEN2 {
            ("qwen2", llama_like(1), Scanner::LlamaLike { digits: 1 })
        } else if regex == CL100K {
            // Possessive where tiktoken wrote `?+`, `++`, `*+`; `\p{N}{1,3}` plain (see builtin.rs).
            let alts = vec![
                vec![CONTRACTION_CI],
                vec![
                    possessive(not_class(CR | LF | L | N, 0, 1)),
                    possessive(class(L, 1, INF)),
                ],
                vec![class(N, 1, 3)],
                vec![
                    sp,
                    possessive(not_class(S | L | N, 1, INF)),
                    possessive(class(CR | LF, 0, INF)),
                ],
                vec![possessive(class(S, 1, INF)), Atom::EndOfLine],
                vec![class(S, 0, INF), class(CR | LF, 1, 1)],
                vec![class(S, 1, INF), Atom::NotBeforeNonSpace],
                vec![class(S, 1, 1)],
            ];
            ("cl100k", alts, Scanner::Cl100kAscii)
        } else if regex == O200K {
            let contraction = Atom::Contraction {
                case_insensitive: true,
                optional: true,
            };
            let lead = not_class(CR | LF | L | N, 0, 1);
            let mut alts = vec![
                vec![
                    lead,
                    class(UPPERISH, 0, INF),
                    class(LOWERISH, 1, INF),
                    contraction,
                ],
                vec![
                    lead,
                    class(UPPERISH, 1, INF),
                    class(LOWERISH, 0, INF),
                    contraction,
                ],
                vec![class(N, 1, 3)],
                vec![
                    sp,
                    not_class(S | L | N, 1, INF),
                    class(CR | LF | SLASH, 0, INF),
                ],
            ];
            ws_tail(&mut alts);
            ("o200k", alts, Scanner::O200kAscii)
        } else {
            return None;
        };
        Some(Pattern {
            name,
            alternatives,
            sets: Vec::new(),
            scanner: Some(scanner),
            drop_gaps: false,
        })
    }

    /// A short name for reports.
    pub(crate) fn name(&self) -> &'static str {
        self.name
    }

    /// This pattern as `Split` with `Removed` behaviour and `invert` runs it: only the matches are
    /// pieces, what lies between them is dropped.
    pub(crate) fn dropping_gaps(self) -> Pattern {
        Pattern {
            drop_gaps: true,
            ..self
        }
    }

    /// Call `piece` with each piece of `text`, in order, as `tokenizers`' `Split` with `Isolated`
    /// behaviour cuts it: every match, and every stretch between matches (unless the pattern drops
    /// them). Returns the number of pieces.
    pub(crate) fn split<'t>(
        &self,
        text: &'t str,
        ascii: &[u32; 128],
        mut piece: impl FnMut(&'t str),
    ) -> usize {
        self.split_ranges(text, ascii, |from, to| piece(&text[from..to]))
    }

    /// [`Pattern::split`] with each piece as its bytes (the word step's input): no character-boundary
    /// checks in the hot loop (the pieces are whole characters all the same).
    pub(crate) fn split_bytes<'t>(
        &self,
        text: &'t str,
        ascii: &[u32; 128],
        mut piece: impl FnMut(&'t [u8]),
    ) -> usize {
        let bytes = text.as_bytes();
        self.split_ranges(
            text,
            ascii,
            #[inline(always)]
            |from, to| piece(&bytes[from..to]),
        )
    }

    /// The pieces as byte ranges `from..to`, each called once, in order; returns their number (counted
    /// here, in a register, rather than by the caller through memory in its hot loop).
    #[inline(always)]
    fn split_ranges(
        &self,
        text: &str,
        ascii: &[u32; 128],
        mut piece: impl FnMut(usize, usize),
    ) -> usize {
        let bytes = text.as_bytes();
        let m = Matcher {
            bytes,
            ascii,
            sets: &self.sets,
        };
        match self.scanner {
            Some(Scanner::LlamaLike { digits }) => {
                return m.pieces(&mut piece, |m, pos| m.llama_like(pos, digits))
            }
            Some(Scanner::Gpt2) => return m.pieces(&mut piece, Matcher::gpt2),
            _ => {}
        }
        // The loop instantiated once per scanner, so that o200k's and cl100k's differences are decided
        // at compile time. Their patterns match at every character (a character is whitespace, a
        // letter, a number or none of these, and each kind starts an alternative), so their loops keep
        // no gap; whether gaps are dropped matters only to compiled patterns.
        match self.scanner {
            Some(Scanner::O200kAscii) => {
                self.matches::<false>(&m, piece, |m, pos| m.ascii_scan::<true>(pos))
            }
            Some(Scanner::Cl100kAscii) => {
                self.matches::<false>(&m, piece, |m, pos| m.ascii_scan::<false>(pos))
            }
            _ if self.drop_gaps => self.matches::<false>(&m, piece, |_, _| None),
            _ => self.matches::<true>(&m, piece, |_, _| None),
        }
    }

    /// `piece` with every match of the alternatives, and (with GAPS) every stretch between matches,
    /// in order; `decide` gives a match's end where it can (a scanner), else the alternatives are
    /// tried in turn. Returns the number of pieces.
    #[inline(always)]
    fn matches<const GAPS: bool>(
        &self,
        m: &Matcher,
        mut piece: impl FnMut(usize, usize),
        decide: impl Fn(&Matcher, usize) -> Option<usize>,
    ) -> usize {
        let len = m.bytes.len();
        let (mut pos, mut gap_start, mut pieces) = (0usize, 0usize, 0usize);
        while pos < len {
            let decided = decide(m, pos);
            match decided.or_else(|| self.alternatives.iter().find_map(|alt| m.seq(alt, pos))) {
                Some(end) if end > pos => {
                    if GAPS && gap_start < pos {
                        piece(gap_start, pos);
                        pieces += 1;
                    }
                    piece(pos, end);
                    pieces += 1;
                    pos = end;
                    gap_start = end;
                }
                // No match here (or an empty one): the character joins the gap before the next match.
                _ => pos += m.decode(pos).1,
            }
        }
        if GAPS && gap_start < len {
            piece(gap_start, len);
            pieces += 1;
        }
        pieces
    }
}

/// A run of whitespace: where it ends, where its last character starts, and the end of its last CR or LF.
struct Whitespace {
    end: usize,
    last_start: usize,
    after_newline: Option<usize>,
}

struct Matcher<'a> {
    bytes: &'a [u8],
    ascii: &'a [u32; 128],
    sets: &'a [Vec<(u32, u32)>],
}

impl Matcher<'_> {
    /// `piece` with each match of a scanner that matches everywhere (`end` gives the end of the match
    /// at a position before the end of the text): one loop, the scanner and `piece` inlined into it.
    /// Returns the number of pieces.
    #[inline(always)]
    fn pieces(
        &self,
        piece: &mut impl FnMut(usize, usize),
        end: impl Fn(&Self, usize) -> usize,
    ) -> usize {
        let (mut pos, mut pieces) = (0, 0);
        while pos < self.bytes.len() {
            let end = end(self, pos);
            piece(pos, end);
            pos = end;
            pieces += 1;
        }
        pieces
    }

    /// The code point at `pos` (a char boundary before the end) and its length in bytes.
    #[inline(always)]
    fn decode(&self, pos: usize) -> (u32, usize) {
        let b = self.bytes;
        let b0 = b[pos] as u32;
        if b0 < 0x80 {
            (b0, 1)
        } else if b0 < 0xE0 {
            (((b0 & 0x1F) << 6) | (b[pos + 1] as u32 & 0x3F), 2)
        } else if b0 < 0xF0 {
            (
                ((b0 & 0x0F) << 12)
                    | ((b[pos + 1] as u32 & 0x3F) << 6)
                    | (b[pos + 2] as u32 & 0x3F),
                3,
            )
        } else {
            (
                ((b0 & 0x07) << 18)
                    | ((b[pos + 1] as u32 & 0x3F) << 12)
                    | ((b[pos + 2] as u32 & 0x3F) << 6)
                    | (b[pos + 3] as u32 & 0x3F),
                4,
            )
        }
    }

    #[inline(always)]
    fn flags_at(&self, pos: usize) -> (u32, usize) {
        let b0 = self.bytes[pos];
        if b0 < 0x80 {
            (self.ascii[b0 as usize], 1)
        } else {
            let (c, len) = self.decode(pos);
            (unicode::flags(c), len)
        }
    }

    /// The end of the first way `atoms` match at `pos`, trying longer repetitions first, as a
    /// backtracking regex engine does.
    fn seq(&self, atoms: &[Atom], pos: usize) -> Option<usize> {
        let Some((atom, rest)) = atoms.split_first() else {
            return Some(pos);
        };
        let len = self.bytes.len();
        match *atom {
            Atom::Class {
                mask,
                set,
                negated,
                min,
                max,
                possessive,
            } => {
                let (mut end, mut count) = (pos, 0u32);
                while count < max && end < len {
                    let (f, w) = self.flags_at(end);
                    let hit = (f & mask) != 0 || (set != NO_SET && self.in_set(set, end));
                    if hit == negated {
                        break;
                    }
                    end += w;
                    count += 1;
                }
                if count < min {
                    return None;
                }
                if possessive {
                    return self.seq(rest, end);
                }
                loop {
                    if let Some(e) = self.seq(rest, end) {
                        return Some(e);
                    }
                    if count == min {
                        return None;
                    }
                    // Give back one character.
                    end -= 1;
                    while self.bytes[end] & 0xC0 == 0x80 {
                        end -= 1;
                    }
                    count -= 1;
                }
            }
            Atom::Contraction {
                case_insensitive,
                optional,
            } => {
                if let Some(e) = self.contraction(pos, case_insensitive) {
                    if let Some(end) = self.seq(rest, e) {
                        return Some(end);
                    }
                }
                if optional {
                    self.seq(rest, pos)
                } else {
                    None
                }
            }
            Atom::EndOfLine => (pos == len || self.bytes[pos] == b'\n')
                .then(|| self.seq(rest, pos))
                .flatten(),
            Atom::NotBeforeNonSpace => (pos == len || self.flags_at(pos).0 & S != 0)
                .then(|| self.seq(rest, pos))
                .flatten(),
        }
    }

    /// The end of [`Scanner::LlamaLike`]'s match at `pos` (before the end): the alternatives in order,
    /// each decided from the characters at `pos` and after it.
    #[inline(always)]
    fn llama_like(&self, pos: usize, digits: u32) -> usize {
        let len = self.bytes.len();
        let (f0, w0) = self.flags_at(pos);
        let next = pos + w0;
        // `[^\r\n\p{L}\p{N}]?\p{L}+` with the prefix empty (the contractions start with `'`).
        if f0 & L != 0 {
            return self.letters(next);
        }
        // `\p{N}{1,k}` (tried later by the regex, but nothing before it matches at a number: the
        // contractions start with `'`, the letter alternatives' prefix is not a number).
        if f0 & N != 0 {
            return self.run(next, N, false, digits - 1);
        }
        // The contractions.
        if self.bytes[pos] == b'\'' {
            if let Some(end) = self.contraction(pos, true) {
                return end;
            }
        }
        let (f1, w1) = if next < len {
            self.flags_at(next)
        } else {
            (0, 0)
        };
        // The same with a prefix: any character but CR, LF, a letter or a number, then letters.
        if f0 & (CR | LF) == 0 && f1 & L != 0 {
            return self.letters(next + w1);
        }
        // ` ?[^\s\p{L}\p{N}]+[\r\n]*`: a character of none of the three, after an optional space.
        let other = |f: u32| f & (S | L | N) == 0;
        let start = if other(f0) {
            Some(next)
        } else if self.bytes[pos] == b' ' && next < len && other(f1) {
            Some(next + w1)
        } else {
            None
        };
        if let Some(start) = start {
            let end = self.run(start, S | L | N, true, INF);
            return self.run(end, CR | LF, false, INF);
        }
        // What is left is whitespace. `\s*[\r\n]+`: through the run's last CR or LF;
        // `\s+(?!\S)`: the run, less its last character unless the text ends with it; `\s+`.
        let run = self.whitespace(pos, false).expect("any character");
        match run.after_newline {
            Some(e) => e,
            None if run.end == len => run.end,
            None if run.last_start > pos => run.last_start,
            None => run.end,
        }
    }

    /// The run of `\s` characters from `pos`; with `ascii_only`, `None` when a character that decides
    /// where it ends is not ASCII.
    #[inline(always)]
    fn whitespace(&self, pos: usize, ascii_only: bool) -> Option<Whitespace> {
        let mut run = Whitespace {
            end: pos,
            last_start: pos,
            after_newline: None,
        };
        while run.end < self.bytes.len() {
            let (f, w) = match self.ascii_at(run.end) {
                Ok(Some(f)) => (f, 1),
                Ok(None) => break,
                Err(()) if ascii_only => return None,
                Err(()) => self.flags_at(run.end),
            };
            if f & S == 0 {
                break;
            }
            if f & (CR | LF) != 0 {
                run.after_newline = Some(run.end + w);
            }
            run.last_start = run.end;
            run.end += w;
        }
        Some(run)
    }

    /// The end of GPT-2's match at `pos` (before the end): the alternatives in order, each decided from the
    /// characters at `pos` and after it.
    #[inline]
    fn gpt2(&self, pos: usize) -> usize {
        if self.bytes[pos] == b'\'' {
            if let Some(end) = self.contraction(pos, false) {
                return end;
            }
        }
        let (f0, w0) = self.flags_at(pos);
        // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`: the class of the character after an optional
        // space.
        let (class_at, f) = if self.bytes[pos] == b' ' && pos + 1 < self.bytes.len() {
            (pos + 1, self.flags_at(pos + 1).0)
        } else {
            (pos, f0)
        };
        if f & L != 0 {
            return self.letters(class_at);
        }
        for (mask, negated) in [(N, false), (S | L | N, true)] {
            if (f & mask != 0) != negated {
                return self.run(class_at, mask, negated, INF);
            }
        }
        // Whitespace: `\s+(?!\S)` (the run, less its last character unless the text ends with it), `\s+`.
        let run = self.whitespace(pos, false).expect("any character");
        match () {
            _ if run.end == self.bytes.len() => run.end,
            _ if run.last_start > pos => run.last_start,
            _ => run.end.max(pos + w0),
        }
    }

    /// The flags of the character at `i`: `Ok(None)` at the end of the text, `Err(())` when it is not
    /// ASCII.
    #[inline(always)]
    fn ascii_at(&self, i: usize) -> Result<Option<u32>, ()> {
        match self.bytes.get(i) {
            None => Ok(None),
            Some(&b) if b < 0x80 => Ok(Some(self.ascii[b as usize])),
            Some(_) => Err(()),
        }
    }

    /// The end of the ASCII run from `i` of characters with a flag in `mask` (none of them when
    /// `negated`), at most `max` of them; `None` when a character that would decide where it ends is not
    /// ASCII.
    #[inline(always)]
    fn ascii_run(&self, mut i: usize, mask: u32, negated: bool, max: usize) -> Option<usize> {
        let start = i;
        while i - start < max {
            match self.ascii_at(i).ok()? {
                Some(f) if (f & mask != 0) != negated => i += 1,
                _ => break,
            }
        }
        Some(i)
    }

    /// The end of o200k's or cl100k's match at `pos` when the characters that decide it are ASCII,
    /// `None` when one is not. In ASCII every letter is upper or lower case and none is both, so o200k's
    /// first two alternatives (`P? U* W+ C?`, `P? U+ W* C?`; `P` one character but CR, LF, a letter or a
    /// number) both end after the upper-case run and the lower-case run after it, then an optional
    /// contraction; cl100k's (`'(?i:…)`, then `P?+ \p{L}++`) after the letters. Then `\p{N}{1,3}`,
    /// ` ?[^\s\p{L}\p{N}]+` and its tail (`[\r\n/]*`, `[\r\n]*`), then the whitespace rules: cl100k
    /// takes a run that ends the text whole (`\s++$`) before it looks for the last CR or LF.
    #[inline(always)]
    fn ascii_scan<const O200K: bool>(&self, pos: usize) -> Option<usize> {
        let o200k = O200K;
        let f0 = self.ascii_at(pos).ok()??;
        if !o200k && self.bytes[pos] == b'\'' {
            if let Some(end) = self.contraction(pos, true) {
                return Some(end);
            }
        }
        let letters_at = if f0 & L != 0 {
            Some(pos)
        } else if f0 & (CR | LF | N) == 0 {
            self.ascii_at(pos + 1)
                .ok()?
                .and_then(|f1| (f1 & L != 0).then_some(pos + 1))
        } else {
            None
        };
        if let Some(q) = letters_at {
            if !o200k {
                return self.ascii_range_run(q, (b'a', b'z', 0x20), L);
            }
            // Most words start lower-case: their upper-case run is empty, no block test needed.
            let upper = if self.bytes[q].is_ascii_lowercase() {
                q
            } else {
                self.ascii_range_run(q, (b'A', b'Z', 0), LU)?
            };
            let end = self.ascii_range_run(upper, (b'a', b'z', 0), LL)?;
            return Some(self.contraction(end, true).unwrap_or(end));
        }
        if f0 & N != 0 {
            return self.ascii_run(pos, N, false, 3);
        }
        let other = |f: u32| f & (S | L | N) == 0;
        let start = if other(f0) {
            Some(pos + 1)
        } else if self.bytes[pos] == b' ' {
            self.ascii_at(pos + 1)
                .ok()?
                .and_then(|f1| other(f1).then_some(pos + 2))
        } else {
            None
        };
        if let Some(start) = start {
            let mut end = self.ascii_run(start, S | L | N, true, usize::MAX)?;
            while matches!(self.bytes.get(end), Some(b'\r' | b'\n'))
                || (o200k && self.bytes.get(end) == Some(&b'/'))
            {
                end += 1;
            }
            return Some(end);
        }
        // Whitespace, as in `llama_like`.
        let run = self.whitespace(pos, true)?;
        let at_end = run.end == self.bytes.len();
        Some(match run.after_newline {
            _ if !o200k && at_end => run.end,
            Some(e) => e,
            None if at_end => run.end,
            None if run.last_start > pos => run.last_start,
            None => run.end,
        })
    }

    /// The end of the longest run from `pos` of at most `max` characters with a flag in `mask` (none of
    /// them when `negated`).
    #[inline(always)]
    fn run(&self, mut pos: usize, mask: u32, negated: bool, max: u32) -> usize {
        let mut count = 0;
        while count < max && pos < self.bytes.len() {
            let (f, w) = self.flags_at(pos);
            if (f & mask != 0) == negated {
                break;
            }
            pos += w;
            count += 1;
        }
        pos
    }

    /// The end of the run of `\p{L}` from `pos`: eight ASCII letters at a time while there are eight,
    /// then one character at a time.
    #[inline(always)]
    fn letters(&self, pos: usize) -> usize {
        match self.ascii_blocks(pos, b'a', b'z', 0x20) {
            (end, true) => end,
            (from, false) => self.run(from, L, false, INF),
        }
    }

    /// Eight bytes at a time from `pos` while each, with `fold` OR-ed in, is in `lo..=hi` (an ASCII
    /// range): `(end, true)` when a block shows where the run ends (its first byte outside the range,
    /// all before it ASCII), else `(where to go on one character at a time, false)`: a block with a byte
    /// of 0x80 or more, or fewer than eight bytes left. SWAR: with every byte below 0x80, adding
    /// `0x80 - lo` sets a byte's high bit iff it is `>= lo`, and no carry crosses a byte.
    #[inline(always)]
    fn ascii_blocks(&self, mut pos: usize, lo: u8, hi: u8, fold: u8) -> (usize, bool) {
        const HIGH: u64 = 0x8080_8080_8080_8080;
        const ONES: u64 = 0x0101_0101_0101_0101;
        while let Some(eight) = self.bytes.get(pos..pos + 8) {
            let w = u64::from_le_bytes(eight.try_into().expect("8 bytes"));
            if w & HIGH != 0 {
                break;
            }
            let v = w | (fold as u64 * ONES);
            let at_least_lo = (v + (0x80 - lo as u64) * ONES) & HIGH;
            let above_hi = (v + (0x80 - hi as u64 - 1) * ONES) & HIGH;
            let inside = at_least_lo & !above_hi;
            if inside != HIGH {
                return (pos + ((!inside & HIGH).trailing_zeros() / 8) as usize, true);
            }
            pos += 8;
        }
        (pos, false)
    }

    /// [`Matcher::ascii_run`] of the characters `lo..=hi` (with `fold` OR-ed in) flagged `mask`, eight
    /// at a time first.
    #[inline(always)]
    fn ascii_range_run(
        &self,
        pos: usize,
        (lo, hi, fold): (u8, u8, u8),
        mask: u32,
    ) -> Option<usize> {
        match self.ascii_blocks(pos, lo, hi, fold) {
            (end, true) => Some(end),
            (from, false) => self.ascii_run(from, mask, false, usize::MAX),
        }
    }

    /// Whether the character at `pos` is in range set `set`.
    fn in_set(&self, set: u16, pos: usize) -> bool {
        let c = self.decode(pos).0;
        let ranges = &self.sets[set as usize];
        let k = ranges.partition_point(|r| r.0 <= c);
        k > 0 && c <= ranges[k - 1].1
    }

    /// `'s|'t|'re|'ve|'m|'ll|'d` at `pos`: the end of the one that matches (they exclude each other).
    /// The test for the `'` inlined where it is called (after every o200k word), the rest a call.
    #[inline(always)]
    fn contraction(&self, pos: usize, case_insensitive: bool) -> Option<usize> {
        if self.bytes.get(pos) != Some(&b'\'') {
            return None;
        }
        self.contraction_after_quote(pos, case_insensitive)
    }

    #[inline(never)]
    fn contraction_after_quote(&self, pos: usize, case_insensitive: bool) -> Option<usize> {
        // Each letter's flag, and the letter itself for the case-sensitive form.
        let letter = |at: usize, flag: u32, ch: u8| -> Option<usize> {
            if at >= self.bytes.len() {
                return None;
            }
            if case_insensitive {
                let (f, w) = self.flags_at(at);
                (f & flag != 0).then_some(at + w)
            } else {
                (self.bytes[at] == ch).then_some(at + 1)
            }
        };
        let p = pos + 1;
        for (flag, ch) in [
            (FOLD_S, b's'),
            (FOLD_T, b't'),
            (FOLD_M, b'm'),
            (FOLD_D, b'd'),
        ] {
            if let Some(e) = letter(p, flag, ch) {
                return Some(e);
            }
        }
        for [(f1, c1), (f2, c2)] in [
            [(FOLD_R, b'r'), (FOLD_E, b'e')],
            [(FOLD_V, b'v'), (FOLD_E, b'e')],
            [(FOLD_L, b'l'), (FOLD_L, b'l')],
        ] {
            if let Some(e) = letter(p, f1, c1).and_then(|q| letter(q, f2, c2)) {
                return Some(e);
            }
        }
        None
    }
}
