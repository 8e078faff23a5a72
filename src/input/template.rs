//! Prompt templates: text with `{name}` placeholders filled from a row's fields.

use serde_json::{Map, Value};

use super::string_field;
use crate::{Error, Result};

/// A prompt template: text with `{name}` placeholders filled from a row's fields (`{{` and `}}` stand for
/// literal braces, as in Python's `str.format`).
///
/// ```
/// use sft_collate::input::Template;
/// let t = Template::parse("User: {question}\nAssistant: {{think}}").unwrap();
/// let row = serde_json::json!({"question": "2+2?"});
/// assert_eq!(t.render(row.as_object().unwrap()).unwrap(), "User: 2+2?\nAssistant: {think}");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
    source: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Text(String),
    Field(String),
}

impl Template {
    /// Parse a template; an unclosed `{`, a stray `}` or an empty `{}` is an error.
    pub fn parse(text: &str) -> Result<Self> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = text.char_indices().peekable();
        while let Some((at, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|&(_, c)| c) == Some('{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek().map(|&(_, c)| c) == Some('}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let rest = &text[at + 1..];
                    let end = rest.find('}').ok_or_else(|| {
                        Error::Template(format!(
                            "unclosed '{{' at byte {at} (write '{{{{' for a literal brace)"
                        ))
                    })?;
                    let name = &rest[..end];
                    if name.is_empty() || name.contains('{') {
                        return Err(Error::Template(format!(
                            "bad placeholder at byte {at}: {{{name}}}"
                        )));
                    }
                    if !literal.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut literal)));
                    }
                    parts.push(Part::Field(name.to_string()));
                    for _ in 0..name.chars().count() + 1 {
                        chars.next();
                    }
                }
                '}' => {
                    return Err(Error::Template(format!(
                        "stray '}}' at byte {at} (write '}}}}' for a literal brace)"
                    )))
                }
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Text(literal));
        }
        Ok(Template {
            parts,
            source: text.to_string(),
        })
    }

    /// The text it was parsed from.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The placeholder names, in order of appearance.
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Field(name) => Some(name.as_str()),
            Part::Text(_) => None,
        })
    }

    /// Fill the placeholders from `row`; the error names the missing or non-string field.
    pub fn render(&self, row: &Map<String, Value>) -> std::result::Result<String, String> {
        let mut out = String::new();
        for part in &self.parts {
            match part {
                Part::Text(text) => out.push_str(text),
                Part::Field(name) => out.push_str(string_field(row, name)?),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_errors() {
        assert!(Template::parse("a {b").is_err());
        assert!(Template::parse("a } b").is_err());
        assert!(Template::parse("a {} b").is_err());
        let t = Template::parse("{x}{y}").unwrap();
        assert_eq!(t.fields().collect::<Vec<_>>(), ["x", "y"]);
    }

    #[test]
    fn template_with_unicode_around_placeholders() {
        let t = Template::parse("é{q}ü{{}}").unwrap();
        let row = serde_json::json!({"q": "✓"});
        assert_eq!(t.render(row.as_object().unwrap()).unwrap(), "é✓ü{}");
    }
}
