//! The character classes the split patterns use, exactly as Oniguruma (the regex engine `tokenizers` runs
//! them with) defines them: `\p{L}`, `\p{N}`, `\s`, the letter subcategories o200k_base names, `\p{M}`,
//! and the characters `(?i:…)` lets stand for the letters of the English contractions.
//!
//! The table is generated from Oniguruma itself (`unicode_table.rs`, written by the ignored test
//! `regenerate_unicode_table`) rather than from another crate's Unicode data, because a different Unicode
//! version would split some text differently; `table_matches_oniguruma` checks every code point in CI.

use std::sync::OnceLock;

pub(crate) const L: u32 = 1 << 0;
pub(crate) const N: u32 = 1 << 1;
/// `\s`.
pub(crate) const S: u32 = 1 << 2;
pub(crate) const LU: u32 = 1 << 3;
pub(crate) const LT: u32 = 1 << 4;
pub(crate) const LL: u32 = 1 << 5;
pub(crate) const LM: u32 = 1 << 6;
pub(crate) const LO: u32 = 1 << 7;
pub(crate) const M: u32 = 1 << 8;
/// `(?i:s)` matches the character (and so on for the other contraction letters).
pub(crate) const FOLD_S: u32 = 1 << 9;
pub(crate) const FOLD_T: u32 = 1 << 10;
pub(crate) const FOLD_R: u32 = 1 << 11;
pub(crate) const FOLD_E: u32 = 1 << 12;
pub(crate) const FOLD_V: u32 = 1 << 13;
pub(crate) const FOLD_M: u32 = 1 << 14;
pub(crate) const FOLD_L: u32 = 1 << 15;
pub(crate) const FOLD_D: u32 = 1 << 16;
/// Single characters the patterns name (not from the table).
pub(crate) const CR: u32 = 1 << 17;
pub(crate) const LF: u32 = 1 << 18;
pub(crate) const SPACE: u32 = 1 << 19;
pub(crate) const SLASH: u32 = 1 << 20;
/// `\p{P}` (punctuation) and `\p{S}` (symbols), for patterns the compiler takes (DeepSeek's).
pub(crate) const P: u32 = 1 << 21;
pub(crate) const SYM: u32 = 1 << 22;
/// Rust's `char::is_numeric`, which `tokenizers`' `Digits` pre-tokenizer splits on (not Oniguruma's
/// `\p{N}`: the Unicode versions differ).
pub(crate) const RUST_NUMERIC: u32 = 1 << 23;

/// What each flag is in Oniguruma's syntax: the generator and the check run these.
#[cfg(test)]
pub(crate) const ONIG_CLASSES: &[(u32, &str)] = &[
    (L, r"\p{L}"),
    (N, r"\p{N}"),
    (S, r"\s"),
    (LU, r"\p{Lu}"),
    (LT, r"\p{Lt}"),
    (LL, r"\p{Ll}"),
    (LM, r"\p{Lm}"),
    (LO, r"\p{Lo}"),
    (M, r"\p{M}"),
    (FOLD_S, "(?i:s)"),
    (FOLD_T, "(?i:t)"),
    (FOLD_R, "(?i:r)"),
    (FOLD_E, "(?i:e)"),
    (FOLD_V, "(?i:v)"),
    (FOLD_M, "(?i:m)"),
    (FOLD_L, "(?i:l)"),
    (FOLD_D, "(?i:d)"),
    (P, r"\p{P}"),
    (SYM, r"\p{S}"),
];

mod table {
    include!("unicode_table.rs");
}

fn specials(c: u32) -> u32 {
    let numeric = match char::from_u32(c) {
        Some(ch) if ch.is_numeric() => RUST_NUMERIC,
        _ => 0,
    };
    numeric
        | match c {
            0x0D => CR,
            0x0A => LF,
            0x20 => SPACE,
            0x2F => SLASH,
            _ => 0,
        }
}

/// Flags of code points below 0x10000 one lookup away (the text models see is overwhelmingly there);
/// the rest by binary search in the range table.
struct Tables {
    bmp: Vec<u32>,
}

