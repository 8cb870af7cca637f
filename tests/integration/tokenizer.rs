//! The GGUF-derived tokenizer against facts measured independently (onnxruntime generation through the
//! Python `tokenizers` path in scripts/check_fixture.py, and the digit-splitting rule of SmolLM2).

use qcc::gguf::GgufMetadata;
use qcc_tests::{fixture, smollm2_gguf};

fn tokenizer() -> tokenizers::Tokenizer {
    qcc::tokenizer::from_gguf(&GgufMetadata::read(&smollm2_gguf()).unwrap()).unwrap()
}

#[test]
fn encodes_like_the_reference() {
    let tok = tokenizer();
    let ids = tok.encode("The capital of France is", false).unwrap().get_ids().to_vec();
    assert_eq!(ids, vec![504, 3575, 282, 4649, 314]);
    // Digits are split one by one.
    let year = tok.encode("2021", false).unwrap();
    assert_eq!(year.get_tokens(), &["2", "0", "2", "1"]);
    // Control tokens are special: one id each.
    assert_eq!(tok.encode("<|im_start|>", false).unwrap().get_ids(), &[1]);
}

#[test]
fn round_trips_the_evaluation_text() {
    let tok = tokenizer();
    let text = std::fs::read_to_string(fixture("data/sotu-last.txt")).unwrap();
    let ids = tok.encode(text.as_str(), false).unwrap().get_ids().to_vec();
    assert_eq!(ids.len(), 10_843, "token count measured by the Python tokenizers reference");
    assert_eq!(tok.decode(&ids, false).unwrap(), text);
}

#[test]
fn saved_json_loads_back_identically() {
    let tok = tokenizer();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    qcc::tokenizer::save(&tok, &path).unwrap();
    let back = qcc::tokenizer::load(&path).unwrap();
    let s = "Hello world, 1234 <|im_end|>";
    assert_eq!(tok.encode(s, false).unwrap().get_ids(), back.encode(s, false).unwrap().get_ids());
}

#[test]
fn bad_gguf_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.gguf");
    std::fs::write(&path, b"GGML\x03\x00\x00\x00").unwrap();
    let err = GgufMetadata::read(&path).unwrap_err().to_string();
    assert!(err.contains("bad.gguf") && err.contains("not a GGUF file"), "{err}");
}
