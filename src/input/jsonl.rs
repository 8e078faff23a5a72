//! Reading JSONL input line by line: numbered from 1, a UTF-8 byte order mark at the start ignored, and
//! a line that is not UTF-8 reported as that line's problem (so it can be named and skipped like any bad
//! line) rather than failing the whole read.

use std::io::BufRead;

/// One line of input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    /// The line number, from 1.
    pub number: usize,
    /// The text without its line ending, or why it is not text.
    pub text: std::result::Result<String, String>,
    /// Input bytes consumed up to the end of this line (for progress).
    pub bytes_read: u64,
}

impl Line {
    /// Whether the line holds nothing but whitespace (a trailing newline, say): no row.
    pub fn is_blank(&self) -> bool {
        self.text.as_ref().is_ok_and(|t| t.trim().is_empty())
    }
}

/// The lines of a reader, as [`Line`]s; an I/O error ends the iteration with `Err`.
pub struct Lines<R> {
    reader: R,
    buffer: Vec<u8>,
    number: usize,
    bytes_read: u64,
}

impl<R: BufRead> Lines<R> {
    pub fn new(reader: R) -> Self {
        Lines {
            reader,
            buffer: Vec::new(),
            number: 0,
            bytes_read: 0,
        }
    }
}

impl<R: BufRead> Iterator for Lines<R> {
    type Item = std::io::Result<Line>;

    fn next(&mut self) -> Option<Self::Item> {
        self.buffer.clear();
        match self.reader.read_until(b'\n', &mut self.buffer) {
            Ok(0) => return None,
            Ok(n) => self.bytes_read += n as u64,
            Err(e) => return Some(Err(e)),
        }
        self.number += 1;
        let mut bytes = self.buffer.as_slice();
        if let Some(rest) = bytes.strip_suffix(b"\n") {
            bytes = rest.strip_suffix(b"\r").unwrap_or(rest);
        }
        if self.number == 1 {
            bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        }
        let text = std::str::from_utf8(bytes).map(str::to_string).map_err(|e| {
            format!(
                "not valid UTF-8 (at byte {} of the line)",
                e.valid_up_to() + 1
            )
        });
        Some(Ok(Line {
            number: self.number,
            text,
            bytes_read: self.bytes_read,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8]) -> Vec<Line> {
        Lines::new(input).map(|l| l.unwrap()).collect()
    }

    #[test]
    fn numbers_endings_bom_and_bad_bytes() {
        let got = lines(b"\xEF\xBB\xBF{\"a\": 1}\r\n\n\xFF\xFEbad\nlast");
        let texts: Vec<_> = got.iter().map(|l| l.text.clone()).collect();
        assert_eq!(texts[0].as_deref(), Ok("{\"a\": 1}"));
        assert_eq!(texts[1].as_deref(), Ok(""));
        assert!(texts[2].as_ref().unwrap_err().contains("UTF-8"));
        assert_eq!(texts[3].as_deref(), Ok("last"));
        assert_eq!(
            got.iter().map(|l| l.number).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        assert!(got[1].is_blank() && !got[2].is_blank());
        assert_eq!(got[3].bytes_read, 24);
        // A BOM is only a BOM at the very start.
        assert!(lines(b"x\n\xEF\xBB\xBFy")[1]
            .text
            .as_ref()
            .unwrap()
            .starts_with('\u{FEFF}'));
    }
}
