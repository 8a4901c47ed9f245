//! Co-activation tracking: which experts fire together across consecutive layers (the same
//! token) and consecutive tokens (the same layer), and predictions of the next layer's experts
//! from them, for speculative prefetch. What was learned can be saved per model and loaded by the
//! next run, so it starts warm.

use std::path::Path;

use crate::error::{Error, Result};

/// Counts of expert use, learned over the run (and earlier runs when loaded).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CoActivation {
    pub n_expert: usize,
    /// `transitions[l][a * n_expert + b]`: tokens that used expert `a` at layer `l` and `b` at
    /// layer `l + 1`.
    pub transitions: Vec<Vec<u32>>,
    /// `popularity[l][e]`: tokens that used expert `e` at layer `l`.
    pub popularity: Vec<Vec<u32>>,
    /// `stay[l][e]`: times expert `e` at layer `l` was used again by the next token.
    #[serde(default)]
    pub stay: Vec<Vec<u32>>,
    /// `pairs[l][a * n_expert + b]` (`a ≠ b`, symmetric): tokens that used both `a` and `b` at
    /// layer `l` (what `hypura optimize` places side by side). Absent from older files.
    #[serde(default)]
    pub pairs: Vec<Vec<u32>>,
    /// Per layer, each token's experts in the latest forward pass (not saved).
    #[serde(skip)]
    last: Vec<Vec<Vec<usize>>>,
}

/// The file format version of saved co-activation statistics.
const VERSION: u32 = 1;

#[derive(serde::Serialize, serde::Deserialize)]
struct Saved {
    version: u32,
    stats: CoActivation,
}

impl CoActivation {
    pub fn new(n_expert: usize) -> Self {
        CoActivation {
            n_expert,
            ..Default::default()
        }
    }

    fn grow(&mut self, layer: usize) {
        let n = self.n_expert;
        while self.popularity.len() <= layer {
            self.popularity.push(vec![0; n]);
            self.stay.push(vec![0; n]);
            self.transitions.push(vec![0; n * n]);
            self.pairs.push(vec![0; n * n]);
            self.last.push(Vec::new());
        }
    }

    /// Records that at `layer` token `t` used experts `per_token[t]`.
    pub fn observe(&mut self, layer: usize, per_token: &[Vec<usize>]) {
        let n = self.n_expert;
        self.grow(layer);
        for set in per_token {
            for &e in set.iter().filter(|&&e| e < n) {
                self.popularity[layer][e] = self.popularity[layer][e].saturating_add(1);
                for &b in set.iter().filter(|&&b| b < n && b != e) {
                    let c = &mut self.pairs[layer][e * n + b];
                    *c = c.saturating_add(1);
                }
            }
        }
        // Consecutive tokens: within this batch, and from the previous pass's last token.
        let mut prev = self.last[layer].last().cloned();
        for set in per_token {
            if let Some(p) = &prev {
                for &e in p.iter().filter(|&&e| e < n && set.contains(&e)) {
                    self.stay[layer][e] = self.stay[layer][e].saturating_add(1);
                }
            }
            prev = Some(set.clone());
        }
        if layer > 0 && self.last[layer - 1].len() == per_token.len() {
            let trans = &mut self.transitions[layer - 1];
            for (prev, cur) in self.last[layer - 1].iter().zip(per_token) {
                for &a in prev.iter().filter(|&&a| a < n) {
                    for &b in cur.iter().filter(|&&b| b < n) {
                        trans[a * n + b] = trans[a * n + b].saturating_add(1);
                    }
                }
            }
        }
        self.last[layer] = per_token.to_vec();
    }

