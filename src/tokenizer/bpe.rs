//! Byte-level BPE vocabularies (`tokenizer.ggml.model = "gpt2"`) and their pre-tokenizers.

use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::{SplitDelimiterBehavior, Tokenizer};

use crate::error::{Error, Result};

/// The regex that splits text before BPE, by `tokenizer.ggml.pre` (llama.cpp's names).
pub fn pre_tokenizer_regex(pre: &str) -> &'static str {
    match pre {
        // Llama 3: contractions, letter runs with one leading non-letter, 1-3 digits, ...
        "llama-bpe" | "llama3" | "llama-v3" | "smaug-bpe" => {
            r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
        }
        // Qwen2: as Llama 3 but single digits.
        "qwen2" | "deepseek-r1-qwen" => {
            r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
        }
        // GPT-2, llama.cpp's default for unknown names.
        _ => r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
    }
}

pub fn build(tokens: &[String], merges: &[&str], pre: &str) -> Result<Tokenizer> {
    let mut vocab = tokenizers::models::bpe::Vocab::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        vocab.entry(t.clone()).or_insert(i as u32);
    }
    let merges = merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| {
                    Error::Tokenizer(format!(
                        "merge {i} ({m:?}) is not two symbols separated by a space"
                    ))
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let ignore_merges = matches!(pre, "llama-bpe" | "llama3" | "llama-v3");
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(|e| Error::Tokenizer(format!("BPE vocabulary: {e}")))?;
    let mut tok = Tokenizer::new(bpe);
    let split = Split::new(
        SplitPattern::Regex(pre_tokenizer_regex(pre).into()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| Error::Tokenizer(format!("pre-tokenizer regex: {e}")))?;
    let pre_tok = tokenizers::pre_tokenizers::sequence::Sequence::new(vec![
        PreTokenizerWrapper::Split(split),
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, false)),
    ]);
    tok.with_pre_tokenizer(Some(pre_tok));
    Ok(tok)
}

/// GPT-2's byte ↔ printable-character table, inverted: the bytes a byte-level symbol encodes.
pub fn decode_byte_level(symbol: &str) -> Vec<u8> {
    symbol
        .chars()
        .map(|c| {
            let c = c as u32;
            let b = match c {
                0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF => c,
                0x100..=0x143 => {
                    // Bytes outside the printable ranges, in order, were mapped to U+0100 upwards.
                    let n = c - 0x100;
                    let mut k = 0;
                    let mut found = 0;
                    for byte in 0u32..256 {
                        if !matches!(byte, 0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF) {
                            if k == n {
                                found = byte;
                                break;
                            }
                            k += 1;
                        }
                    }
                    found
                }
                _ => return None,
            };
            Some(b as u8)
        })
        .collect::<Option<Vec<u8>>>()
        .unwrap_or_else(|| symbol.as_bytes().to_vec())
}
