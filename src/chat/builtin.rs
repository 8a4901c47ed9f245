//! Built-in chat formats for files that carry no `tokenizer.chat_template`, chosen from the
//! special tokens of the vocabulary (as llama.cpp does).

use crate::tokenizer::Tokenizer;

/// A built-in chat format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Builtin {
    /// Llama 3.x: `<|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|>`.
    Llama3,
    /// ChatML (Qwen, many fine-tunes): `<|im_start|>role\ncontent<|im_end|>\n`.
    ChatMl,
    /// Llama 2 / Mistral: `<s>[INST] <<SYS>>\nsystem\n<</SYS>>\n\nuser [/INST] reply </s>`.
    Llama2,
}

/// Meta's Llama-3-Instruct template (`tokenizer_config.json` of Meta-Llama-3-8B-Instruct).
const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}\
{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}\
{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}\
{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

/// ChatML, as llama.cpp writes it.
const CHATML: &str = "{% for message in messages %}\
{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}\
{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/// Meta's Llama-2-chat template: roles must alternate, the system prompt goes inside the first
/// `[INST]`.
const LLAMA2: &str = "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}\
{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}\
{% set system_message = false %}{% endif %}{% for message in loop_messages %}\
{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\
{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}\
{% if loop.index0 == 0 and system_message != false %}\
{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}\
{% else %}{% set content = message['content'] %}{% endif %}\
{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}\
{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";

impl Builtin {
    /// The format a vocabulary was made for: Llama-3 header tokens, else ChatML tokens, else
    /// `[INST]` or a `<s>` BOS (Llama 2, Mistral), else ChatML (llama.cpp's default).
    pub fn detect(tok: &Tokenizer) -> Builtin {
        let has = |t: &str| tok.inner().token_to_id(t).is_some();
        if has("<|start_header_id|>") && has("<|end_header_id|>") && has("<|eot_id|>") {
            Builtin::Llama3
        } else if has("<|im_start|>") && has("<|im_end|>") {
            Builtin::ChatMl
        } else if has("[INST]") || tok.bos_id().and_then(|b| tok.token_text(b)) == Some("<s>") {
            Builtin::Llama2
        } else {
            Builtin::ChatMl
        }
    }

    /// The Jinja text.
    pub fn source(self) -> &'static str {
        match self {
            Builtin::Llama3 => LLAMA3,
            Builtin::ChatMl => CHATML,
            Builtin::Llama2 => LLAMA2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Builtin::Llama3 => "llama3",
            Builtin::ChatMl => "chatml",
            Builtin::Llama2 => "llama2",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::{ChatTemplate, Message, TemplateSource};
    use super::*;

    fn render(b: Builtin, bos: &str, eos: &str, msgs: &[Message], gen: bool) -> String {
        ChatTemplate::new(b.source(), bos, eos, TemplateSource::Builtin(b))
            .unwrap()
            .render(msgs, gen)
            .unwrap()
    }

    fn chat() -> Vec<Message> {
        vec![
            Message::new("system", "Be brief."),
            Message::new("user", "Hi!"),
            Message::new("assistant", "Hello."),
            Message::new("user", "Why is the sky blue?"),
        ]
    }

    // Expected strings are written from each format's documentation (Meta's model cards, the
    // ChatML spec), not produced by the code under test.
    #[test]
    fn llama3_headers_bos_once_and_trimmed_content() {
        let mut msgs = chat();
        msgs[1].content = "  Hi!\n".into();
        let got = render(
            Builtin::Llama3,
            "<|begin_of_text|>",
            "<|end_of_text|>",
            &msgs,
            true,
        );
        assert_eq!(
            got,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nHi!<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>\
             <|start_header_id|>user<|end_header_id|>\n\nWhy is the sky blue?<|eot_id|>\
             <|start_header_id|>assistant<|end_header_id|>\n\n"
        );
        let no_gen = render(Builtin::Llama3, "<|begin_of_text|>", "", &msgs[..2], false);
        assert!(no_gen.ends_with("Hi!<|eot_id|>"), "{no_gen}");
    }

    #[test]
    fn chatml_messages_and_generation_prompt() {
        let got = render(Builtin::ChatMl, "", "", &chat(), true);
        assert_eq!(
            got,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n\
             <|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nWhy is the sky blue?<|im_end|>\n\
             <|im_start|>assistant\n"
        );
        assert!(!render(Builtin::ChatMl, "", "", &chat(), false).ends_with("assistant\n"));
    }

    #[test]
    fn llama2_system_inside_first_inst_and_eos_after_replies() {
        let got = render(Builtin::Llama2, "<s>", "</s>", &chat(), true);
        assert_eq!(
            got,
            "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi! [/INST] Hello. </s>\
             <s>[INST] Why is the sky blue? [/INST]"
        );
        let got = render(Builtin::Llama2, "<s>", "</s>", &chat()[1..2], true);
        assert_eq!(got, "<s>[INST] Hi! [/INST]");
    }

    #[test]
    fn llama2_raise_exception_is_a_request_error() {
        let t = ChatTemplate::new(
            LLAMA2,
            "<s>",
            "</s>",
            TemplateSource::Builtin(Builtin::Llama2),
        )
        .unwrap();
        let two_users = [Message::new("user", "a"), Message::new("user", "b")];
        let e = t.render(&two_users, true).unwrap_err().to_string();
        assert!(e.contains("Conversation roles must alternate"), "{e}");
    }
}
