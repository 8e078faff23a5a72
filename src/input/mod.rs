//! The input stage: JSONL lines ([`jsonl`]), or the rows of a JSON array, a Parquet or Arrow table or a
//! directory of them ([`Source`]), become rows of segments ([`RowFormat`]): a (prompt, output) pair from
//! keys or a [`Template`], or a conversation's messages ([`MessageFormat`]).

pub mod jsonl;
mod messages;
pub mod read;
pub mod source;
mod template;

use serde_json::{Map, Value};

use crate::{Error, Result};

pub use messages::MessageFormat;
pub use read::{read_rows, BadLine, ReadReport, RowChunk, MAX_RECORDED_BAD_LINES};
pub use source::{InputFormat, Source};
pub use template::Template;

/// One segment of a row: its text and whether its tokens are trained on.
pub type Segment = (String, bool);

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

/// A [`RowFormat`] as manifests record it (templates by their text).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FormatInfo {
    pub prompt_key: String,
    pub output_key: String,
    /// The prompt template's text, when there is one.
    pub template: Option<String>,
    pub messages_key: Option<String>,
    pub message_template: Option<String>,
    pub train_roles: Vec<String>,
    /// A message's keys and the roles renamed ([`MessageFormat`]); defaults in manifests written before
    /// they existed.
    #[serde(default = "role_key")]
    pub role_key: String,
    #[serde(default = "content_key")]
    pub content_key: String,
    #[serde(default)]
    pub role_names: Vec<(String, String)>,
}

fn role_key() -> String {
    "role".into()
}

fn content_key() -> String {
    "content".into()
}

impl RowFormat {
    /// What this format is, as manifests record it.
    pub fn info(&self) -> FormatInfo {
        FormatInfo {
            prompt_key: self.prompt_key.clone(),
            output_key: self.output_key.clone(),
            template: self.template.as_ref().map(|t| t.source().to_string()),
            messages_key: self.messages.as_ref().map(|m| m.key.clone()),
            message_template: self.messages.as_ref().map(|m| m.template().to_string()),
            train_roles: self
                .messages
                .as_ref()
                .map(|m| m.trained_roles.clone())
                .unwrap_or_default(),
            role_key: self
                .messages
                .as_ref()
                .map_or_else(role_key, |m| m.role_key.clone()),
            content_key: self
                .messages
                .as_ref()
                .map_or_else(content_key, |m| m.content_key.clone()),
            role_names: self
                .messages
                .as_ref()
                .map(|m| m.role_names.clone())
                .unwrap_or_default(),
        }
    }

    /// Parse one JSONL line into (prompt, output). The error is a reason; the caller adds the path and line.
    pub fn parse_line(&self, line: &str) -> std::result::Result<(String, String), String> {
        let value: Value = serde_json::from_str(line).map_err(malformed)?;
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
    /// conversation's messages (see [`MessageFormat`]) when the conversation key holds a list (a row
    /// without it, or with `null` there, is a pair).
    pub fn parse_segments(&self, line: &str) -> std::result::Result<Vec<Segment>, String> {
        if let Some(format) = &self.messages {
            let value: Value = serde_json::from_str(line).map_err(malformed)?;
            // A null conversation is none (a table's pair rows beside its conversation rows).
            if let Some(messages) = value.get(&format.key).filter(|v| !v.is_null()) {
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

/// A JSON error as a row's reason. A lone UTF-16 surrogate escape (`"\ud800"`, which Python's
/// `json.dumps` writes for a string holding one) gets a plain word: it is no character, so no text.
fn malformed(e: serde_json::Error) -> String {
    let text = e.to_string();
    if text.contains("surrogate") || text.contains("end of hex escape") {
        format!(
            "malformed JSON: {text} (a \\uD800-\\uDFFF escape outside a surrogate pair is not a character)"
        )
    } else {
        format!("malformed JSON: {text}")
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

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(
            format
                .parse_segments(r#"{"messages": null, "prompt": "a", "output": "b"}"#)
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
        for lone in [r#""\ud800""#, r#""\udc00x""#, r#""a\ud800b""#] {
            let line = format!(r#"{{"prompt": {lone}, "output": "b"}}"#);
            let reason = f.parse_line(&line).unwrap_err();
            assert!(
                reason.contains("outside a surrogate pair"),
                "{line}: {reason}"
            );
        }
        assert_eq!(
            f.parse_line(r#"{"prompt": "\ud83d\ude00", "output": "b"}"#)
                .unwrap()
                .0,
            "😀"
        );
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
