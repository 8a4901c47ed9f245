//! Tokenizers built from GGUF metadata alone (no tokenizer.json, no network), on the `tokenizers`
//! crate, giving llama.cpp's token ids.
//!
//! - `tokenizer.ggml.model = "llama"`: SentencePiece-style BPE. Merges are derived from the vocab
//!   and its scores (as Hugging Face's SentencePiece converter does), unknown bytes fall back to
//!   `<0xNN>` tokens, a space is prepended to each run of text (`add_space_prefix`).
//! - `tokenizer.ggml.model = "gpt2"`: byte-level BPE with `tokenizer.ggml.merges`, split first by
//!   the regex that `tokenizer.ggml.pre` names (see [`bpe::pre_tokenizer_regex`]).
//!
//! Control tokens (`<s>`, `<|im_start|>`, ...) are matched in text only when asked
//! (`parse_special`); user-defined tokens always are, as in llama.cpp.

mod bpe;
mod spm;
mod stream;

use crate::error::{Error, Result};
use crate::gguf::Metadata;

pub use stream::StreamDecoder;

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TokenType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    fn from_id(v: i64) -> Self {
        match v {
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => Self::Normal,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Spm,
    Bpe,
}

/// A model's tokenizer.
#[derive(Clone)]
pub struct Tokenizer {
    /// Special tokens in text become the special token.
    parse_special: tokenizers::Tokenizer,
    /// Special-token text is tokenized as plain text.
    plain: tokenizers::Tokenizer,
    kind: Kind,
    tokens: Vec<String>,
    types: Vec<TokenType>,
    bos: Option<u32>,
    eos: Option<u32>,
    eog: Vec<u32>,
    add_bos: bool,
    add_eos: bool,
}

impl Tokenizer {
    /// Builds the tokenizer described by the `tokenizer.ggml.*` keys of `md`.
    pub fn from_metadata(md: &Metadata) -> Result<Self> {
        let model = md.str("tokenizer.ggml.model")?;
        let tokens: Vec<String> = md
            .str_array("tokenizer.ggml.tokens")?
            .into_iter()
            .map(String::from)
            .collect();
        if tokens.is_empty() || tokens.len() > u32::MAX as usize / 2 {
            return Err(meta_err(
                md,
                "tokenizer.ggml.tokens",
                format!("{} tokens", tokens.len()),
            ));
        }
        let types: Vec<TokenType> = if md.has("tokenizer.ggml.token_type") {
            md.i64_array("tokenizer.ggml.token_type")?
                .into_iter()
                .map(TokenType::from_id)
                .collect()
        } else {
            vec![TokenType::Normal; tokens.len()]
        };
        if types.len() != tokens.len() {
            return Err(meta_err(
                md,
                "tokenizer.ggml.token_type",
                format!("{} types for {} tokens", types.len(), tokens.len()),
            ));
        }
        let id = |key: &str| -> Result<Option<u32>> {
            Ok(match md.usize_opt(key)? {
                Some(i) if i < tokens.len() => Some(i as u32),
                Some(i) => {
                    return Err(meta_err(
                        md,
                        key,
                        format!("token id {i} is outside the vocabulary of {}", tokens.len()),
                    ))
                }
                None => None,
            })
        };
        let (kind, mut base) = match model {
            "llama" => {
                let scores = if md.has("tokenizer.ggml.scores") {
                    md.f32_array("tokenizer.ggml.scores")?
                } else {
                    vec![0.0; tokens.len()]
                };
                if scores.len() != tokens.len() {
                    return Err(meta_err(
                        md,
                        "tokenizer.ggml.scores",
                        format!("{} scores for {} tokens", scores.len(), tokens.len()),
                    ));
                }
                let add_space_prefix = md
                    .bool_opt("tokenizer.ggml.add_space_prefix")?
                    .unwrap_or(true);
                (
                    Kind::Spm,
                    spm::build(&tokens, &scores, &types, add_space_prefix)?,
                )
            }
            "gpt2" => {
                let merges = md.str_array("tokenizer.ggml.merges")?;
                let pre = md.str_opt("tokenizer.ggml.pre")?.unwrap_or("default");
                (Kind::Bpe, bpe::build(&tokens, &merges, pre)?)
            }
            other => {
                return Err(meta_err(
                    md,
                    "tokenizer.ggml.model",
                    format!("tokenizer '{other}' is not supported (llama and gpt2 are)"),
                ))
            }
        };
        // Control and unknown tokens are special (matched only when parsing special text);
        // user-defined tokens are plain added tokens (always matched), as llama.cpp does.
        let mut special = Vec::new();
        let mut user = Vec::new();
        for (t, ty) in tokens.iter().zip(&types) {
            match ty {
                TokenType::Control | TokenType::Unknown if !t.is_empty() => {
                    special.push(tokenizers::AddedToken::from(t.clone(), true).normalized(false))
                }
                TokenType::UserDefined if !t.is_empty() => {
                    user.push(tokenizers::AddedToken::from(t.clone(), false).normalized(false))
                }
                _ => {}
            }
        }
        base.add_special_tokens(&special);
        base.add_tokens(&user);
        let mut plain = base.clone();
        plain.set_encode_special_tokens(true);

        let (bos, eos) = (
            id("tokenizer.ggml.bos_token_id")?,
            id("tokenizer.ggml.eos_token_id")?,
        );
        let mut eog: Vec<u32> = eos.into_iter().collect();
        for key in ["tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"] {
            eog.extend(id(key)?);
        }
        // llama.cpp also ends generation on these well-known control tokens when present.
        for (i, (t, ty)) in tokens.iter().zip(&types).enumerate() {
            if *ty == TokenType::Control
                && matches!(
                    t.as_str(),
                    "<|eot_id|>"
                        | "<|im_end|>"
                        | "<|end|>"
                        | "<|endoftext|>"
                        | "<|eom_id|>"
                        | "</s>"
                )
            {
                eog.push(i as u32);
            }
        }
        eog.sort_unstable();
        eog.dedup();
        let default_bos = kind == Kind::Spm;
        Ok(Tokenizer {
            parse_special: base,
            plain,
            kind,
            tokens,
            types,
            bos,
            eos,
            eog,
            add_bos: md
                .bool_opt("tokenizer.ggml.add_bos_token")?
                .unwrap_or(default_bos)
                && bos.is_some(),
            add_eos: md
                .bool_opt("tokenizer.ggml.add_eos_token")?
                .unwrap_or(false)
                && eos.is_some(),
        })
    }

    /// Token ids of `text`. `add_special`: add BOS (and EOS) if the vocabulary asks for them;
    /// `parse_special`: special-token text such as `<|im_start|>` becomes that token.
    pub fn encode(&self, text: &str, add_special: bool, parse_special: bool) -> Result<Vec<u32>> {
        let tok = if parse_special {
            &self.parse_special
        } else {
            &self.plain
        };
        let enc = tok
            .encode(text, false)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        let mut ids = Vec::with_capacity(enc.len() + 2);
        if add_special && self.add_bos {
            ids.extend(self.bos);
        }
        ids.extend_from_slice(enc.get_ids());
        if add_special && self.add_eos {
            ids.extend(self.eos);
        }
        Ok(ids)
    }

    /// The bytes token `id` stands for in output text: SentencePiece `▁` becomes a space,
    /// `<0xNN>` the byte NN, byte-level BPE symbols their bytes; control tokens are empty.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(t) = self.tokens.get(id as usize) else {
            return Vec::new();
        };
        match (self.types[id as usize], self.kind) {
            (TokenType::Control | TokenType::Unknown | TokenType::Unused, _) => Vec::new(),
            (TokenType::UserDefined, _) => t.as_bytes().to_vec(),
            (TokenType::Byte, Kind::Spm) => spm::byte_token(t).map(|b| vec![b]).unwrap_or_default(),
            (_, Kind::Spm) => t.replace('\u{2581}', " ").into_bytes(),
            (_, Kind::Bpe) => bpe::decode_byte_level(t),
        }
    }

    /// Text of `ids`, as llama-cpp-python's `detokenize` gives it: control tokens are not shown,
    /// and the leading space after a first BOS is dropped. Invalid UTF-8 becomes U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let mut bytes: Vec<u8> = ids.iter().flat_map(|&id| self.token_bytes(id)).collect();
        if ids.first().is_some_and(|&f| Some(f) == self.bos) && bytes.first() == Some(&b' ') {
            bytes.remove(0);
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    pub fn n_vocab(&self) -> usize {
        self.tokens.len()
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// Whether `encode(.., add_special = true, ..)` puts BOS first.
    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }

    /// End-of-generation tokens: EOS, EOT, EOM and the usual chat terminators.
    pub fn is_end_of_generation(&self, id: u32) -> bool {
        self.eog.binary_search(&id).is_ok()
    }

    /// The text of token `id` as stored in the vocabulary.
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.parse_special
    }
}

fn meta_err(md: &Metadata, key: &str, reason: String) -> Error {
    Error::Metadata {
        path: md.path.clone(),
        key: key.to_string(),
        reason,
    }
}