    /// Up to `width` experts of layer `next` with their estimated probability of being used,
    /// most likely first, given that this pass's tokens used `current` at layer `next - 1`
    /// (ignored for layer 0, which belongs to the next token). For each token, the evidence of
    /// the layer-to-layer transitions (`P(b | a)` averaged over its experts `a`, or the layer's
    /// popularity when there is none) is combined with the chance that the previous token's
    /// experts at `next` are used again; a batch uses `b` if any of its tokens does.
    pub fn predict(&self, next: usize, current: &[Vec<usize>], width: usize) -> Vec<(usize, f64)> {
        let n = self.n_expert;
        if next >= self.popularity.len() || width == 0 {
            return Vec::new();
        }
        let pop = &self.popularity[next];
        let pop_total: f64 = pop.iter().map(|&c| c as f64).sum();
        let per_token_k = self.last[next].first().map_or(1, |s| s.len()).max(1) as f64;
        let prior: Vec<f64> = (0..n)
            .map(|b| {
                if pop_total > 0.0 {
                    (pop[b] as f64 * per_token_k / pop_total).min(1.0)
                } else {
                    0.0
                }
            })
            .collect();
        let transition = |set: &Vec<usize>, b: usize| -> Option<f64> {
            if next == 0 {
                return None;
            }
            let (trans, from) = (&self.transitions[next - 1], &self.popularity[next - 1]);
            let known: Vec<f64> = set
                .iter()
                .filter(|&&a| a < n && from[a] > 0)
                .map(|&a| (trans[a * n + b] as f64 / from[a] as f64).min(1.0))
                .collect();
            (!known.is_empty()).then(|| known.iter().sum::<f64>() / known.len() as f64)
        };
        let repeat: Vec<f64> = (0..n)
            .map(|b| {
                let prev_used = self.last[next].last().is_some_and(|s| s.contains(&b));
                if prev_used && pop[b] > 0 {
                    (self.stay[next][b] as f64 / pop[b] as f64).min(1.0)
                } else {
                    0.0
                }
            })
            .collect();
        let tokens: Vec<Vec<usize>> = if current.is_empty() {
            vec![Vec::new()]
        } else {
            current.to_vec()
        };
        let mut prob = vec![0f64; n];
        for (b, p) in prob.iter_mut().enumerate() {
            let mut none = 1.0;
            for set in &tokens {
                let base = transition(set, b).unwrap_or(prior[b]);
                let used = 1.0 - (1.0 - base) * (1.0 - repeat[b]);
                none *= 1.0 - used;
            }
            *p = 1.0 - none;
        }
        let mut order: Vec<usize> = (0..n).filter(|&e| prob[e] > 0.0).collect();
        order.sort_by(|&a, &b| prob[b].total_cmp(&prob[a]).then(a.cmp(&b)));
        order.truncate(width);
        order.into_iter().map(|e| (e, prob[e])).collect()
    }

