//! The calibration driver: builds a [`CalibrationSet`] from a text file with the model's tokenizer, and a
//! disk store for collected statistics keyed by calibration set, graph fingerprint and request.

use anyhow::{anyhow, Context, Result};
use qcc_ir::{Graph, OpKind, Tensor};
use qcc_passes::{CalibrationSet, StatsStore};
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

/// `samples` windows of `ctx` consecutive tokens from `text` (non-overlapping; fewer if the text is short).
pub fn calibration_set(
    graph: &Graph,
    tokenizer: &Tokenizer,
    text: &str,
    samples: usize,
    ctx: usize,
) -> Result<CalibrationSet> {
    let inputs: Vec<String> = graph
        .graph_inputs()
        .iter()
        .filter(|&&id| graph.node(id).op.kind == OpKind::Input)
        .map(|&id| graph.node(id).outputs[0].name.clone())
        .collect();
    let [input] = inputs.as_slice() else {
        return Err(anyhow!("calibration expects a model with one input (token ids), this one has {inputs:?}"));
    };
    let ids = tokenizer.encode(text, false).map_err(|e| anyhow!("tokenizer: {e}"))?.get_ids().to_vec();
    if ctx == 0 || ids.len() < ctx {
        return Err(anyhow!("the calibration text has {} tokens, fewer than one window of {ctx}", ids.len()));
    }
    let windows = (ids.len() / ctx).min(samples);
    let samples: Vec<Vec<(String, Tensor)>> = (0..windows)
        .map(|w| {
            let window: Vec<i64> = ids[w * ctx..(w + 1) * ctx].iter().map(|&t| t as i64).collect();
            vec![(input.clone(), Tensor::from_slice(vec![1, ctx], &window))]
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
