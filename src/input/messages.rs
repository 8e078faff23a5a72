//! Conversations: a `messages` list rendered, message by message, into trainable and untrainable
//! segments.

use serde_json::{Map, Value};

use super::{string_field, Segment, Template};
use crate::{Error, Result};

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
    template: String,
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
            template: text.to_string(),
            trained_roles,
        })
    }

    /// The message template it was made from.
    pub fn template(&self) -> &str {
        &self.template
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
