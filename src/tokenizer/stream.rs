//! Streaming detokenization: text out as tokens come, never splitting a UTF-8 character.

use super::Tokenizer;

/// Turns ids into text incrementally. Bytes of an incomplete UTF-8 sequence (e.g. the first of
/// the byte-fallback tokens that spell one emoji) are held until the sequence completes.
pub struct StreamDecoder<'a> {
    tok: &'a Tokenizer,
    pending: Vec<u8>,
}

impl<'a> StreamDecoder<'a> {
    pub fn new(tok: &'a Tokenizer) -> Self {
        StreamDecoder {
            tok,
            pending: Vec::new(),
        }
    }

    /// Adds `id`; returns the text that is now complete, if any.
    pub fn push(&mut self, id: u32) -> Option<String> {
        self.pending.extend(self.tok.token_bytes(id));
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            Err(e) if e.error_len().is_some() => self.pending.len(), // invalid, not just incomplete
            Err(e) => e.valid_up_to(),
        };
        if valid == 0 {
            return None;
        }
        let rest = self.pending.split_off(valid);
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending = rest;
        Some(text)
    }

    /// Whatever is left (an incomplete sequence becomes U+FFFD).
    pub fn finish(self) -> String {
        String::from_utf8_lossy(&self.pending).into_owned()
    }
}

#[cfg(test)]
mod tests {
    // Exercised end to end in tests/tokenizer.rs with real vocabularies.
}
