//! Language-model views of a compiled artifact on the GPU, shared by `qcc eval/run --device cuda`
//! and `qcc-run eval/generate`: logits of a whole token sequence ([`CudaLm`]) and greedy decoding
//! with the KV cache kept on the device ([`CudaKvDecoder`], for artifacts compiled from a model with
//! `past_key_values.*` inputs and matching `present.*` outputs).

use cudarc::driver::CudaSlice;

use super::executor::DeviceInput;
use super::{CudaError, CudaExecutor, ExecutorError};
use crate::artifact::{DimExpr, Manifest, SymbolValues};
use crate::{Logits, RtTensor};

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

/// `[batch, len]` token ids, every row `ids` (a batch of one prompt: each row decodes the same
/// tokens, which is what a throughput measurement at that batch needs).
fn ids_tensor(ids: &[i64], batch: usize) -> RtTensor {
    RtTensor::from_vec(&[batch, ids.len()], ids.repeat(batch)).expect("shape matches length")
}

/// Reads the logits output of a run that fed `positions` tokens.
fn read_logits(
    exec: &CudaExecutor,
    output: &str,
    values: &SymbolValues,
    positions: usize,
) -> Result<Logits, ExecutorError> {
    Logits::from_tensor(&exec.read_output(output, values)?, positions)
        .map_err(|what| ExecutorError::Input { name: output.to_string(), what })
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
    pub fn logits(&mut self, ids: &[i64]) -> Result<Logits, ExecutorError> {
        let values = self.exec.prepare(&[(self.input.as_str(), ids_tensor(ids, 1))])?;
        self.exec.launch_all(&values)?;
        self.exec.gpu().stream.synchronize().map_err(CudaError::from)?;
        read_logits(&self.exec, &self.output, &values, ids.len())
    }

    /// Name of the token-id input.
    pub fn input_name(&self) -> &str {
        &self.input
    }
}

/// One layer cache: the `past_key_values.*` input, the `present.*` output that feeds it next step,
/// and the input's declared dims (`None` for a symbolic one).
struct CacheSlot {
    past: String,
    present: String,
    declared: Vec<Option<usize>>,
    /// Both in one arena buffer (the plan's resident cache): the step appends in place and nothing
    /// is copied between steps.
    resident: bool,
    data: Option<(CudaSlice<u8>, Vec<usize>)>,
}

impl CacheSlot {
    /// The cache's shape after `past` positions: the first symbolic dim is the batch, the second the
    /// past length (`[batch, heads, past, head_dim]`).
    fn shape(&self, batch: usize, past: usize) -> Vec<usize> {
        let mut symbolic = 0;
        self.declared
            .iter()
            .map(|d| {
                d.unwrap_or_else(|| {
                    symbolic += 1;
                    if symbolic == 1 {
                        batch
                    } else {
                        past
                    }
                })
            })
            .collect()
    }
}

