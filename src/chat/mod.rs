//! Chat: turning a conversation into the prompt text a model was trained on.
//!
//! Instruction-tuned GGUF files carry their prompt format as a Hugging Face Jinja template
//! (`tokenizer.chat_template`). [`ChatTemplate`] renders it with minijinja the way
//! `transformers`' `apply_chat_template` does (trim_blocks, lstrip_blocks, loop controls,
//! `raise_exception`, `strftime_now`, `bos_token` / `eos_token`, Python string methods). A file
//! without one gets a built-in format chosen from its vocabulary's special tokens
//! ([`Builtin`]: Llama-3 headers, ChatML, Llama-2 `[INST]`).
//!
//! [`encode_prompt`] tokenizes a rendered prompt: special-token text (`<|im_start|>`) becomes the
//! special token, and BOS is added only when the template did not already write it.
//! [`Conversation`] keeps a multi-turn chat and says, turn by turn, which text is new, so a caller
//! that keeps its KV cache feeds only the new turn.

mod builtin;
mod conversation;
pub(crate) mod strftime;
mod template;

pub use builtin::Builtin;
pub use conversation::{Conversation, Turn};
pub use template::{ChatTemplate, TemplateSource};

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::tokenizer::Tokenizer;

/// One message of a conversation (`role` is `system`, `user` or `assistant`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: &str, content: impl Into<String>) -> Self {
        Message {
            role: role.to_string(),
            content: content.into(),
        }
    }
}

/// Token ids of a rendered chat prompt: special-token text is parsed as special tokens, and BOS
/// is put first if the vocabulary asks for it, unless the text already starts with it (templates
/// that write `{{ bos_token }}`), so the model never sees two.
pub fn encode_prompt(tok: &Tokenizer, text: &str) -> Result<Vec<u32>> {
    let mut ids = tok.encode(text, true, true)?;
    if let Some(bos) = tok.bos_id() {
        if tok.adds_bos() && ids.len() >= 2 && ids[0] == bos && ids[1] == bos {
            ids.remove(0);
        }
    }
    Ok(ids)
}
