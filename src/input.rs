//! Reading (prompt, output) pairs from JSONL rows: a prompt key or a [`Template`] filled from the row's
//! fields, and an output key.

use serde_json::{Map, Value};

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
        Ok(Template { parts })
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

fn string_field<'a>(
    row: &'a Map<String, Value>,
    key: &str,
) -> std::result::Result<&'a str, String> {
    match row.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(other) => Err(format!(
            "field \"{key}\" is not a string (it is {})",
            json_kind(other)
        )),
        None => Err(format!("missing key \"{key}\"")),
    }
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// One segment of a row: its text and whether its tokens are trained on.
pub type Segment = (String, bool);

/// How a conversation (a `messages` list of `{"role", "content"}` objects) becomes segments: each
/// message is rendered as `prefix + content + suffix` from a template with `{role}` and `{content}`
/// (e.g. Qwen's `<|im_start|>{role}\n{content}<|im_end|>\n`). The prefix is never trained; the content
/// and suffix are trained for the trained roles (so the model learns to end its turn). Each piece is
/// tokenized separately, so no merge crosses a message boundary and no `{% generation %}` markers are
/// needed to find the assistant tokens.
#[derive(Clone, Debug)]
pub struct MessageFormat {
    /// The key of the list (default `messages`).
    pub key: String,
    prefix: Template,
    suffix: Template,
    /// Roles whose content is trained (default `assistant`).
    pub trained_roles: Vec<String>,
}

impl MessageFormat {
    /// A message template with `{content}` once and optionally `{role}`; `None` renders the content alone.
    pub fn new(template: Option<&str>, trained_roles: Vec<String>) -> Result<Self> {
        let text = template.unwrap_or("{content}");
        let Some(at) = text.find("{content}") else {
            return Err(Error::Template(
                "a message template needs a {content} placeholder".into(),
            ));
        };
        let (prefix, suffix) = (&text[..at], &text[at + "{content}".len()..]);
        let (prefix, suffix) = (Template::parse(prefix)?, Template::parse(suffix)?);
        for name in prefix.fields().chain(suffix.fields()) {
            if name != "role" {
                return Err(Error::Template(format!(
                    "a message template may use {{role}} and {{content}} only, not {{{name}}}"
                )));
            }
        }
        Ok(MessageFormat {
            key: "messages".into(),
            prefix,
            suffix,
            trained_roles,
        })
    }

    /// The segments of one conversation.
    pub fn segments(&self, messages: &[Value]) -> std::result::Result<Vec<Segment>, String> {
        let mut out = Vec::with_capacity(messages.len() * 2);
        for (i, message) in messages.iter().enumerate() {
            let Value::Object(message) = message else {
                return Err(format!("{}[{i}] is not an object", self.key));
            };
            let role =
                string_field(message, "role").map_err(|e| format!("{}[{i}]: {e}", self.key))?;
            let content =
                string_field(message, "content").map_err(|e| format!("{}[{i}]: {e}", self.key))?;
            let fields = Map::from_iter([("role".to_string(), Value::String(role.to_string()))]);
            let trained = self.trained_roles.iter().any(|r| r == role);
            let prefix = self.prefix.render(&fields)?;
            if !prefix.is_empty() {
                out.push((prefix, false));
            }
            out.push((content.to_string() + &self.suffix.render(&fields)?, trained));
        }
        Ok(out)
    }
}

/// How a JSONL row becomes segments: a (prompt, output) pair from keys or a template, or, when the row
/// has the conversation key, its messages.
#[derive(Clone, Debug)]
pub struct RowFormat {
    /// The key of the prompt, used when there is no template.
    pub prompt_key: String,
    /// The key of the output.
    pub output_key: String,
    /// When given, the prompt is this template filled from the row.
    pub template: Option<Template>,
    /// Conversations: rows holding this format's key are read as messages.
    pub messages: Option<MessageFormat>,
}

impl Default for RowFormat {
    fn default() -> Self {
        RowFormat {
            prompt_key: "prompt".into(),
            output_key: "output".into(),
            template: None,
            messages: None,
        }
    }
}