/// Greedy decoding with the KV cache on the device. A resident cache (`past_*` and `present.*` in
/// one buffer, positions outermost: compiler/src/lower/mod.rs `resident_cache`) stays in the arena
/// and each step writes only its new rows; otherwise each step copies the previous step's
/// `present.*` outputs device to device into the `past_key_values.*` inputs.
pub struct CudaKvDecoder {
    pub exec: CudaExecutor,
    input: String,
    output: String,
    slots: Vec<CacheSlot>,
    /// Positions already in the cache.
    pub past: usize,
    /// Sequences decoded side by side (1 unless [`CudaKvDecoder::set_batch`]).
    batch: usize,
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
            let Some(output) = exec.manifest.outputs.iter().find(|o| o.name == present) else {
                return Err(ExecutorError::Input {
                    name: io.name.clone(),
                    what: format!("no matching output `{present}`"),
                });
            };
            let resident = output.buffer == io.buffer;
            let declared = io
                .dims
                .iter()
                .map(|d| match d {
                    DimExpr::Const(c) => usize::try_from(*c).ok(),
                    _ => None,
                })
                .collect();
            slots.push(CacheSlot { past: io.name.clone(), present, declared, resident, data: None });
        }
        if slots.is_empty() {
            return Err(ExecutorError::Input {
                name: "past_key_values.*".into(),
                what: "the artifact takes no KV cache (compile the model's -kv variant)".into(),
            });
        }
        let empty = exec.gpu().stream.alloc_zeros::<u8>(1).map_err(CudaError::from)?;
        Ok(CudaKvDecoder { exec, input, output, slots, past: 0, batch: 1, empty })
    }

    /// Decodes `batch` copies of the sequence side by side from now on (forgets the cache). The
    /// plan must be sized for it (`qcc compile --max-batch`): binding the symbols checks that.
    pub fn set_batch(&mut self, batch: usize) -> Result<(), ExecutorError> {
        if batch == 0 {
            return Err(ExecutorError::Input { name: self.input.clone(), what: "batch 0".into() });
        }
        self.batch = batch;
        self.reset();
        Ok(())
    }

    pub fn batch(&self) -> usize {
        self.batch
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
        let shapes: Vec<Vec<usize>> = self.slots.iter().map(|s| s.shape(self.batch, self.past)).collect();
        let device: Vec<DeviceInput> = self
            .slots
            .iter()
            .zip(shapes)
            .map(|(s, shape)| {
                let data = (!s.resident).then(|| s.data.as_ref().map_or(&self.empty, |(d, _)| d));
                (s.past.as_str(), data, shape)
            })
            .collect();
        self.exec.prepare_with_device(&[(self.input.as_str(), ids_tensor(ids, self.batch))], &device)
    }

    /// After the launches of a step prepared for `fed` tokens: keeps the new caches and returns the
    /// logits of the last position (of the last sequence; with one prompt every sequence has the same).
    pub fn finish(&mut self, fed: usize, values: &SymbolValues) -> Result<Logits, ExecutorError> {
        self.exec.gpu().stream.synchronize().map_err(CudaError::from)?;
        let logits = read_logits(&self.exec, &self.output, values, self.batch * fed)?;
        for slot in self.slots.iter_mut().filter(|s| !s.resident) {
            let reuse = slot.data.take().map(|(buffer, _)| buffer);
            slot.data = Some(self.exec.keep_output(&slot.present, values, reuse)?);
        }
        self.past += fed;
        Ok(logits.last_row())
    }

    /// The cache inputs after `past` positions: (name, shape), e.g. empty caches for `past` = 0.
    pub fn cache_shapes(&self, past: usize) -> Vec<(String, Vec<usize>)> {
        self.slots.iter().map(|s| (s.past.clone(), s.shape(self.batch, past))).collect()
    }

    /// Runs `ids` after everything fed so far; returns the logits of the last position.
    pub fn feed(&mut self, ids: &[i64]) -> Result<Logits, ExecutorError> {
        let values = self.prepare(ids)?;
        self.exec.launch_all(&values)?;
        self.finish(ids.len(), &values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batched_ids_repeat_the_prompt_and_caches_take_the_batch_first() {
        let t = ids_tensor(&[5, 6, 7], 3);
        assert_eq!(t.shape(), &[3, 3]);
        assert_eq!(t.to_f64_vec(), vec![5.0, 6.0, 7.0, 5.0, 6.0, 7.0, 5.0, 6.0, 7.0]);
        assert_eq!(ids_tensor(&[9], 1).shape(), &[1, 1]);
        let slot = CacheSlot {
            past: "past_key_values.0.key".into(),
            present: "present.0.key".into(),
            declared: vec![None, Some(32), None, Some(128)],
            resident: true,
            data: None,
        };
        assert_eq!(slot.shape(16, 515), vec![16, 32, 515, 128]);
        assert_eq!(slot.shape(1, 0), vec![1, 32, 0, 128]);
    }
}