fn tables() -> &'static Tables {
    static T: OnceLock<Tables> = OnceLock::new();
    T.get_or_init(|| {
        let mut bmp = vec![0u32; 0x10000];
        let ranges = table::RANGES;
        for (k, &(start, flags)) in ranges.iter().enumerate() {
            let end = ranges.get(k + 1).map_or(0x110000, |r| r.0);
            for c in start.min(0x10000)..end.min(0x10000) {
                bmp[c as usize] = flags;
            }
        }
        for (c, f) in bmp.iter_mut().enumerate() {
            *f |= specials(c as u32);
        }
        Tables { bmp }
    })
}

/// The flags of one code point.
#[inline]
pub(crate) fn flags(c: u32) -> u32 {
    if c < 0x10000 {
        return tables().bmp[c as usize];
    }
    let ranges = table::RANGES;
    let k = ranges.partition_point(|r| r.0 <= c);
    let table = if k == 0 { 0 } else { ranges[k - 1].1 };
    table | specials(c)
}

/// Flags of the ASCII characters, for the scanner's fast path.
pub(crate) fn ascii_flags() -> [u32; 128] {
    let mut out = [0u32; 128];
    for (c, f) in out.iter_mut().enumerate() {
        *f = flags(c as u32);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokenizers::utils::SysRegex;

    /// Every code point except the surrogates, in order, and each one's byte offset.
    fn all_chars() -> (String, Vec<(usize, u32)>) {
        let mut text = String::new();
        let mut offsets = Vec::new();
        for c in (0..0x110000u32).filter_map(char::from_u32) {
            offsets.push((text.len(), c as u32));
            text.push(c);
        }
        (text, offsets)
    }

    /// Oniguruma's flags for every code point (index = code point; surrogates 0).
    fn oniguruma_flags() -> Vec<u32> {
        let (text, offsets) = all_chars();
        let mut out = vec![0u32; 0x110000];
        for &(flag, class) in ONIG_CLASSES {
            let re = SysRegex::new(class).unwrap();
            for (start, end) in re.find_iter(&text) {
                let first = offsets.partition_point(|&(o, _)| o < start);
                for &(o, c) in &offsets[first..] {
                    if o >= end {
                        break;
                    }
                    out[c as usize] |= flag;
                }
            }
        }
        out
    }

    #[test]
    fn table_matches_oniguruma() {
        let want = oniguruma_flags();
        let mut wrong = Vec::new();
        for c in (0..0x110000u32).filter(|&c| char::from_u32(c).is_some()) {
            let got = flags(c) & !(CR | LF | SPACE | SLASH | RUST_NUMERIC);
            if got != want[c as usize] {
                wrong.push(format!(
                    "U+{c:04X}: table {got:#x}, Oniguruma {:#x}",
                    want[c as usize]
                ));
            }
        }
        assert!(
            wrong.is_empty(),
            "{} code points differ (regenerate with `cargo test --lib regenerate_unicode_table -- --ignored`): {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(20)]
        );
        assert_eq!(flags(b'\r' as u32) & CR, CR);
        assert_eq!(flags(b' ' as u32) & (SPACE | S), SPACE | S);
    }

    #[test]
    #[ignore = "writes src/tokenize/fast/unicode_table.rs"]
    fn regenerate_unicode_table() {
        let flags = oniguruma_flags();
        let mut out = String::from(
            "// Generated from Oniguruma by `cargo test --lib regenerate_unicode_table -- --ignored`; do not edit.\n\
             // (start code point, flags) for each run of code points with the same flags, in order.\n\
             pub(super) const RANGES: &[(u32, u32)] = &[\n",
        );
        let mut prev = u32::MAX;
        for (c, &f) in flags.iter().enumerate() {
            // Surrogates take their neighbours' flags: they never occur in a str.
            let f = if (0xD800..0xE000).contains(&c) {
                prev
            } else {
                f
            };
            if f != prev {
                out.push_str(&format!("    (0x{c:X}, 0x{f:X}),\n"));
                prev = f;
            }
        }
        out.push_str("];\n");
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/src/tokenize/fast/unicode_table.rs"
        );
        std::fs::write(path, out).unwrap();
    }
}
