//! Sampling parameters, their validation, the token sampler and stop strings.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::error::{InferError, Result};

/// Most stop strings a request may give (as OpenAI).
pub const MAX_STOP_STRINGS: usize = 4;

/// How one request's tokens are picked and when it ends (also the wire form between nodes).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SamplingParams {
    /// Most new tokens.
    pub max_tokens: usize,
    /// 0 is greedy. At most 2.
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1: all).
    pub top_p: f32,
    /// Seed of the request's random generator (random when absent).
    pub seed: Option<u64>,
    /// Generation ends before any of these strings; it is not part of the output.
    pub stop: Vec<String>,
    /// Keep generating past the end-of-sequence token (benchmarks).
    pub ignore_eos: bool,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            max_tokens: 256,
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            seed: None,
            stop: Vec::new(),
            ignore_eos: false,
        }
    }
}

impl SamplingParams {
    /// Checks every field; the error names the first wrong one.
    pub fn validate(&self) -> Result<()> {
        if self.max_tokens == 0 {
            return Err(InferError::invalid("max_tokens", "must be at least 1"));
        }
        if !(0.0..=2.0).contains(&self.temperature) {
            return Err(InferError::invalid(
                "temperature",
                "must be between 0 and 2",
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(InferError::invalid(
                "top_p",
                "must be greater than 0 and at most 1",
            ));
        }
        if self.stop.len() > MAX_STOP_STRINGS {
            return Err(InferError::invalid(
                "stop",
                format!("at most {MAX_STOP_STRINGS} stop strings"),
            ));
        }
        if self.stop.iter().any(|s| s.is_empty() || s.len() > 256) {
            return Err(InferError::invalid(
                "stop",
                "stop strings must be 1 to 256 bytes",
            ));
        }
        Ok(())
    }
}

/// Picks tokens from logits for one sequence.
#[derive(Debug)]
pub struct Sampler {
    rng: StdRng,
    temperature: f32,
    top_k: usize,
    top_p: f32,
}

impl Sampler {
    pub fn new(p: &SamplingParams) -> Self {
        let rng = match p.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => rand::make_rng(),
        };
        Self {
            rng,
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
        }
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.temperature <= 0.0 || self.top_k == 1 {
            return crate::model::argmax(logits);
        }
        let mut cand: Vec<(u32, f32)> = logits
            .iter()
            .enumerate()
            .filter(|(_, l)| l.is_finite())
            .map(|(i, &l)| (i as u32, l / self.temperature))
            .collect();
        if cand.is_empty() {
            return crate::model::argmax(logits);
        }
        // Highest logit first, lower id first on ties. Only what top-k and top-p need is put in
        // order (a full sort of a 50k vocabulary per token would cost more than the model step
        // of a small model).
        let order = |a: &(u32, f32), b: &(u32, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if self.top_k > 0 && self.top_k < cand.len() {
            cand.select_nth_unstable_by(self.top_k - 1, order);
            cand.truncate(self.top_k);
        }
        let max = cand.iter().fold(f32::NEG_INFINITY, |m, c| m.max(c.1));
        let mut probs: Vec<f32> = cand.iter().map(|(_, l)| (l - max).exp()).collect();
        let sum: f32 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= sum);
        if self.top_p < 1.0 {
            // The nucleus: the most likely tokens until their mass reaches top_p. Order a head
            // of the candidates; widen it until it holds the nucleus (at worst, all of them).
            let mut pairs: Vec<(u32, f32)> =
                cand.iter().zip(&probs).map(|(c, &p)| (c.0, p)).collect();
            let mut head = 64.min(pairs.len());
            let keep = loop {
                if head < pairs.len() {
                    pairs.select_nth_unstable_by(head - 1, order);
                }
                pairs[..head].sort_unstable_by(order);
                let mut acc = 0.0;
                let found = pairs[..head].iter().position(|p| {
                    acc += p.1;
                    acc >= self.top_p
                });
                match found {
                    Some(i) => break i + 1,
                    None if head == pairs.len() => break head,
                    None => head = (head * 4).min(pairs.len()),
                }
            };
            pairs.truncate(keep);
            cand = pairs.iter().map(|&(id, _)| (id, 0.0)).collect();
            probs = pairs.iter().map(|p| p.1).collect();
        }
        let total: f32 = probs.iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        for (i, p) in probs.iter().enumerate() {
            if r < *p {
                return cand[i].0;
            }
            r -= p;
        }
        cand[cand.len() - 1].0
    }
}

/// Watches generated text for stop strings, holding back text that may be the start of one.
#[derive(Debug, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    pending: String,
}

