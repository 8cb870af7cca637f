//! Language-model views of a compiled artifact on the GPU, shared by `qcc eval/run --device cuda`
//! and `qcc-run eval/generate`: logits of a whole token sequence ([`CudaLm`]) and greedy decoding
//! with the KV cache kept on the device ([`CudaKvDecoder`], for artifacts compiled from a model with
//! `past_key_values.*` inputs and matching `present.*` outputs).

use cudarc::driver::CudaSlice;

use super::{CudaError, CudaExecutor, ExecutorError};
use crate::artifact::{DimExpr, Manifest, SymbolValues};
use crate::RtTensor;

/// Name of the token-id input: `input_ids` when present, else the first input.
fn ids_input(manifest: &Manifest) -> Result<String, ExecutorError> {
    let inputs = &manifest.inputs;
    inputs
        .iter()
        .find(|i| i.name == "input_ids")
        .or_else(|| inputs.iter().find(|i| !i.name.starts_with("past_key_values.")))
        .map(|i| i.name.clone())
        .ok_or_else(|| ExecutorError::Input {
            name: "input_ids".into(),
            what: "the artifact has no token input".into(),
        })
}

/// Name of the logits output: `logits` when present, else the first output.
fn logits_output(manifest: &Manifest) -> Result<String, ExecutorError> {
    let outputs = &manifest.outputs;
    outputs
        .iter()
        .find(|o| o.name == "logits")
        .or(outputs.first())
        .map(|o| o.name.clone())
        .ok_or_else(|| ExecutorError::Input { name: "logits".into(), what: "the artifact has no outputs".into() })
}

fn ids_tensor(ids: &[i64]) -> RtTensor {
    RtTensor::from_vec(&[1, ids.len()], ids.to_vec()).expect("shape matches length")
}

/// Row-major `[positions, vocab]` logits of one sequence.
#[derive(Debug, Clone)]
pub struct SequenceLogits {
    pub vocab: usize,
    pub data: Vec<f32>,
}

impl SequenceLogits {
    fn from_tensor(t: &RtTensor, positions: usize) -> Result<Self, ExecutorError> {
        let vocab = t.shape().last().copied().unwrap_or(0);
        let data: Vec<f32> = t.to_f32().iter().copied().collect();
        if vocab == 0 || data.len() != positions * vocab {
            return Err(ExecutorError::Input {
                name: "logits".into(),
                what: format!("shape {:?}, expected [1, {positions}, vocab]", t.shape()),
            });
        }
        Ok(SequenceLogits { vocab, data })
    }

    pub fn row(&self, position: usize) -> &[f32] {
        &self.data[position * self.vocab..(position + 1) * self.vocab]
    }
}

/// Whole-sequence logits of an artifact (batch 1, no cache).
pub struct CudaLm {
    pub exec: CudaExecutor,
    input: String,
    output: String,
}

impl CudaLm {
    pub fn new(exec: CudaExecutor) -> Result<Self, ExecutorError> {
        let input = ids_input(&exec.manifest)?;
        let output = logits_output(&exec.manifest)?;
        Ok(CudaLm { exec, input, output })
    }

    /// Logits at every position of `ids` (run as one `[1, len]` batch).
    pub fn logits(&mut self, ids: &[i64]) -> Result<SequenceLogits, ExecutorError> {
        let values = self.exec.prepare(&[(self.input.as_str(), ids_tensor(ids))])?;
        self.exec.launch_all(&values)?;
        self.exec.gpu().stream.synchronize().map_err(CudaError::from)?;
        SequenceLogits::from_tensor(&self.exec.read_output(&self.output, &values)?, ids.len())
    }
}

/// One layer cache: the `past_key_values.*` input, the `present.*` output that feeds it next step,
/// and the input's declared dims (`None` for a symbolic one).
struct CacheSlot {
    past: String,
    present: String,
    declared: Vec<Option<usize>>,
    data: Option<(CudaSlice<u8>, Vec<usize>)>,
}

impl CacheSlot {
    /// The cache's shape after `past` positions: the first symbolic dim is the batch (1), the second the
    /// past length (`[batch, heads, past, head_dim]`).
    fn shape(&self, past: usize) -> Vec<usize> {
        let mut symbolic = 0;
        self.declared
            .iter()
            .map(|d| {
                d.unwrap_or_else(|| {
                    symbolic += 1;
                    if symbolic == 1 {
                        1
                    } else {
                        past
                    }
                })
            })
            .collect()
    }
}

/// Greedy decoding with the KV cache on the device: each step copies the previous step's `present.*`
/// outputs device to device into the `past_key_values.*` inputs.
pub struct CudaKvDecoder {
    pub exec: CudaExecutor,
    input: String,
    output: String,
    slots: Vec<CacheSlot>,
    /// Positions already in the cache.
    pub past: usize,
    empty: CudaSlice<u8>,
}

impl CudaKvDecoder {
    /// Whether the artifact takes a KV cache.
    pub fn accepts(manifest: &Manifest) -> bool {
        manifest.inputs.iter().any(|i| i.name.starts_with("past_key_values."))
    }

