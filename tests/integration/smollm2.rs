//! The real model end to end on the CPU executor: logits and perplexity against onnxruntime on the same
//! token windows, the independently measured perplexity, and greedy generation with the KV cache.

use qcc::eval::{perplexity, LanguageModel};
use qcc::model::CpuLanguageModel;
use qcc_runtime::RtTensor;
use qcc_tests::{fixture, repo_root, smollm2_dir, smollm2_onnx, venv_python};

const CTX: usize = 512;
const WINDOWS: usize = 3;
/// Perplexity of the last SOTU address, 3 windows of 512, measured by an independent FP32 implementation.
const REFERENCE_PPL: f64 = 22.53;

fn eval_ids() -> Vec<u32> {
    let tokenizer = qcc::tokenizer::for_model(&smollm2_onnx(), None).unwrap();
    let text = std::fs::read_to_string(fixture("data/sotu-last.txt")).unwrap();
    let ids = tokenizer.encode(text.as_str(), false).unwrap().get_ids().to_vec();
    ids[..CTX * WINDOWS].to_vec()
}

#[test]
fn logits_and_perplexity_match_onnxruntime() {
    let ids = eval_ids();
    let dir = tempfile::tempdir().unwrap();
    let ids_t = RtTensor::from_vec(&[WINDOWS, CTX], ids.iter().map(|&i| i as i64).collect()).unwrap();
    qcc::npy::write(&dir.path().join("ids.npy"), &ids_t).unwrap();
    let status = std::process::Command::new(venv_python())
        .arg(repo_root().join("scripts/ort_reference.py"))
        .args(["logits", "--model"])
        .arg(smollm2_onnx())
        .arg("--ids")
        .arg(dir.path().join("ids.npy"))
        .arg("--out-dir")
        .arg(dir.path())
        .status()
        .unwrap();
    assert!(status.success(), "onnxruntime reference failed");
    let ort_nll = qcc::npy::read(&dir.path().join("nll.npy")).unwrap().to_f64_vec();
    let ort_logits0 = qcc::npy::read(&dir.path().join("logits0.npy")).unwrap().to_f64_vec();

    let graph = qcc::onnx::import_model(smollm2_onnx()).unwrap().graph;
    let mut lm = CpuLanguageModel::new(&graph).unwrap();
    let ours = lm.logits(&ids[..CTX]).unwrap();
    let max_ref = ort_logits0.iter().fold(0f64, |m, x| m.max(x.abs()));
    let max_diff = ours.data.iter().zip(&ort_logits0).fold(0f64, |m, (&a, &b)| m.max((a as f64 - b).abs()));
    println!(
        "window 0 logits: max |qcc - ort| = {max_diff:.3e}, max |ort| = {max_ref:.2}, relative {:.3e}",
        max_diff / max_ref
    );
    assert!(max_diff / max_ref < 1e-4, "logits differ from onnxruntime by {:.3e} relative", max_diff / max_ref);

    let report = perplexity(&mut lm, &ids, CTX, Some(WINDOWS), false).unwrap();
    let ort_ppl = (ort_nll.iter().sum::<f64>() / (WINDOWS * (CTX - 1)) as f64).exp();
    let rel = (report.ppl - ort_ppl).abs() / ort_ppl;
    println!(
        "perplexity: qcc {:.4}, onnxruntime {ort_ppl:.4} (relative {rel:.2e}), independent {REFERENCE_PPL}",
        report.ppl
    );
    assert_eq!(report.tokens, 1533);
    assert!(rel < 5e-4, "perplexity differs from onnxruntime by {:.3}%", rel * 100.0);
    assert!(
        (report.ppl - REFERENCE_PPL).abs() / REFERENCE_PPL < 5e-3,
        "perplexity {} is not about {REFERENCE_PPL}",
        report.ppl
    );
}

#[test]
fn greedy_generation_with_kv_cache_says_paris() {
    let tokenizer = qcc::tokenizer::for_model(&smollm2_onnx(), None).unwrap();
    let prompt = tokenizer.encode("The capital of France is", false).unwrap().get_ids().to_vec();
    let kv = qcc::onnx::import_model(smollm2_dir().join("smollm2-135m-kv.onnx")).unwrap().graph;
    assert!(qcc::model::KvDecoder::accepts(&kv));
    let cached = qcc::model::generate(&kv, &prompt, 12, None).unwrap();
    let text = tokenizer.decode(&cached, false).unwrap();
    assert!(text.starts_with(" Paris."), "generated {text:?}");
    // The cache changes nothing: recomputing the whole sequence each step picks the same tokens.
    let plain = qcc::onnx::import_model(smollm2_onnx()).unwrap().graph;
    assert_eq!(qcc::model::generate(&plain, &prompt, 12, None).unwrap(), cached);
}

#[test]
fn real_model_round_trips_through_qir_text() {
    let graph = qcc::onnx::import_model(smollm2_onnx()).unwrap().graph;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("smollm2.qir");
    qcc_ir::text::save(&path, &graph).unwrap();
    let back = qcc_ir::text::load(&path).unwrap();
    // Printing elides weights to content digests, so equal text means equal structure, types and weights.
    let text = qcc_ir::text::print(&graph);
    assert_eq!(qcc_ir::text::print(&back), text);
    assert_eq!(qcc_ir::text::print(&qcc_ir::text::parse(&text).unwrap()), text, "elided text is canonical");
    let ids: Vec<u32> = vec![504, 3575, 282, 4649, 314];
    let a = CpuLanguageModel::new(&graph).unwrap().logits(&ids).unwrap();
    let b = CpuLanguageModel::new(&back).unwrap().logits(&ids).unwrap();
    assert!(a.data == b.data, "logits changed after the .qir round trip");
}
