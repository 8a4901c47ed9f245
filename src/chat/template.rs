//! A chat template: Hugging Face Jinja, rendered with minijinja as `apply_chat_template` does.

use minijinja::{Environment, ErrorKind, Value};

use super::builtin::Builtin;
use super::Message;
use crate::error::{Error, Result};
use crate::gguf::Metadata;
use crate::tokenizer::Tokenizer;

const KEY: &str = "tokenizer.chat_template";
const NAME: &str = "chat_template";

/// Where a template came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TemplateSource {
    /// The file's `tokenizer.chat_template`.
    Gguf,
    /// A built-in format (the file has none).
    Builtin(Builtin),
}

/// A compiled chat template with the special-token texts it is rendered with.
pub struct ChatTemplate {
    env: Environment<'static>,
    text: String,
    source: TemplateSource,
    bos_token: String,
    eos_token: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `text`, to be rendered with `bos_token` and `eos_token`.
    pub fn new(
        text: &str,
        bos_token: &str,
        eos_token: &str,
        source: TemplateSource,
    ) -> std::result::Result<Self, String> {
        let mut env = Environment::new();
        // transformers renders with trim_blocks and lstrip_blocks, and Python's string methods.
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| e.to_string())?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<Value, _> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_function("strftime_now", |fmt: String| {
            super::strftime::format_now(&fmt)
        });
        env.add_template_owned(NAME, text.to_string())
            .map_err(|e| e.to_string())?;
        Ok(ChatTemplate {
            env,
            text: text.to_string(),
            source,
            bos_token: bos_token.to_string(),
            eos_token: eos_token.to_string(),
        })
    }

    /// The file's own template, or `None` when it has none.
    pub fn from_gguf(md: &Metadata, tok: &Tokenizer) -> Result<Option<Self>> {
        let Some(text) = md.str_opt(KEY)? else {
            return Ok(None);
        };
        let (bos, eos) = special_texts(tok);
        Self::new(text, &bos, &eos, TemplateSource::Gguf)
            .map(Some)
            .map_err(|reason| Error::Metadata {
                path: md.path.clone(),
                key: KEY.to_string(),
                reason: format!("the Jinja template does not compile: {reason}"),
            })
    }

    /// A built-in format, with this vocabulary's BOS and EOS texts.
    pub fn builtin(b: Builtin, tok: &Tokenizer) -> Self {
        let (bos, eos) = special_texts(tok);
        match Self::new(b.source(), &bos, &eos, TemplateSource::Builtin(b)) {
            Ok(t) => t,
            // The built-in sources are constants compiled by the unit tests.
            Err(e) => unreachable!("built-in template {} does not compile: {e}", b.name()),
        }
    }

    /// The file's template, or the built-in format its vocabulary suggests when it has none.
    /// A template that does not compile is an error (see [`ChatTemplate::builtin`] to fall back).
    pub fn for_model(md: &Metadata, tok: &Tokenizer) -> Result<Self> {
        Ok(match Self::from_gguf(md, tok)? {
            Some(t) => t,
            None => Self::builtin(Builtin::detect(tok), tok),
        })
    }

    /// The prompt text of `messages`; `add_generation_prompt` appends the header that opens the
    /// assistant's reply. A template's `raise_exception` (e.g. roles that do not alternate)
    /// becomes an [`Error::InvalidRequest`].
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tpl = self
            .env
            .get_template(NAME)
            .map_err(|e| Error::InvalidRequest(format!("chat template: {e}")))?;
        let ctx = minijinja::context! {
            messages => messages
                .iter()
                .map(|m| Value::from_pairs([("role", m.role.as_str()), ("content", m.content.as_str())]))
                .collect::<Value>(),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_str(),
            eos_token => self.eos_token.as_str(),
        };
        tpl.render(ctx).map_err(|e| {
            let msg = match (e.kind(), e.detail()) {
                (ErrorKind::InvalidOperation, Some(d)) => d.to_string(),
                _ => e.to_string(),
            };
            Error::InvalidRequest(format!("chat template: {msg}"))
        })
    }

    /// The Jinja text.
    pub fn text(&self) -> &str {
        &self.text
    }

    pub fn source(&self) -> TemplateSource {
        self.source
    }

    /// What this template is, for messages: "the file's template" or "built-in llama3".
    pub fn describe(&self) -> String {
        match self.source {
            TemplateSource::Gguf => format!("the file's chat template ({KEY})"),
            TemplateSource::Builtin(b) => format!("the built-in {} chat format", b.name()),
        }
    }
}

/// The texts of the vocabulary's BOS and EOS tokens ("" when it has none).
fn special_texts(tok: &Tokenizer) -> (String, String) {
    let text = |id: Option<u32>| {
        id.and_then(|i| tok.token_text(i))
            .unwrap_or_default()
            .to_string()
    };
    (text(tok.bos_id()), text(tok.eos_id()))
}
