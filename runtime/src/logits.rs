//! Logits of one sequence and the scores read from them: shared by `qcc eval` (any executor) and the
//! GPU language-model views (`cuda::lm`, `qcc-run eval/generate`).

use crate::RtTensor;

/// Logits for every position of one sequence, row-major `[positions, vocab]`.
#[derive(Debug, Clone)]
pub struct Logits {
    pub vocab: usize,
    pub data: Vec<f32>,
}

impl Logits {
    /// Reads a `[1, positions, vocab]` (or `[positions, vocab]`) logits tensor.
    pub fn from_tensor(t: &RtTensor, positions: usize) -> Result<Logits, String> {
        let vocab = t.shape().last().copied().unwrap_or(0);
        let data: Vec<f32> = t.to_f32().iter().copied().collect();
        if vocab == 0 || data.len() != positions * vocab {
            return Err(format!("logits have shape {:?}, expected [1, {positions}, vocab]", t.shape()));
        }
        Ok(Logits { vocab, data })
    }

    pub fn row(&self, position: usize) -> &[f32] {
        &self.data[position * self.vocab..(position + 1) * self.vocab]
    }

    /// The logits of one position as their own one-row [`Logits`].
    pub fn last_row(&self) -> Logits {
        let positions = self.data.len() / self.vocab.max(1);
        Logits { vocab: self.vocab, data: self.row(positions.saturating_sub(1)).to_vec() }
    }

    /// log p(token | prefix up to `position`), computed in f64 so long windows sum without drift.
    pub fn log_prob(&self, position: usize, token: u32) -> f64 {
        let row = self.row(position);
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
        row[token as usize] as f64 - max - sum.ln()
    }

    /// The most likely token at `position` (the first of equal ones).
    pub fn argmax(&self, position: usize) -> u32 {
        let row = self.row(position);
        let mut best = 0;
        for (i, &x) in row.iter().enumerate() {
            if x > row[best] {
                best = i;
            }
        }
        best as u32
    }

    /// Summed negative log-likelihood of each next token of `ids` (one row per position), and the
    /// number of predictions.
    pub fn next_token_nll(&self, ids: &[i64]) -> Result<(f64, usize), String> {
        let mut nll = 0f64;
        for pos in 0..ids.len().saturating_sub(1) {
            let target = u32::try_from(ids[pos + 1])
                .ok()
                .filter(|&t| (t as usize) < self.vocab)
                .ok_or_else(|| format!("token id {} outside the vocabulary of {}", ids[pos + 1], self.vocab))?;
            nll -= self.log_prob(pos, target);
        }
        Ok((nll, ids.len().saturating_sub(1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nll_matches_a_hand_computation() {
        // Two positions over a vocabulary of 3: -log softmax([0, ln 2, 0])[1] = ln 4 - ln 2 = ln 2,
        // and a uniform row gives ln 3.
        let logits = Logits { vocab: 3, data: vec![0.0, 2f32.ln(), 0.0, 1.0, 1.0, 1.0] };
        let (nll, n) = logits.next_token_nll(&[0, 1, 2]).unwrap();
        assert_eq!(n, 2);
        assert!((nll - (2f64.ln() + 3f64.ln())).abs() < 1e-6, "{nll}");
        assert!(logits.next_token_nll(&[0, 5, 1]).unwrap_err().contains("outside the vocabulary"));
        let row = Logits { vocab: 4, data: vec![1.0, 3.0, 3.0, -1.0] };
        assert_eq!(row.argmax(0), 1);
        assert_eq!(logits.last_row().data, vec![1.0, 1.0, 1.0]);
    }
}
