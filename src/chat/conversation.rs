//! A multi-turn conversation whose KV cache the caller keeps: each turn says which text is new.

use super::{ChatTemplate, Message};
use crate::error::Result;

/// What to feed the model for a new user turn.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Turn {
    /// The cache holds the conversation so far: feed this text after it (no BOS).
    Continue(String),
    /// The rendering of the conversation does not extend what the cache holds (or nothing is
    /// cached yet): empty the cache and feed this whole prompt.
    Restart(String),
}

/// The messages of one chat, and the rendered text that the caller's KV cache holds.
///
/// A turn renders the whole conversation with the template; when that text starts with what is
/// already cached (the previous prompt followed by the reply, as generated), only the rest is
/// new. Templates that rewrite earlier turns (e.g. trim a reply's whitespace) give a
/// [`Turn::Restart`] instead: slower, never wrong.
#[derive(Clone, Debug, Default)]
pub struct Conversation {
    system: Option<String>,
    messages: Vec<Message>,
    /// Text whose tokens the cache holds.
    cached: String,
    /// Rendered prompt of the turn in progress (becomes `cached` with the reply).
    pending: Option<String>,
}

impl Conversation {
    /// A conversation that opens with `system` as its system prompt, if given.
    pub fn new(system: Option<String>) -> Self {
        let mut c = Conversation {
            system,
            ..Default::default()
        };
        c.reset();
        c
    }

    pub fn messages(&self) -> &[Message] {
        &self.messages
    }

    /// Adds the user's message and says what to feed. On a template error the message is not
    /// kept.
    pub fn user(&mut self, tpl: &ChatTemplate, content: &str) -> Result<Turn> {
        self.messages.push(Message::new("user", content));
        let full = match tpl.render(&self.messages, true) {
            Ok(t) => t,
            Err(e) => {
                self.messages.pop();
                return Err(e);
            }
        };
        let turn = match full.strip_prefix(self.cached.as_str()) {
            Some(rest) if !self.cached.is_empty() && !rest.is_empty() => {
                Turn::Continue(rest.to_string())
            }
            _ => Turn::Restart(full.clone()),
        };
        self.pending = Some(full);
        Ok(turn)
    }

    /// Withdraws the last user message (it could not be sent); the cache is as before it.
    pub fn withdraw(&mut self) {
        if self.pending.take().is_some() {
            self.messages.pop();
        }
    }

    /// Keeps only the system prompt and the last user message (the cache is to be emptied), and
    /// returns the prompt to feed.
    pub fn start_over(&mut self, tpl: &ChatTemplate) -> Result<String> {
        let last = self.messages.pop();
        self.reset();
        self.messages.extend(last);
        let full = tpl.render(&self.messages, true)?;
        self.pending = Some(full.clone());
        Ok(full)
    }

    /// Records the assistant's reply: the cache now holds the turn's prompt followed by the
    /// reply's tokens.
    pub fn assistant(&mut self, reply: &str) {
        if let Some(p) = self.pending.take() {
            self.cached = p + reply;
        }
        self.messages.push(Message::new("assistant", reply));
    }

    /// Forgets every turn (the system prompt stays); the next turn is a [`Turn::Restart`].
    pub fn reset(&mut self) {
        self.messages.clear();
        self.messages.extend(
            self.system
                .as_ref()
                .map(|s| Message::new("system", s.clone())),
        );
        self.cached.clear();
        self.pending = None;
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Builtin, TemplateSource};
    use super::*;

    fn chatml() -> ChatTemplate {
        let b = Builtin::ChatMl;
        ChatTemplate::new(b.source(), "", "", TemplateSource::Builtin(b)).unwrap()
    }

    #[test]
    fn turns_feed_only_what_is_new() {
        let t = chatml();
        let mut c = Conversation::new(Some("S".into()));
        let first = "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n";
        assert_eq!(c.user(&t, "hi").unwrap(), Turn::Restart(first.into()));
        c.assistant("yo");
        assert_eq!(
            c.user(&t, "more").unwrap(),
            Turn::Continue(
                "<|im_end|>\n<|im_start|>user\nmore<|im_end|>\n<|im_start|>assistant\n".into()
            )
        );
        c.assistant("ok");
        assert_eq!(c.messages().len(), 5);
        c.reset();
        assert_eq!(c.messages().len(), 1, "the system prompt stays");
        assert!(matches!(c.user(&t, "again").unwrap(), Turn::Restart(_)));
    }

    #[test]
    fn a_template_that_rewrites_the_reply_restarts() {
        let b = Builtin::Llama3;
        let t = ChatTemplate::new(b.source(), "<B>", "", TemplateSource::Builtin(b)).unwrap();
        let mut c = Conversation::new(None);
        c.user(&t, "hi").unwrap();
        c.assistant("yo\n\n"); // the template trims it
        assert!(matches!(c.user(&t, "x").unwrap(), Turn::Restart(_)));
        c.assistant("fine");
        assert!(matches!(c.user(&t, "y").unwrap(), Turn::Continue(_)));
    }

    #[test]
    fn withdraw_and_start_over() {
        let t = chatml();
        let mut c = Conversation::new(None);
        c.user(&t, "a").unwrap();
        c.assistant("b");
        c.user(&t, "too long").unwrap();
        c.withdraw();
        assert_eq!(c.messages().len(), 2);
        c.user(&t, "c").unwrap();
        let p = c.start_over(&t).unwrap();
        assert_eq!(p, "<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n");
        c.assistant("d");
        assert!(matches!(c.user(&t, "e").unwrap(), Turn::Continue(_)));
    }
}
