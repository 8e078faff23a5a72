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
///
/// Datasets that spell messages otherwise are read by naming their keys and roles: ShareGPT's
/// `{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}` is `key =
/// "conversations"`, `role_key = "from"`, `content_key = "value"`, `role_names = [("human", "user"),
/// ("gpt", "assistant")]`.
#[derive(Clone, Debug)]
pub struct MessageFormat {
    /// The key of the list (default `messages`).
    pub key: String,
    /// The key of a message's role (default `role`).
    pub role_key: String,
    /// The key of a message's text (default `content`).
    pub content_key: String,
    /// Roles as the data spells them, renamed before anything else sees them: the template's `{role}`
    /// and `trained_roles` use the new names (a role not listed keeps its own).
    pub role_names: Vec<(String, String)>,
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
            role_key: "role".into(),
            content_key: "content".into(),
            role_names: Vec::new(),
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

    /// `FROM=TO` (one of [`MessageFormat::role_names`], as a command line writes it).
    pub fn parse_role_name(spec: &str) -> Result<(String, String)> {
        match spec.split_once('=') {
            Some((from, to)) if !from.is_empty() && !to.is_empty() => {
                Ok((from.to_string(), to.to_string()))
            }
            _ => Err(Error::InvalidOption {
                name: "role_names",
                reason: format!("{spec:?} is not FROM=TO (e.g. human=user)"),
            }),
        }
    }

    /// The segments of one conversation.
    pub fn segments(&self, messages: &[Value]) -> std::result::Result<Vec<Segment>, String> {
        let mut out = Vec::with_capacity(messages.len() * 2);
        for (i, message) in messages.iter().enumerate() {
            let Value::Object(message) = message else {
                return Err(format!("{}[{i}] is not an object", self.key));
            };
            let role = string_field(message, &self.role_key)
                .map_err(|e| format!("{}[{i}]: {e}", self.key))?;
            let role = self
                .role_names
                .iter()
                .find(|(from, _)| from == role)
                .map_or(role, |(_, to)| to.as_str());
            let content = string_field(message, &self.content_key)
                .map_err(|e| format!("{}[{i}]: {e}", self.key))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sharegpt_conversations_are_read_by_their_own_keys_and_roles() {
        let mut format = MessageFormat::new(
            Some("<|im_start|>{role}\n{content}<|im_end|>\n"),
            vec!["assistant".into()],
        )
        .unwrap();
        format.key = "conversations".into();
        format.role_key = "from".into();
        format.content_key = "value".into();
        format.role_names = ["human=user", "gpt=assistant"]
            .iter()
            .map(|s| MessageFormat::parse_role_name(s).unwrap())
            .collect();
        let messages = serde_json::json!([
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"}
        ]);
        let segments = format.segments(messages.as_array().unwrap()).unwrap();
        let want = [
            ("<|im_start|>system\n", false),
            ("Be brief.<|im_end|>\n", false),
            ("<|im_start|>user\n", false),
            ("Hi<|im_end|>\n", false),
            ("<|im_start|>assistant\n", false),
            ("Hello<|im_end|>\n", true),
        ];
        assert_eq!(
            segments,
            want.map(|(t, f)| (t.to_string(), f)).to_vec(),
            "system keeps its name, human and gpt are renamed, the renamed role is trained"
        );
        let err = format
            .segments(
                serde_json::json!([{"role": "user", "value": "x"}])
                    .as_array()
                    .unwrap(),
            )
            .unwrap_err();
        assert_eq!(err, "conversations[0]: missing key \"from\"");
        for bad in ["human", "=user", "human=", ""] {
            assert!(MessageFormat::parse_role_name(bad).is_err(), "{bad}");
        }
    }
}
