//! Perplexity, computed exactly as llama.cpp's `llama-perplexity` does.

use crate::error::{Error, Result};
use crate::models::{LanguageModel, Logits};

#[derive(Clone, Debug)]
pub struct Perplexity {
    pub ppl: f64,
    pub nll_mean: f64,
    pub tokens_scored: usize,
    pub n_chunks: usize,
    /// The running estimate after each chunk (llama-perplexity's `[k]x` values).
    pub per_chunk_running_ppl: Vec<f64>,
}

/// What llama.cpp's `-f` does to a file: drop one trailing newline.
pub fn prepare_text(s: &str) -> &str {
    s.strip_suffix('\n').unwrap_or(s)
}

/// Cuts `tokens` into `floor(len / n_ctx)` chunks; evaluates each from an empty cache with its
/// first token replaced by `bos` (when given); scores positions `n_ctx/2 .. n_ctx-1`, each
/// predicting the next token. `on_chunk(k, running_ppl)` is called after each chunk.
pub fn perplexity(
    model: &mut dyn LanguageModel,
    tokens: &[u32],
    n_ctx: usize,
    bos: Option<u32>,
    on_chunk: &mut dyn FnMut(usize, f64),
) -> Result<Perplexity> {
    if n_ctx < 4 {
        return Err(Error::InvalidRequest(format!(
            "perplexity needs a context of at least 4 tokens, not {n_ctx}"
        )));
    }
    let n_chunks = tokens.len() / n_ctx;
    if n_chunks == 0 {
        return Err(Error::InvalidRequest(format!(
            "{} tokens is less than one chunk of {n_ctx}; give a longer text or a smaller -c",
            tokens.len()
        )));
    }
    let first = n_ctx / 2;
    let (mut nll_sum, mut count) = (0f64, 0usize);
    let mut running = Vec::with_capacity(n_chunks);
    for k in 0..n_chunks {
        let mut chunk = tokens[k * n_ctx..(k + 1) * n_ctx].to_vec();
        if let Some(b) = bos {
            chunk[0] = b;
        }
        model.reset();
        let logits: Vec<Vec<f32>> = model.forward(&chunk, Logits::All)?.to_vec2()?; // [n_ctx, V]
        for j in first..n_ctx - 1 {
            nll_sum += nll(&logits[j], chunk[j + 1] as usize);
            count += 1;
        }
        let ppl = (nll_sum / count as f64).exp();
        running.push(ppl);
        on_chunk(k, ppl);
    }
    let nll_mean = nll_sum / count as f64;
    Ok(Perplexity {
        ppl: nll_mean.exp(),
        nll_mean,
        tokens_scored: count,
        n_chunks,
        per_chunk_running_ppl: running,
    })
}

/// `logsumexp(logits) - logits[target]`, in f64.
fn nll(logits: &[f32], target: usize) -> f64 {
    let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    max + sum.ln() - logits[target] as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// Logits depend on the input token only: token t predicts (t + 1) % V with logit 2, others 0.
    /// It records every chunk it sees.
    struct Fake {
        v: usize,
        seen: Vec<Vec<u32>>,
        n_past: usize,
    }

    impl LanguageModel for Fake {
        fn forward(&mut self, tokens: &[u32], logits: Logits) -> Result<Tensor> {
            self.seen.push(tokens.to_vec());
            self.n_past += tokens.len();
            let rows: Vec<&u32> = match logits {
                Logits::All => tokens.iter().collect(),
                Logits::Last => tokens.last().into_iter().collect(),
            };
            let mut data = vec![0f32; rows.len() * self.v];
            for (i, &&t) in rows.iter().enumerate() {
                data[i * self.v + (t as usize + 1) % self.v] = 2.0;
            }
            Ok(Tensor::from_vec(data, (rows.len(), self.v), &Device::Cpu)?)
        }
        fn reset(&mut self) {
            self.n_past = 0;
        }
        fn n_past(&self) -> usize {
            self.n_past
        }
        fn n_ctx(&self) -> usize {
            1 << 20
        }
        fn n_vocab(&self) -> usize {
            self.v
        }
    }

    #[test]
    fn matches_a_hand_computation() {
        let v = 5;
        let mut m = Fake {
            v,
            seen: vec![],
            n_past: 0,
        };
        // Two chunks of 8; tokens count up except where we break the pattern.
        let tokens: Vec<u32> = vec![0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 3, 1, 2, 3, 4, 9];
        let r = perplexity(&mut m, &tokens, 8, Some(4), &mut |_, _| {}).unwrap();
        assert_eq!(r.n_chunks, 2);
        assert_eq!(r.tokens_scored, 2 * 3, "positions 4, 5, 6 of each chunk");
        assert_eq!(m.seen[0][0], 4, "first token replaced by BOS");
        assert_eq!(m.seen[1], vec![4, 4, 0, 3, 1, 2, 3, 4]);
        // Correct next token: nll = ln(e² + 4) - 2; wrong: ln(e² + 4) - 0.
        let z = (2f64.exp() + 4.0).ln();
        // chunk 0: positions 4,5,6 predict 0,1,2 from 4,0,1: all correct.
        // chunk 1 (4,4,0,3,1,2,3,4): positions 4,5,6 (1,2,3) predict 2,3,4: all correct.
        let expected = ((z - 2.0) * 6.0 / 6.0).exp();
        assert!((r.ppl - expected).abs() < 1e-9, "{} vs {expected}", r.ppl);
        // Break one prediction: chunk 0 position 5 (token 0) now predicts 3 instead of 1.
        let mut t2 = tokens.clone();
        t2[6] = 3;
        let r2 = perplexity(
            &mut Fake {
                v,
                seen: vec![],
                n_past: 0,
            },
            &t2,
            8,
            None,
            &mut |_, _| {},
        )
        .unwrap();
        // position 5 → wrong (z), position 6 (token 3) predicts t2[7] = 2 → wrong (z); 4 correct.
        let expected2 = (((z - 2.0) * 4.0 + z * 2.0) / 6.0).exp();
        assert!(
            (r2.ppl - expected2).abs() < 1e-9,
            "{} vs {expected2}",
            r2.ppl
        );
    }

    #[test]
    fn too_short_is_an_error() {
        let mut m = Fake {
            v: 5,
            seen: vec![],
            n_past: 0,
        };
        assert!(perplexity(&mut m, &[1, 2, 3], 8, None, &mut |_, _| {}).is_err());
        assert_eq!(prepare_text("a\n\n"), "a\n");
    }
}
