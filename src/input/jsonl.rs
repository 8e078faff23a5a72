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
    /// Input bytes consumed up to the end of this line (for progress; for a line over the limit, up to
    /// where it was found to be).
    pub bytes_read: u64,
}

impl Line {
    /// Whether the line holds nothing but whitespace (a trailing newline, say): no row.
    pub fn is_blank(&self) -> bool {
        self.text.as_ref().is_ok_and(|t| t.trim().is_empty())
    }
}

/// The longest line read, in bytes (256 MiB; a row of a million tokens is a few MB). A longer one is
/// that line's problem, not a read until memory runs out: a file with no line breaks (a JSON array, a
/// binary file, `/dev/zero`) fails at once, named.
pub const MAX_LINE_BYTES: usize = 256 << 20;

/// The lines of a reader, as [`Line`]s; an I/O error ends the iteration with `Err`.
pub struct Lines<R> {
    reader: R,
    buffer: Vec<u8>,
    number: usize,
    bytes_read: u64,
    max_line: usize,
    /// The last line was over `max_line`: its rest is skipped before the next one.
    overlong: bool,
}

impl<R: BufRead> Lines<R> {
    pub fn new(reader: R) -> Self {
        Self::with_max_line(reader, MAX_LINE_BYTES)
    }

    /// Lines of at most `max_line` bytes (without the line ending).
    pub fn with_max_line(reader: R, max_line: usize) -> Self {
        Lines {
            reader,
            buffer: Vec::new(),
            number: 0,
            bytes_read: 0,
            max_line,
            overlong: false,
        }
    }

    /// Skip the rest of an overlong line, through its line break.
    fn skip_rest(&mut self) -> std::io::Result<()> {
        loop {
            let buffer = self.reader.fill_buf()?;
            let (n, done) = match memchr::memchr(b'\n', buffer) {
                Some(i) => (i + 1, true),
                None => (buffer.len(), buffer.is_empty()),
            };
            self.reader.consume(n);
            self.bytes_read += n as u64;
            if done {
                return Ok(());
            }
        }
    }
}

impl<R: BufRead> Iterator for Lines<R> {
    type Item = std::io::Result<Line>;

    fn next(&mut self) -> Option<Self::Item> {
        if std::mem::take(&mut self.overlong) {
            if let Err(e) = self.skip_rest() {
                return Some(Err(e));
            }
        }
        self.buffer.clear();
        // Room for the longest line, its CR LF, and one byte more that shows it is longer.
        let most = self.max_line as u64 + 3;
        match std::io::Read::take(&mut self.reader, most).read_until(b'\n', &mut self.buffer) {
            Ok(0) => return None,
            Ok(n) => self.bytes_read += n as u64,
            Err(e) => return Some(Err(e)),
        }
        self.number += 1;
        let ended = self.buffer.last() == Some(&b'\n');
        let len = self.buffer.len()
            - usize::from(ended)
            - usize::from(ended && self.buffer.ends_with(b"\r\n"));
        if len > self.max_line {
            // The rest of the line is skipped when the next one is asked for (never, when this error
            // stops the read: an endless input is not read on).
            self.overlong = !ended;
            return Some(Ok(Line {
                number: self.number,
                text: Err(format!(
                    "longer than {} (is the input JSONL, one JSON object per line?)",
                    size_name(self.max_line)
                )),
                bytes_read: self.bytes_read,
            }));
        }
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

/// A size in the largest binary unit that divides it (`256 MiB`), else in bytes.
fn size_name(bytes: usize) -> String {
    match bytes {
        0 => "0 bytes".into(),
        b if b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} bytes"),
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

    /// A line over the limit is that line's error, and the lines after it are read as usual: with and
    /// without a line break, at the limit exactly (CR LF or LF after it), one byte over it, and at the end.
    #[test]
    fn overlong_lines_are_named_and_skipped() {
        let read = |input: &[u8]| -> Vec<(usize, Result<String, String>, u64)> {
            Lines::with_max_line(input, 4)
                .map(|l| l.unwrap())
                .map(|l| (l.number, l.text, l.bytes_read))
                .collect()
        };
        let too_long = || {
            Err::<String, String>(
                "longer than 4 bytes (is the input JSONL, one JSON object per line?)".into(),
            )
        };
        assert_eq!(
            read(b"abcd\r\nabcde\nxy\nabcdefghijklmnop\nz"),
            [
                (1, Ok("abcd".into()), 6),
                (2, too_long(), 12),
                (3, Ok("xy".into()), 15),
                // (Progress: the bytes read when the line was found too long.)
                (4, too_long(), 22),
                (5, Ok("z".into()), 33),
            ]
        );
        assert_eq!(read(b"abcdefghij"), [(1, too_long(), 7)]);
        assert_eq!(read(b"abcd"), [(1, Ok("abcd".into()), 4)]);
        assert_eq!(size_name(MAX_LINE_BYTES), "256 MiB");
    }
}
