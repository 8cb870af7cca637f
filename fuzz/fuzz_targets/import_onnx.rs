//! Fuzzes the ONNX importer: any byte string must import or fail with an error, never panic; an imported
//! graph must also survive the verifier and the printer.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(model) = qcc::onnx::import_bytes(bytes::Bytes::copy_from_slice(data), None) {
        let _ = qcc_ir::verify::verify(&model.graph);
        let _ = qcc_ir::text::print(&model.graph);
    }
});