    pub fn new(exec: CudaExecutor) -> Result<Self, ExecutorError> {
        let input = ids_input(&exec.manifest)?;
        let output = logits_output(&exec.manifest)?;
        let mut slots = Vec::new();
        for io in exec.manifest.inputs.iter().filter(|i| i.name.starts_with("past_key_values.")) {
            let present = io.name.replacen("past_key_values.", "present.", 1);
            if !exec.manifest.outputs.iter().any(|o| o.name == present) {
                return Err(ExecutorError::Input {
                    name: io.name.clone(),
                    what: format!("no matching output `{present}`"),
                });
            }
            let declared = io
                .dims
                .iter()
                .map(|d| match d {
                    DimExpr::Const(c) => usize::try_from(*c).ok(),
                    _ => None,
                })
                .collect();
            slots.push(CacheSlot { past: io.name.clone(), present, declared, data: None });
        }
        if slots.is_empty() {
            return Err(ExecutorError::Input {
                name: "past_key_values.*".into(),
                what: "the artifact takes no KV cache (compile the model's -kv variant)".into(),
            });
        }
        let empty = exec.gpu().stream.alloc_zeros::<u8>(1).map_err(CudaError::from)?;
        Ok(CudaKvDecoder { exec, input, output, slots, past: 0, empty })
    }

    /// Forgets every cached position.
    pub fn reset(&mut self) {
        self.past = 0;
        for slot in &mut self.slots {
            slot.data = None;
        }
    }

    /// Binds `ids` after the cached positions and copies inputs and caches in; nothing is launched.
    pub fn prepare(&mut self, ids: &[i64]) -> Result<SymbolValues, ExecutorError> {
        let shapes: Vec<Vec<usize>> = self.slots.iter().map(|s| s.shape(self.past)).collect();
        let device: Vec<(&str, &CudaSlice<u8>, Vec<usize>)> = self
            .slots
            .iter()
            .zip(shapes)
            .map(|(s, shape)| (s.past.as_str(), s.data.as_ref().map_or(&self.empty, |(d, _)| d), shape))
            .collect();
        self.exec.prepare_with_device(&[(self.input.as_str(), ids_tensor(ids))], &device)
    }

    /// After the launches of a step prepared for `fed` tokens: keeps the new caches and returns the
    /// logits of the last position.
    pub fn finish(&mut self, fed: usize, values: &SymbolValues) -> Result<Vec<f32>, ExecutorError> {
        self.exec.gpu().stream.synchronize().map_err(CudaError::from)?;
        let logits = SequenceLogits::from_tensor(&self.exec.read_output(&self.output, values)?, fed)?;
        for slot in &mut self.slots {
            slot.data = Some(self.exec.keep_output(&slot.present, values)?);
        }
        self.past += fed;
        Ok(logits.row(fed - 1).to_vec())
    }

    /// Runs `ids` after everything fed so far; returns the logits of the last position.
    pub fn feed(&mut self, ids: &[i64]) -> Result<Vec<f32>, ExecutorError> {
        let values = self.prepare(ids)?;
        self.exec.launch_all(&values)?;
        self.finish(ids.len(), &values)
    }
}

/// Index of the largest logit (the first of equal ones).
pub fn argmax(row: &[f32]) -> usize {
    row.iter().enumerate().fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| if v > bv { (i, v) } else { (bi, bv) }).0
}

/// Summed negative log-likelihood (f64) of each next token of `ids` under `logits` (one row per
/// position), and the number of predictions.
pub fn next_token_nll(logits: &SequenceLogits, ids: &[i64]) -> Result<(f64, usize), String> {
    let mut nll = 0f64;
    for pos in 0..ids.len().saturating_sub(1) {
        let row = logits.row(pos);
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let lse = max + row.iter().map(|&v| (v as f64 - max).exp()).sum::<f64>().ln();
        let target = usize::try_from(ids[pos + 1])
            .ok()
            .filter(|&t| t < logits.vocab)
            .ok_or_else(|| format!("token id {} outside the vocabulary of {}", ids[pos + 1], logits.vocab))?;
        nll += lse - row[target] as f64;
    }
    Ok((nll, ids.len().saturating_sub(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nll_matches_a_hand_computation() {
        // Two positions over a vocabulary of 3: -log softmax([0, ln 2, 0])[1] = ln 4 - ln 2 = ln 2,
        // and a uniform row gives ln 3.
        let logits = SequenceLogits { vocab: 3, data: vec![0.0, 2f32.ln(), 0.0, 1.0, 1.0, 1.0] };
        let (nll, n) = next_token_nll(&logits, &[0, 1, 2]).unwrap();
        assert_eq!(n, 2);
        assert!((nll - (2f64.ln() + 3f64.ln())).abs() < 1e-6, "{nll}");
        assert!(next_token_nll(&logits, &[0, 5, 1]).unwrap_err().contains("outside the vocabulary"));
        assert_eq!(argmax(&[1.0, 3.0, 3.0, -1.0]), 1);
    }
}
