//! Causal language models on the CPU executor: full-sequence logits for evaluation, and greedy generation
//! with a KV cache through a graph that has `past_key_values.{i}.{key,value}` inputs and
//! `present.{i}.{key,value}` outputs (the convention of Hugging Face exporters).

use crate::eval::{LanguageModel, Logits};
use anyhow::{anyhow, bail, Context};
use qcc_ir::{Dim, Graph, Tensor};
use qcc_runtime::{CpuExecutor, RtTensor};
use std::path::Path;

/// A decoder graph with `input_ids [batch, seq]` in and `logits [batch, seq, vocab]` out.
pub struct CpuLanguageModel {
    executor: CpuExecutor,
    input: String,
    output: String,
}

fn graph_input_names(graph: &Graph) -> Vec<String> {
    graph.graph_inputs().iter().map(|&id| graph.node(id).outputs[0].name.clone()).collect()
}

fn ids_tensor(ids: &[u32]) -> RtTensor {
    RtTensor::from_vec(&[1, ids.len()], ids.iter().map(|&i| i as i64).collect()).expect("shape matches length")
}

fn logits_of(t: &RtTensor, positions: usize) -> anyhow::Result<Logits> {
    Logits::from_tensor(t, positions).map_err(|e| anyhow!(e))
}

impl CpuLanguageModel {
    pub fn new(graph: &Graph) -> anyhow::Result<CpuLanguageModel> {
        let inputs = graph_input_names(graph);
        let input = inputs
            .iter()
            .find(|n| n.as_str() == "input_ids")
            .or(inputs.first())
            .ok_or_else(|| anyhow!("graph '{}' has no inputs", graph.name))?
            .clone();
        let output = graph
            .graph_outputs()
            .iter()
            .find(|o| o.name == "logits")
            .or(graph.graph_outputs().first())
            .ok_or_else(|| anyhow!("graph '{}' has no outputs", graph.name))?
            .name
            .clone();
        Ok(CpuLanguageModel { executor: CpuExecutor::new(graph)?, input, output })
    }
}

impl LanguageModel for CpuLanguageModel {
    fn logits(&mut self, ids: &[u32]) -> anyhow::Result<Logits> {
        let outputs = self.executor.run(&[(self.input.as_str(), ids_tensor(ids))])?;
        let (_, t) =
            outputs.iter().find(|(n, _)| *n == self.output).ok_or_else(|| anyhow!("no '{}' output", self.output))?;
        logits_of(t, ids.len())
    }
}

/// One cached layer input: the name of the past tensor, the present output feeding it next step.
struct CacheSlot {
    past: String,
    present: String,
    value: RtTensor,
}

/// Greedy decoding with a KV cache.
pub struct KvDecoder {
    executor: CpuExecutor,
    cache: Vec<CacheSlot>,
}

impl KvDecoder {
    /// Whether `graph` takes a KV cache.
    pub fn accepts(graph: &Graph) -> bool {
        graph_input_names(graph).iter().any(|n| n.starts_with("past_key_values."))
    }

    pub fn new(graph: &Graph) -> anyhow::Result<KvDecoder> {
        let mut cache = Vec::new();
        for &id in graph.graph_inputs() {
            let info = &graph.node(id).outputs[0];
            let Some(rest) = info.name.strip_prefix("past_key_values.") else { continue };
            let present = format!("present.{rest}");
            if !graph.graph_outputs().iter().any(|o| o.name == present) {
                bail!("graph input '{}' has no matching output '{present}'", info.name);
            }
            // Empty cache: batch 1 and zero past positions; the other extents come from the declared type.
            let shape = info.ty.shape.as_ref().ok_or_else(|| anyhow!("'{}' has no declared shape", info.name))?;
            let dims: Vec<usize> = shape
                .dims()
                .iter()
                .enumerate()
                .map(|(axis, d)| match d {
                    Dim::Known(n) => *n as usize,
                    _ if axis == 0 => 1,
                    _ => 0,
                })
                .collect();
            let zeros = vec![0u8; info.ty.dtype.storage_bytes(dims.iter().product())];
            let value = RtTensor::from_ir_tensor(&Tensor::from_bytes(info.ty.dtype, dims, zeros.into())?)?;
            cache.push(CacheSlot { past: info.name.clone(), present, value });
        }
        Ok(KvDecoder { executor: CpuExecutor::new(graph)?, cache })
    }

    /// Runs `ids` after everything fed so far; returns the logits of the last position.
    pub fn feed(&mut self, ids: &[u32]) -> anyhow::Result<Logits> {
        let mut inputs: Vec<(&str, RtTensor)> = vec![("input_ids", ids_tensor(ids))];
        for slot in &self.cache {
            inputs.push((slot.past.as_str(), slot.value.clone()));
        }
        let mut outputs = self.executor.run(&inputs)?;
        for slot in &mut self.cache {
            let i = outputs.iter().position(|(n, _)| *n == slot.present).context("present output missing")?;
            slot.value = outputs.swap_remove(i).1;
        }
        let logits = outputs.iter().find(|(n, _)| n == "logits").ok_or_else(|| anyhow!("no 'logits' output"))?;
        Ok(logits_of(&logits.1, ids.len())?.last_row())
    }
}