    /// Loads statistics saved by [`save`](Self::save); `Ok(None)` if there are none yet or they
    /// were learned for a different shape.
    pub fn load(path: &Path, n_expert: usize) -> Result<Option<Self>> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("read", path, 0, e)),
        };
        let saved: Saved = serde_json::from_str(&text).map_err(|e| {
            Error::InvalidRequest(format!("{}: bad co-activation file: {e}", path.display()))
        })?;
        let s = saved.stats;
        let shape_ok = s.n_expert == n_expert
            && s.popularity.len() == s.transitions.len()
            && s.popularity.len() == s.stay.len()
            && s.stay.iter().all(|p| p.len() == n_expert)
            && s.popularity.iter().all(|p| p.len() == n_expert)
            && s.transitions.iter().all(|t| t.len() == n_expert * n_expert);
        if saved.version != VERSION || !shape_ok {
            return Ok(None);
        }
        let mut s = s;
        let layers = s.popularity.len();
        if s.pairs.len() != layers || s.pairs.iter().any(|p| p.len() != n_expert * n_expert) {
            // Written before pairs were counted (or damaged): start them afresh.
            s.pairs = vec![vec![0; n_expert * n_expert]; layers];
        }
        s.last = vec![Vec::new(); layers];
        Ok(Some(s))
    }

    /// Writes the statistics to `path` (atomically: a temporary file, then a rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io("create dir", dir, 0, e))?;
        }
        let text = serde_json::to_string(&Saved {
            version: VERSION,
            stats: self.clone(),
        })
        .map_err(|e| Error::InvalidRequest(format!("serialising co-activation: {e}")))?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text).map_err(|e| Error::io("write", &tmp, 0, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io("rename", path, 0, e))
    }

    /// Tokens observed at layer 0 (how much has been learned).
    /// `[l][e]`: the share of layer `l`'s expert uses that went to expert `e` (each layer with
    /// any use sums to 1; layers never seen are left out from there on).
    pub fn routing_shares(&self) -> Vec<Vec<f64>> {
        self.popularity
            .iter()
            .map_while(|p| {
                let total: u64 = p.iter().map(|&c| c as u64).sum();
                (total > 0).then(|| p.iter().map(|&c| c as f64 / total as f64).collect())
            })
            .collect()
    }

    pub fn tokens_seen(&self) -> u64 {
        self.popularity
            .first()
            .map_or(0, |p| p.iter().map(|&c| c as u64).sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learns_a_layer_to_layer_pattern() {
        let mut c = CoActivation::new(4);
        // Expert e at layer 0 is always followed by expert (e + 1) % 4 at layer 1.
        for step in 0..40 {
            let e = step % 4;
            c.observe(0, &[vec![e]]);
            c.observe(1, &[vec![(e + 1) % 4]]);
        }
        for e in 0..4 {
            let p = c.predict(1, &[vec![e]], 1);
            assert_eq!(p[0].0, (e + 1) % 4);
            assert!(p[0].1 > 0.99, "{p:?}");
        }
        // Layer 0 of the next token: popularity alone (uniform here), no repeats seen.
        let p = c.predict(0, &[], 4);
        assert_eq!(p.len(), 4);
        assert!(p.iter().all(|&(_, q)| (q - 0.25).abs() < 1e-9), "{p:?}");
        assert!(c.predict(5, &[vec![0]], 2).is_empty(), "unknown layer");
    }

    #[test]
    fn saves_and_loads() {
        let dir = std::env::temp_dir().join(format!("hypura-coact-{}", std::process::id()));
        let path = dir.join("m.json");
        let mut c = CoActivation::new(3);
        c.observe(0, &[vec![0, 2], vec![1, 2]]);
        c.observe(1, &[vec![1, 0], vec![2, 1]]);
        c.save(&path).unwrap();
        let back = CoActivation::load(&path, 3).unwrap().unwrap();
        assert_eq!(back.transitions, c.transitions);
        assert_eq!(back.popularity, c.popularity);
        assert_eq!(back.stay, c.stay);
        assert_eq!(back.pairs, c.pairs);
        assert_eq!(c.pairs[0][2], 1, "experts 0 and 2 together once at layer 0");
        assert_eq!(c.pairs[0][5], 1, "(1, 2)");
        assert_eq!(c.pairs[0][7], 1, "(2, 1): symmetric");
        assert_eq!(c.pairs[0][1], 0, "0 and 1 never together");
        // A file from before pairs were counted loads with zero pairs.
        let mut old: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        old["stats"].as_object_mut().unwrap().remove("pairs");
        std::fs::write(&path, old.to_string()).unwrap();
        let back = CoActivation::load(&path, 3).unwrap().unwrap();
        assert_eq!(back.popularity, c.popularity);
        assert_eq!(back.pairs, vec![vec![0; 9]; 2]);
        assert_eq!(CoActivation::load(&path, 4).unwrap(), None, "other shape");
        assert_eq!(CoActivation::load(&dir.join("none.json"), 3).unwrap(), None);
        std::fs::write(&path, "{not json").unwrap();
        assert!(CoActivation::load(&path, 3).is_err());
        let _ = std::fs::remove_dir_all(dir);
    }
}
