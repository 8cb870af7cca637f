//! The calibration driver: builds a [`CalibrationSet`] from a text file with the model's tokenizer, and a
//! disk store for collected statistics keyed by calibration set, graph fingerprint and request.

use anyhow::{anyhow, Context, Result};
use qcc_ir::{Dim, Graph, OpKind, Tensor, TensorType};
use qcc_passes::{CalibrationSet, StatsStore};
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// `samples` windows of `ctx` consecutive tokens from `text` (non-overlapping; fewer if the text is short).
///
/// The token ids go to the model's one rank-2 integer input. A KV-cache model's other inputs (the
/// past keys and values, `[batch, heads, past, head_dim]`) get empty tensors: batch 1 (the ids'
/// batch symbol), every other symbolic dim 0, so each window runs as a prefill from position 0, as
/// the same model without a cache would.
pub fn calibration_set(
    graph: &Graph,
    tokenizer: &Tokenizer,
    text: &str,
    samples: usize,
    ctx: usize,
) -> Result<CalibrationSet> {
    let inputs: Vec<(String, TensorType)> = graph
        .graph_inputs()
        .iter()
        .filter(|&&id| graph.node(id).op.kind == OpKind::Input)
        .map(|&id| (graph.node(id).outputs[0].name.clone(), graph.node(id).outputs[0].ty.clone()))
        .collect();
    let is_ids = |ty: &TensorType| ty.dtype.is_int() && ty.shape.as_ref().is_some_and(|s| s.0.len() == 2);
    let ids_inputs: Vec<&(String, TensorType)> = inputs.iter().filter(|(_, ty)| is_ids(ty)).collect();
    let [(input, ids_ty)] = ids_inputs.as_slice() else {
        let names: Vec<&String> = inputs.iter().map(|(n, _)| n).collect();
        return Err(anyhow!(
            "calibration expects one rank-2 integer input (token ids), this model's inputs are {names:?}"
        ));
    };
    let batch = ids_ty.shape.as_ref().and_then(|s| match &s.0[0] {
        Dim::Sym(name) => Some(name.clone()),
        _ => None,
    });
    let mut empty_caches = Vec::new();
    for (name, ty) in inputs.iter().filter(|(n, _)| n != input) {
        let shape = ty.shape.as_ref().ok_or_else(|| anyhow!("calibration: input `{name}` has an unknown shape"))?;
        let mut dims = Vec::new();
        let mut has_length = false;
        for d in &shape.0 {
            dims.push(match d {
                Dim::Known(v) => *v as usize,
                Dim::Sym(s) if Some(s) == batch.as_ref() => 1,
                Dim::Sym(_) => {
                    has_length = true;
                    0
                }
                Dim::Unknown => return Err(anyhow!("calibration: input `{name}` has a dim of unknown size")),
            });
        }
        if !has_length {
            return Err(anyhow!(
                "calibration can feed only the token ids and empty KV caches; input `{name}` [{}] has no length to set to 0",
                dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
            ));
        }
        let empty =
            Tensor::from_bytes(ty.dtype, dims, bytes::Bytes::new()).map_err(|e| anyhow!("input `{name}`: {e}"))?;
        empty_caches.push((name.clone(), empty));
    }
    let ids = tokenizer.encode(text, false).map_err(|e| anyhow!("tokenizer: {e}"))?.get_ids().to_vec();
    if ctx == 0 || ids.len() < ctx {
        return Err(anyhow!("the calibration text has {} tokens, fewer than one window of {ctx}", ids.len()));
    }
    let windows = (ids.len() / ctx).min(samples);
    let samples: Vec<Vec<(String, Tensor)>> = (0..windows)
        .map(|w| {
            let window: Vec<i64> = ids[w * ctx..(w + 1) * ctx].iter().map(|&t| t as i64).collect();
            let mut feed = vec![(input.clone(), Tensor::from_slice(vec![1, ctx], &window))];
            feed.extend(empty_caches.iter().cloned());
            feed
        })
        .collect();
    let mut h = blake3::Hasher::new();
    h.update(text.as_bytes());
    h.update(format!("n={windows};l={ctx}").as_bytes());
    Ok(CalibrationSet { samples, key: h.finalize().to_hex()[..32].to_string() })
}

/// Statistics files under a directory, one per key.
#[derive(Debug)]
pub struct DiskStore {
    pub dir: PathBuf,
}

impl DiskStore {
    /// The store beside `model`: `<model>.qcc-stats/`.
    pub fn beside(model: &Path) -> DiskStore {
        let mut name = model.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        name.push(".qcc-stats");
        DiskStore { dir: model.with_file_name(name) }
    }
}

impl StatsStore for DiskStore {
    fn load(&self, key: &str) -> Option<Vec<u8>> {
        std::fs::read(self.dir.join(format!("{key}.bin"))).ok()
    }

    fn save(&self, key: &str, encode: &dyn Fn(&mut dyn std::io::Write) -> std::io::Result<()>) {
        // Best effort: a read-only model folder just means no cache. Written to a temporary and renamed,
        // so a reader never sees half a file.
        let _ = std::fs::create_dir_all(&self.dir).and_then(|_| {
            let tmp = self.dir.join(format!("{key}.tmp"));
            let mut w = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&tmp)?);
            encode(&mut w)?;
            std::io::Write::flush(&mut w)?;
            drop(w);
            std::fs::rename(&tmp, self.dir.join(format!("{key}.bin")))
        });
    }
}

/// Reads the calibration text.
pub fn read_text(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("reading calibration text {}", path.display()))
}