/// What the stop check lets out.
#[derive(Debug, PartialEq, Eq)]
pub enum StopCheck {
    /// Text safe to send now (maybe empty).
    Continue(String),
    /// A stop string was found: the text before it, then the end.
    Stopped(String),
}

impl StopStrings {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            pending: String::new(),
        }
    }

    pub fn push(&mut self, piece: &str) -> StopCheck {
        if self.stops.is_empty() {
            return StopCheck::Continue(piece.to_string());
        }
        self.pending.push_str(piece);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return StopCheck::Stopped(out);
        }
        // Hold back the longest tail that could still grow into a stop string.
        let hold = self
            .stops
            .iter()
            .flat_map(|s| {
                (1..s.len())
                    .filter(|&n| s.is_char_boundary(n) && self.pending.ends_with(&s[..n]))
                    .max()
            })
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        StopCheck::Continue(out)
    }

    /// Text still held back when generation ends for another reason.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_highest_and_lowest_id_on_ties() {
        let p = SamplingParams {
            temperature: 0.0,
            ..Default::default()
        };
        let mut s = Sampler::new(&p);
        assert_eq!(s.sample(&[0.1, 0.9, 0.9, -1.0]), 1);
    }

    #[test]
    fn seeded_sampling_repeats_and_top_k_limits() {
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 2,
            seed: Some(7),
            ..Default::default()
        };
        let logits = [1.0, 3.0, 2.9, 0.0, 2.8];
        let a: Vec<u32> = {
            let mut s = Sampler::new(&p);
            (0..50).map(|_| s.sample(&logits)).collect()
        };
        let mut s = Sampler::new(&p);
        let b: Vec<u32> = (0..50).map(|_| s.sample(&logits)).collect();
        assert_eq!(a, b);
        assert!(a.iter().all(|&t| t == 1 || t == 2), "{a:?}");
        assert!(a.contains(&1) && a.contains(&2));
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        let p = SamplingParams {
            temperature: 1.0,
            top_p: 0.5,
            seed: Some(1),
            ..Default::default()
        };
        let mut s = Sampler::new(&p);
        // token 0 alone has probability > 0.5
        assert!((0..100).all(|_| s.sample(&[5.0, 1.0, 1.0, 1.0]) == 0));
        // A flat distribution over 1000 tokens: the nucleus is the first 500 (ties go to the
        // lower id), wider than the first ordered head of candidates.
        let flat = vec![0.0f32; 1000];
        let picks: Vec<u32> = (0..400).map(|_| s.sample(&flat)).collect();
        assert!(picks.iter().all(|&t| t < 500), "outside the nucleus");
        assert!(picks.iter().any(|&t| t >= 256), "the nucleus was cut short");
    }

    #[test]
    fn validation_names_the_field() {
        let bad = |f: fn(&mut SamplingParams)| {
            let mut p = SamplingParams::default();
            f(&mut p);
            p.validate().err().and_then(|e| e.field())
        };
        assert_eq!(bad(|p| p.max_tokens = 0), Some("max_tokens"));
        assert_eq!(bad(|p| p.temperature = 2.5), Some("temperature"));
        assert_eq!(bad(|p| p.temperature = -0.1), Some("temperature"));
        assert_eq!(bad(|p| p.top_p = 0.0), Some("top_p"));
        assert_eq!(bad(|p| p.stop = vec![String::new()]), Some("stop"));
        assert_eq!(bad(|p| p.stop = vec!["a".into(); 5]), Some("stop"));
        assert_eq!(bad(|_| {}), None);
    }

    #[test]
    fn stop_strings_hold_back_prefixes_and_cut() {
        let mut s = StopStrings::new(vec!["END".into()]);
        assert_eq!(s.push("hello E"), StopCheck::Continue("hello ".into()));
        assert_eq!(s.push("N"), StopCheck::Continue(String::new()));
        assert_eq!(s.push("X"), StopCheck::Continue("ENX".into()));
        assert_eq!(s.push(" bye EN"), StopCheck::Continue(" bye ".into()));
        assert_eq!(s.push("D more"), StopCheck::Stopped(String::new()));
        let mut s = StopStrings::new(vec!["\n\n".into(), "x".into()]);
        assert_eq!(s.push("ab\n"), StopCheck::Continue("ab".into()));
        assert_eq!(s.push("cx"), StopCheck::Stopped("\nc".into()));
        let mut s = StopStrings::new(vec!["é!".into()]);
        assert_eq!(s.push("caf"), StopCheck::Continue("caf".into()));
        assert_eq!(s.push("é"), StopCheck::Continue(String::new()));
        assert_eq!(s.flush(), "é");
    }
}