/// Something that continues a sequence: `feed` runs `ids` after everything fed so far and returns the
/// logits of the last position (a KV-cache graph, or a whole-sequence model that recomputes).
pub trait Decoder {
    fn feed(&mut self, ids: &[u32]) -> anyhow::Result<Logits>;
}

impl Decoder for KvDecoder {
    fn feed(&mut self, ids: &[u32]) -> anyhow::Result<Logits> {
        KvDecoder::feed(self, ids)
    }
}

/// A whole-sequence [`LanguageModel`] as a [`Decoder`]: every step recomputes the full sequence.
pub struct Recompute<M: LanguageModel> {
    pub model: M,
    seq: Vec<u32>,
}

impl<M: LanguageModel> Recompute<M> {
    pub fn new(model: M) -> Self {
        Recompute { model, seq: Vec::new() }
    }
}

impl<M: LanguageModel> Decoder for Recompute<M> {
    fn feed(&mut self, ids: &[u32]) -> anyhow::Result<Logits> {
        self.seq.extend_from_slice(ids);
        Ok(self.model.logits(&self.seq)?.last_row())
    }
}

/// Greedy decoding: up to `max_tokens` new tokens after `prompt`, stopping early at `eos`.
pub fn greedy(
    decoder: &mut dyn Decoder,
    prompt: &[u32],
    max_tokens: usize,
    eos: Option<u32>,
) -> anyhow::Result<Vec<u32>> {
    anyhow::ensure!(!prompt.is_empty(), "the prompt encodes to no tokens");
    let mut out = Vec::new();
    let mut logits = decoder.feed(prompt)?;
    for _ in 0..max_tokens {
        let next = logits.argmax(0);
        out.push(next);
        if Some(next) == eos || out.len() == max_tokens {
            break;
        }
        logits = decoder.feed(&[next])?;
    }
    Ok(out)
}

/// Greedy generation on the CPU executor: uses the KV cache when the graph has one, otherwise
/// recomputes the whole sequence each step.
pub fn generate(graph: &Graph, prompt: &[u32], max_tokens: usize, eos: Option<u32>) -> anyhow::Result<Vec<u32>> {
    if KvDecoder::accepts(graph) {
        greedy(&mut KvDecoder::new(graph)?, prompt, max_tokens, eos)
    } else {
        greedy(&mut Recompute::new(CpuLanguageModel::new(graph)?), prompt, max_tokens, eos)
    }
}

/// Compiled artifacts (`model.qcc/` with its GPU plan) on a CUDA device: `qcc eval/run --device cuda`.
pub mod cuda {
    use super::{Decoder, Logits};
    use crate::eval::LanguageModel;
    use anyhow::{anyhow, Context};
    use qcc_runtime::cuda::{CudaExecutor, CudaKvDecoder, CudaLm};
    use std::path::Path;

    /// Loads `artifact` (a `qcc compile -o X.qcc` directory) onto device `ordinal`.
    pub fn load(artifact: &Path, ordinal: usize) -> anyhow::Result<CudaExecutor> {
        if !artifact.join("manifest.json").is_file() {
            return Err(anyhow!(
                "{}: --device cuda runs compiled artifacts (a directory with manifest.json); compile first with \
                 `qcc compile MODEL -O LEVEL -o model.qcc`",
                artifact.display()
            ));
        }
        let exec = CudaExecutor::load(artifact, ordinal)
            .with_context(|| format!("{} on cuda:{ordinal}", artifact.display()))?;
        tracing::info!(device = %exec.gpu().describe(), "loaded {}", artifact.display());
        Ok(exec)
    }

    fn ids_i64(ids: &[u32]) -> Vec<i64> {
        ids.iter().map(|&i| i64::from(i)).collect()
    }

    /// Whole-sequence logits on the GPU.
    pub struct CudaLanguageModel(pub CudaLm);

    impl LanguageModel for CudaLanguageModel {
        fn logits(&mut self, ids: &[u32]) -> anyhow::Result<Logits> {
            Ok(self.0.logits(&ids_i64(ids))?)
        }
    }

    /// Decoding with the KV cache on the GPU.
    pub struct CudaDecoder(pub CudaKvDecoder);

    impl Decoder for CudaDecoder {
        fn feed(&mut self, ids: &[u32]) -> anyhow::Result<Logits> {
            Ok(self.0.feed(&ids_i64(ids))?)
        }
    }

    /// The decoder an artifact supports: its KV cache when it has one, else recomputation.
    pub fn decoder(exec: CudaExecutor) -> anyhow::Result<Box<dyn Decoder>> {
        if CudaKvDecoder::accepts(&exec.manifest) {
            Ok(Box::new(CudaDecoder(CudaKvDecoder::new(exec)?)))
        } else {
            Ok(Box::new(super::Recompute::new(CudaLanguageModel(CudaLm::new(exec)?))))
        }
    }
}

/// The KV-cache sibling of a model file, `<stem>-kv.onnx`, when it exists.
pub fn kv_sibling(model: &Path) -> Option<std::path::PathBuf> {
    let stem = model.file_stem()?.to_str()?;
    let p = model.with_file_name(format!("{stem}-kv.onnx"));
    p.exists().then_some(p)
}
