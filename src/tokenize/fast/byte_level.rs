//! GPT-2's byte-level alphabet: every byte written as a printable character, as byte-level BPE
//! vocabularies store their tokens. Both directions, built once.

use std::sync::OnceLock;

/// Bytes that stand for themselves (printable Latin-1); the others are mapped to U+0100 and up, in order.
fn printable(b: usize) -> bool {
    (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
}

/// The character each byte is written as.
pub(crate) fn alphabet() -> &'static [char; 256] {
    static TABLE: OnceLock<[char; 256]> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut table = ['\0'; 256];
        let mut next = 256u32;
        for (b, slot) in table.iter_mut().enumerate() {
            *slot = if printable(b) {
                char::from_u32(b as u32).expect("Latin-1 is valid")
            } else {
                next += 1;
                char::from_u32(next - 1).expect("below the surrogates")
            };
        }
        table
    })
}

/// The alphabet inverted: `inverse()[c]` is the byte character `c` stands for (all are below U+0144), or -1.
fn inverse() -> &'static [i16; 0x144] {
    static INVERSE: OnceLock<[i16; 0x144]> = OnceLock::new();
    INVERSE.get_or_init(|| {
        let mut inverse = [-1i16; 0x144];
        for (b, &c) in alphabet().iter().enumerate() {
            inverse[c as usize] = b as i16;
        }
        inverse
    })
}

/// A byte string written in the alphabet.
pub(crate) fn to_byte_level(bytes: &[u8]) -> String {
    let table = alphabet();
    bytes.iter().map(|&b| table[b as usize]).collect()
}

/// The bytes a byte-level token string stands for, or `None` if it has a character outside the alphabet.
pub(crate) fn from_byte_level(token: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(token.len());
    from_byte_level_into(token, &mut out).then_some(out)
}

/// [`from_byte_level`] appending to `out`; false (with part of the token appended) if the token has a
/// character outside the alphabet.
pub(crate) fn from_byte_level_into(token: &str, out: &mut Vec<u8>) -> bool {
    let inverse = inverse();
    for c in token.chars() {
        match inverse.get(c as usize) {
            Some(&b) if b >= 0 => out.push(b as u8),
            _ => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trip() {
        let all: Vec<u8> = (0..=255).collect();
        assert_eq!(
            super::from_byte_level(&super::to_byte_level(&all)),
            Some(all)
        );
        assert_eq!(super::to_byte_level(b" a"), "Ġa");
    }
}