impl RowFormat {
    /// Parse one JSONL line into (prompt, output). The error is a reason; the caller adds the path and line.
    pub fn parse_line(&self, line: &str) -> std::result::Result<(String, String), String> {
        let value: Value =
            serde_json::from_str(line).map_err(|e| format!("malformed JSON: {e}"))?;
        let Value::Object(row) = value else {
            return Err(format!(
                "expected a JSON object, found {}",
                json_kind(&value)
            ));
        };
        let prompt = match &self.template {
            Some(template) => template.render(&row)?,
            None => string_field(&row, &self.prompt_key)?.to_string(),
        };
        let output = string_field(&row, &self.output_key)?.to_string();
        Ok((prompt, output))
    }

    /// Parse one JSONL line into segments: `[(prompt, false), (output, true)]` for a pair, or a
    /// conversation's messages (see [`MessageFormat`]).
    pub fn parse_segments(&self, line: &str) -> std::result::Result<Vec<Segment>, String> {
        if let Some(format) = &self.messages {
            let value: Value =
                serde_json::from_str(line).map_err(|e| format!("malformed JSON: {e}"))?;
            if let Some(messages) = value.get(&format.key) {
                let Value::Array(messages) = messages else {
                    return Err(format!("\"{}\" is not a list", format.key));
                };
                return format.segments(messages);
            }
        }
        let (prompt, output) = self.parse_line(line)?;
        Ok(vec![(prompt, false), (output, true)])
    }

    /// [`RowFormat::parse_segments`] with the error made an [`Error::BadInput`].
    pub fn parse_segments_numbered(
        &self,
        path: &str,
        line: usize,
        text: &str,
    ) -> Result<Vec<Segment>> {
        self.parse_segments(text).map_err(|reason| Error::BadInput {
            path: path.to_string(),
            line,
            reason,
        })
    }

    /// [`RowFormat::parse_line`] with the error made an [`Error::BadInput`] naming `path` and `line` (from 1).
    pub fn parse_numbered(&self, path: &str, line: usize, text: &str) -> Result<(String, String)> {
        self.parse_line(text).map_err(|reason| Error::BadInput {
            path: path.to_string(),
            line,
            reason,
        })
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

    #[test]
    fn conversations_become_segments() {
        let format = RowFormat {
            messages: Some(
                MessageFormat::new(
                    Some("<|im_start|>{role}\n{content}<|im_end|>\n"),
                    vec!["assistant".into()],
                )
                .unwrap(),
            ),
            ..Default::default()
        };
        let line = r#"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}"#;
        assert_eq!(
            format.parse_segments(line).unwrap(),
            vec![
                ("<|im_start|>user\n".to_string(), false),
                ("Hi<|im_end|>\n".to_string(), false),
                ("<|im_start|>assistant\n".to_string(), false),
                ("Hello<|im_end|>\n".to_string(), true),
            ]
        );
        // Pairs still work beside conversations.
        assert_eq!(
            format
                .parse_segments(r#"{"prompt": "a", "output": "b"}"#)
                .unwrap(),
            vec![("a".to_string(), false), ("b".to_string(), true)]
        );
        assert!(format
            .parse_segments(r#"{"messages": [{"role": "user"}]}"#)
            .unwrap_err()
            .contains("content"));
        assert!(MessageFormat::new(Some("{role}: no content"), vec![]).is_err());
        assert!(MessageFormat::new(Some("{name}{content}"), vec![]).is_err());
    }

    #[test]
    fn row_errors_name_the_problem() {
        let f = RowFormat::default();
        assert!(f.parse_line("{").unwrap_err().contains("malformed"));
        assert!(f.parse_line("[1]").unwrap_err().contains("object"));
        assert!(f
            .parse_line(r#"{"prompt": "a"}"#)
            .unwrap_err()
            .contains("missing key \"output\""));
        assert!(f
            .parse_line(r#"{"prompt": 1, "output": "b"}"#)
            .unwrap_err()
            .contains("not a string"));
        assert_eq!(
            f.parse_line(r#"{"prompt": "a", "output": "b"}"#).unwrap(),
            ("a".to_string(), "b".to_string())
        );
    }
}
