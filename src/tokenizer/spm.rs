//! SentencePiece-style vocabularies (`tokenizer.ggml.model = "llama"`) as a `tokenizers` BPE.

use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::{Prepend, Replace};
use tokenizers::{NormalizerWrapper, Tokenizer};

use super::TokenType;
use crate::error::{Error, Result};

/// Builds the BPE. Merges are every split `l + r = piece` of a vocabulary piece whose halves are
/// pieces too, ranked by the merged piece's score (highest first; ties in vocabulary order, then by
/// the halves' ids) — Hugging Face's `SentencePieceExtractor` rule, which reproduces
/// SentencePiece's (and llama.cpp's) highest-score-bigram-first merging.
pub fn build(
    tokens: &[String],
    scores: &[f32],
    types: &[TokenType],
    add_space_prefix: bool,
) -> Result<Tokenizer> {
    let mut vocab = ahash_map(tokens);
    let mut merges: Vec<(f32, usize, u32, u32)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if matches!(
            types[id],
            TokenType::Control | TokenType::Byte | TokenType::Unknown | TokenType::Unused
        ) {
            continue;
        }
        let mut local = Vec::new();
        for (i, _) in piece.char_indices().skip(1) {
            let (l, r) = piece.split_at(i);
            if let (Some(&a), Some(&b)) = (vocab.get(l), vocab.get(r)) {
                local.push((a, b));
            }
        }
        local.sort_unstable();
        merges.extend(local.into_iter().map(|(a, b)| (scores[id], id, a, b)));
    }
    // Stable: equal scores keep vocabulary order.
    merges.sort_by(|x, y| y.0.total_cmp(&x.0));
    let merges = merges
        .into_iter()
        .map(|(_, _, a, b)| (tokens[a as usize].clone(), tokens[b as usize].clone()))
        .collect();
    let unk = types
        .iter()
        .position(|t| *t == TokenType::Unknown)
        .map(|i| tokens[i].clone());
    // The vocabulary must hold every piece once; the first id wins for duplicates.
    for (i, t) in tokens.iter().enumerate() {
        vocab.entry(t.clone()).or_insert(i as u32);
    }
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(unk) = unk {
        builder = builder.unk_token(unk);
    }
    let bpe = builder
        .build()
        .map_err(|e| Error::Tokenizer(format!("SentencePiece vocabulary: {e}")))?;
    let mut tok = Tokenizer::new(bpe);
    let replace = Replace::new(" ", "\u{2581}").map_err(|e| Error::Tokenizer(e.to_string()))?;
    let mut norm: Vec<NormalizerWrapper> = Vec::new();
    if add_space_prefix {
        norm.push(Prepend::new("\u{2581}".into()).into());
    }
    norm.push(replace.into());
    tok.with_normalizer(Some(tokenizers::normalizers::Sequence::new(norm)));
    Ok(tok)
}

/// `<0x0A>` → 0x0A.
pub fn byte_token(t: &str) -> Option<u8> {
    let hex = t.strip_prefix("<0x")?.strip_suffix('>')?;
    u8::from_str_radix(hex, 16).ok()
}

fn ahash_map(tokens: &[String]) -> tokenizers::models::bpe::Vocab {
    let mut m = tokenizers::models::bpe::Vocab::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        m.entry(t.clone()).or_insert(i as u32);
    }
    m
}
