//! Stop strings: text that ends generation when it appears in the output (not itself shown).

/// Finds stop strings in streamed text. Text that could be the start of a stop string is held
/// back until the next piece settles it, so no part of a stop string is ever emitted.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    /// Adds `text`; returns the text that can be emitted now, and whether a stop string was
    /// found (then the text before it is returned, and everything after it is dropped).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        self.held.push_str(text);
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s)).min() {
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, true);
        }
        let keep = self
            .stops
            .iter()
            .map(|s| longest_prefix_suffix(&self.held, s))
            .max()
            .unwrap_or(0);
        let rest = self.held.split_off(self.held.len() - keep);
        (std::mem::replace(&mut self.held, rest), false)
    }

    /// The text still held back (generation ended without completing a stop string).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// The length of the longest proper prefix of `stop` that `text` ends with.
fn longest_prefix_suffix(text: &str, stop: &str) -> usize {
    stop.char_indices()
        .map(|(i, _)| i)
        .skip(1)
        .filter(|&k| text.ends_with(&stop[..k]))
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::StopMatcher;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let mut m = StopMatcher::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in pieces {
            let (t, hit) = m.push(p);
            out += &t;
            if hit {
                return (out, true);
            }
        }
        out += &m.finish();
        (out, false)
    }

    #[test]
    fn stops_across_pieces_and_never_shows_the_stop_text() {
        assert_eq!(
            run(&["\n\nUser:"], &["Hi", " there\n", "\nUs", "er: x"]),
            ("Hi there".into(), true)
        );
        assert_eq!(run(&["END"], &["aEN", "Db"]), ("a".into(), true));
    }

    #[test]
    fn held_text_comes_out_when_it_is_not_a_stop() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("xE"), ("x".into(), false));
        assert_eq!(m.push("Nx"), ("ENx".into(), false));
        assert_eq!(run(&["END"], &["aEN"]), ("aEN".into(), false));
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
    }

    #[test]
    fn earliest_stop_wins_and_multibyte_text_is_safe() {
        assert_eq!(run(&["é!", "b"], &["aé!b"]), ("a".into(), true));
        assert_eq!(run(&["éx"], &["ké", "y"]), ("kéy".into(), false));
    }
}
