//! Passes on the real model: the structural pipeline over the SmolLM2 fixture must recognise every
//! block (30 attention and 30 MLP blocks, 211 linears) and leave the logits unchanged on the CPU executor.

use qcc_ir::{Graph, OpKind};
use qcc_passes::{OptLevel, PassManager, PassStats, Registry};
use qcc_runtime::{CpuExecutor, RtTensor};
use std::path::PathBuf;

fn smollm2() -> Option<PathBuf> {
    let p = qcc_tests::cache_dir().join("models/smollm2-135m/smollm2-135m.onnx");
    if p.exists() {
        Some(p)
    } else {
        println!("skipped: {} is missing (run scripts/fixtures.sh)", p.display());
        None
    }
}

fn count(g: &Graph, kind: OpKind) -> usize {
    g.node_ids().filter(|&n| g.node(n).op.kind == kind).count()
}

fn logits(g: &Graph, ids: &[i64]) -> Vec<f32> {
    let exec = CpuExecutor::new(g).unwrap();
    let input = RtTensor::from_vec(&[1, ids.len()], ids.to_vec()).unwrap();
    let out = exec.run(&[("input_ids", input)]).unwrap();
    out[0].1.to_f32().iter().copied().collect()
}

#[test]
fn smollm2_structural_pipeline_recognises_every_block_and_keeps_logits() {
    let Some(path) = smollm2() else { return };
    let original = qcc::onnx::import_model(&path).unwrap().graph;
    let mut graph = original.clone();
    let pipeline = Registry::standard().parse_pipeline(&OptLevel::None.pipeline()).unwrap();
    let mut stats = PassStats::new();
    PassManager::new(pipeline).run(&mut graph, &mut [&mut stats]).unwrap();
    println!("{}", stats.render());
    assert_eq!(count(&graph, OpKind::Attention), 30);
    assert_eq!(count(&graph, OpKind::Swiglu), 30);
    assert_eq!(count(&graph, OpKind::RmsNorm), 61);
    assert_eq!(count(&graph, OpKind::Rotary), 60);
    assert_eq!(count(&graph, OpKind::Linear), 211);
    assert_eq!(count(&graph, OpKind::MatMul), 0, "every product was recognised");

    // Equivalence on real token ids: the fused graph computes the same logits.
    let ids = [1i64, 504, 3458, 282, 4649, 314, 2, 17];
    let (before, after) = (logits(&original, &ids), logits(&graph, &ids));
    assert_eq!(before.len(), after.len());
    let num: f64 = before.iter().zip(&after).map(|(a, b)| f64::from(a - b).powi(2)).sum();
    let den: f64 = before.iter().map(|a| f64::from(*a).powi(2)).sum();
    let rel = (num / den).sqrt();
    println!("relative L2 error of logits: {rel:.3e}");
    assert!(rel < 1e-5, "relative error {rel}");
}
