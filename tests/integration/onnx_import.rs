//! ONNX import: models built here with qcc's own prost messages, written to temporary folders, imported,
//! and checked against the values that went in (constants, types, op structure); zero-copy checked against
//! the process's memory maps; every malformed input gives an error naming what is wrong, never a panic.
//! Also: a 1 GiB model decodes in milliseconds without copying, and a survey of the ONNX node tests.

use prost::Message;
use qcc::onnx::proto::{
    data_type, AttributeProto, GraphProto, ModelProto, OperatorSetIdProto, TensorProto, ValueInfoProto,
};
use qcc::onnx::{import_bytes, import_model, ImportError, ImportedModel};
use qcc_ir::{Attr, DType, Dim, Graph, OpKind, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------- model builders

use qcc::onnx::build::{
    attr_int as int, attr_ints as ints, external_f32_tensor as external, graph, model, node, raw_f32_tensor as f32_raw,
    tensor_value_info as tensor_value, DimSpec as D,
};

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path
}

fn constant_of(g: &Graph, name: &str) -> Tensor {
    let v = g.value_by_name(name).unwrap_or_else(|| panic!("no value '{name}'"));
    g.constant(v).unwrap_or_else(|| panic!("'{name}' is not a constant")).clone()
}

fn data_ptr(t: &Tensor) -> usize {
    t.bytes().unwrap().as_ptr() as usize
}

/// Address ranges at which `path` is mapped in this process (from /proc/self/maps).
fn mapped_ranges(path: &Path) -> Vec<(usize, usize)> {
    let canonical = path.canonicalize().unwrap();
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    maps.lines()
        .filter(|l| l.ends_with(canonical.to_str().unwrap()))
        .map(|l| {
            let range = l.split_whitespace().next().unwrap();
            let (a, b) = range.split_once('-').unwrap();
            (usize::from_str_radix(a, 16).unwrap(), usize::from_str_radix(b, 16).unwrap())
        })
        .collect()
}

fn inside(ptr: usize, ranges: &[(usize, usize)]) -> bool {
    ranges.iter().any(|&(a, b)| a <= ptr && ptr < b)
}

fn import_err(dir: &Path, m: &ModelProto) -> (PathBuf, String) {
    let path = write(dir, "model.onnx", &m.encode_to_vec());
    let err = import_model(&path).expect_err("import should fail");
    let msg = err.to_string();
    assert!(msg.contains(path.to_str().unwrap()), "message does not name the file: {msg}");
    assert_eq!(err.path(), path.to_str().unwrap());
    (path, msg)
}

fn x_input() -> ValueInfoProto {
    tensor_value("x", data_type::FLOAT, &[D::Param("batch"), D::Value(4)])
}

// ---------------------------------------------------------------- a normal model

/// y = reduce_sum(relu(x @ W + b), axes=[1]) at opset 11 (ReduceSum's axes still an attribute), plus a
/// Constant node and a Clip with opset-6-style attributes normalised to inputs.
fn small_model() -> ModelProto {
    let w: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 2.0).collect();
    let b = TensorProto {
        name: "b".into(),
        dims: vec![3],
        data_type: data_type::FLOAT,
        float_data: vec![0.25, -1.0, 4.0],
        ..Default::default()
    };
    let shape = TensorProto {
        name: "unused_i64".into(),
        dims: vec![2],
        data_type: data_type::INT64,
        int64_data: vec![-7, 1 << 40],
        ..Default::default()
    };
    let nodes = vec![
        node("mm", "MatMul", &["x", "W"], &["xw"], vec![]),
        node("add", "Add", &["xw", "b"], &["h"], vec![]),
        node("relu", "Relu", &["h"], &["r"], vec![]),
        node("sum", "ReduceSum", &["r"], &["s"], vec![ints("axes", &[1]), int("keepdims", 0)]),
        node(
            "two",
            "Constant",
            &[],
            &["c2"],
            vec![AttributeProto { name: "value_float".into(), r#type: 1, f: 2.0, ..Default::default() }],
        ),
        node("scale", "Mul", &["s", "c2"], &["y"], vec![]),
    ];
    let mut g = graph(nodes, vec![f32_raw("W", &[4, 3], &w), b, shape], vec![x_input()], &["y"]);
    // IR < 4 style: the initializer W is listed among the inputs too; it must stay a constant.
    g.input.push(tensor_value("W", data_type::FLOAT, &[D::Value(4), D::Value(3)]));
    g.output[0] = tensor_value("y", data_type::FLOAT, &[D::Param("batch")]);
    model(g, 11)
}

#[test]
fn small_model_imports_with_ops_types_and_constants() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "small.onnx", &small_model().encode_to_vec());
    let m: ImportedModel = import_model(&path).unwrap();
    assert_eq!(m.ir_version, 8);
    assert_eq!(m.onnx_opset(), 11);
    assert_eq!(m.producer_name, "qcc");
    assert_eq!(m.source.as_deref(), Some(path.as_path()));
    let g = &m.graph;

    // One graph input (W is shadowed by its initializer) with its symbolic dimension.
    assert_eq!(g.graph_inputs().len(), 1);
    let x = g.value_by_name("x").unwrap();
    assert_eq!(g.value_type(x).dtype, DType::F32);
    assert_eq!(g.value_type(x).shape.as_ref().unwrap().dims(), &[Dim::sym("batch"), Dim::Known(4)]);

    // Constants carry exactly the values that went in.
    let w = constant_of(g, "W");
    assert_eq!(w.dims, vec![4, 3]);
    assert_eq!(w.to_vec::<f32>().unwrap(), (0..12).map(|i| i as f32 * 0.5 - 2.0).collect::<Vec<_>>());
    assert_eq!(constant_of(g, "b").to_vec::<f32>().unwrap(), vec![0.25, -1.0, 4.0]);
    assert_eq!(constant_of(g, "unused_i64").to_vec::<i64>().unwrap(), vec![-7, 1 << 40]);
    let two = constant_of(g, "c2");
    assert_eq!((two.dtype, two.dims.clone(), two.to_vec::<f32>().unwrap()), (DType::F32, vec![], vec![2.0]));

    // Ops in dependency order, each reading the right values.
    let order: Vec<OpKind> = g
        .topo_order()
        .unwrap()
        .into_iter()
        .map(|id| g.node(id).op.kind)
        .filter(|k| !matches!(k, OpKind::Constant | OpKind::Input))
        .collect();
    assert_eq!(order, vec![OpKind::MatMul, OpKind::Add, OpKind::Relu, OpKind::ReduceSum, OpKind::Mul]);
    let producer = |name: &str| g.value_by_name(name).unwrap().node;
    assert_eq!(g.inputs(producer("xw")), vec![Some(x), g.value_by_name("W")]);

    // ReduceSum's axes attribute became a constant i64 input; keepdims stays an attribute.
    let sum = g.node(producer("s"));
    assert_eq!(sum.op.attr("axes"), None);
    assert_eq!(sum.op.int("keepdims"), Some(0));
    let axes = g.input(producer("s"), 1).unwrap();
    assert_eq!(g.constant(axes).unwrap().to_vec::<i64>().unwrap(), vec![1]);

    // Type inference filled in the intermediate values the model declared nothing about.
    let xw = g.value_by_name("xw").unwrap();
    assert_eq!(g.value_type(xw).dtype, DType::F32);
    assert_eq!(g.value_type(xw).shape.as_ref().unwrap().dims(), &[Dim::sym("batch"), Dim::Known(3)]);

    // The output is named and typed as declared.
    assert_eq!(g.graph_outputs().len(), 1);
    assert_eq!(g.graph_outputs()[0].name, "y");
    let y = g.graph_outputs()[0].value;
    assert_eq!(g.value_type(y).dtype, DType::F32);
    assert_eq!(g.value_type(y).shape.as_ref().unwrap().dims(), &[Dim::sym("batch")]);
}

#[test]
fn raw_data_initializers_are_views_into_the_mapped_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "small.onnx", &small_model().encode_to_vec());
    let m = import_model(&path).unwrap();
    let ranges = mapped_ranges(&path);
    assert!(!ranges.is_empty(), "the model file should be memory-mapped while the graph is alive");
    assert!(inside(data_ptr(&constant_of(&m.graph, "W")), &ranges), "raw_data was copied");
    // float_data is converted, so it owns its bytes.
    assert!(!inside(data_ptr(&constant_of(&m.graph, "b")), &ranges));

    // In-memory import: views into the caller's buffer.
    let bytes = bytes::Bytes::from(small_model().encode_to_vec());
    let range = (bytes.as_ptr() as usize, bytes.as_ptr() as usize + bytes.len());
    let m = import_bytes(bytes.clone(), None).unwrap();
    assert!(inside(data_ptr(&constant_of(&m.graph, "W")), &[range]));
}

#[test]
fn external_data_shares_one_mapping_and_is_zero_copy() {
    let dir = tempfile::tempdir().unwrap();
    let a: Vec<f32> = vec![1.0, 2.0, 3.0, 4.0];
    let b: Vec<f32> = vec![-0.5, 0.125];
    let c: Vec<f32> = vec![9.0, 8.0, 7.0];
    // File layout: a at 0, padding, b at 64, c from 128 to the end (no length given).
    let mut file = vec![0u8; 128];
    file[..16].copy_from_slice(&a.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>());
    file[64..72].copy_from_slice(&b.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>());
    file.extend(c.iter().flat_map(|v| v.to_le_bytes()));
    std::fs::create_dir(dir.path().join("data")).unwrap();
    let weights = write(&dir.path().join("data"), "weights.bin", &file);

    let init = vec![
        external("a", &[2, 2], "data/weights.bin", 0, Some(16)),
        external("b", &[2], "data/weights.bin", 64, Some(8)),
        external("c", &[3], "./data/weights.bin", 128, None),
    ];
    let nodes = vec![node("n", "Sum", &["a", "b", "x"], &["y"], vec![])];
    let m = model(graph(nodes, init, vec![tensor_value("x", data_type::FLOAT, &[D::Value(1)])], &["y"]), 17);
    let path = write(dir.path(), "model.onnx", &m.encode_to_vec());
    let imported = import_model(&path).unwrap();
    let g = &imported.graph;
    assert_eq!(constant_of(g, "a").to_vec::<f32>().unwrap(), a);
    assert_eq!(constant_of(g, "a").dims, vec![2, 2]);
    assert_eq!(constant_of(g, "b").to_vec::<f32>().unwrap(), b);
    assert_eq!(constant_of(g, "c").to_vec::<f32>().unwrap(), c);

    let ranges = mapped_ranges(&weights);
    assert_eq!(ranges.len(), 1, "the shared data file should be mapped exactly once: {ranges:?}");
    let base = ranges[0].0;
    assert_eq!(data_ptr(&constant_of(g, "a")), base);
    assert_eq!(data_ptr(&constant_of(g, "b")), base + 64);
    assert_eq!(data_ptr(&constant_of(g, "c")), base + 128);
}

#[test]
fn typed_fields_of_narrow_types_follow_the_spec() {
    // f16 and bf16 as bit patterns in int32_data; int4 packed two per int32 entry, low nibble first.
    let f16 = TensorProto {
        name: "h".into(),
        dims: vec![3],
        data_type: data_type::FLOAT16,
        int32_data: vec![0x3c00, 0xc000, 0x3800], // 1.0, -2.0, 0.5
        ..Default::default()
    };
    let bf16 = TensorProto {
        name: "bh".into(),
        dims: vec![2],
        data_type: data_type::BFLOAT16,
        int32_data: vec![0x3f80, 0xc040], // 1.0, -3.0
        ..Default::default()
    };
    let int4 = TensorProto {
        name: "q".into(),
        dims: vec![2, 2],
        data_type: data_type::INT4,
        int32_data: vec![0x8f, 0x21], // -1, -8, 1, 2
        ..Default::default()
    };
    let f8 = TensorProto {
        name: "e".into(),
        dims: vec![2],
        data_type: data_type::FLOAT8E4M3FN,
        raw_data: vec![0x38, 0x7e].into(), // 1.0, 448
        ..Default::default()
    };
    let nodes = vec![node("n", "Identity", &["h"], &["y"], vec![])];
    let m = model(graph(nodes, vec![f16, bf16, int4, f8], vec![], &["y"]), 21);
    let g = import_bytes(m.encode_to_vec().into(), None).unwrap().graph;
    assert_eq!(constant_of(&g, "h").to_f32_vec().unwrap(), vec![1.0, -2.0, 0.5]);
    assert_eq!(constant_of(&g, "bh").to_f32_vec().unwrap(), vec![1.0, -3.0]);
    let q = constant_of(&g, "q");
    assert_eq!((q.dtype, q.to_i64_vec().unwrap()), (DType::I4, vec![-1, -8, 1, 2]));
    let e = constant_of(&g, "e");
    assert_eq!((e.dtype, e.to_f32_vec().unwrap()), (DType::F8E4M3, vec![1.0, 448.0]));
}

#[test]
fn legacy_opset_forms_are_normalised() {
    // Opset 9: Clip min/max and Pad pads/value attributes, Squeeze axes, Split split, Slice starts/ends.
    let floats = |name: &str, f: f32| AttributeProto { name: name.into(), r#type: 1, f, ..Default::default() };
    let nodes = vec![
        node("clip", "Clip", &["x"], &["c"], vec![floats("min", -1.0), floats("max", 6.0)]),
        node("pad", "Pad", &["c"], &["p"], vec![ints("pads", &[0, 1, 0, 1]), floats("value", 0.5)]),
        node("split", "Split", &["p"], &["s0", "s1"], vec![int("axis", 1), ints("split", &[2, 4])]),
        node("slice", "Slice", &["s1"], &["sl"], vec![ints("starts", &[1]), ints("ends", &[3]), ints("axes", &[1])]),
        node("unsq", "Unsqueeze", &["sl"], &["u"], vec![ints("axes", &[0])]),
        node("sm", "Softmax", &["u"], &["y"], vec![int("axis", 1)]),
    ];
    let m = model(graph(nodes, vec![], vec![x_input()], &["y", "s0"]), 9);
    let g = import_bytes(m.encode_to_vec().into(), None).unwrap().graph;
    let producer = |name: &str| g.value_by_name(name).unwrap().node;
    let const_input = |name: &str, port: usize| g.constant(g.input(producer(name), port).unwrap()).unwrap().clone();
    assert_eq!(const_input("c", 1).to_vec::<f32>().unwrap(), vec![-1.0]);
    assert_eq!(const_input("c", 2).to_vec::<f32>().unwrap(), vec![6.0]);
    assert_eq!(const_input("p", 1).to_vec::<i64>().unwrap(), vec![0, 1, 0, 1]);
    assert_eq!(const_input("p", 2).to_vec::<f32>().unwrap(), vec![0.5]);
    assert_eq!(const_input("s0", 1).to_vec::<i64>().unwrap(), vec![2, 4]);
    assert_eq!(g.node(producer("s0")).outputs.len(), 2);
    assert_eq!(const_input("sl", 1).to_vec::<i64>().unwrap(), vec![1]);
    assert_eq!(const_input("sl", 2).to_vec::<i64>().unwrap(), vec![3]);
    assert_eq!(const_input("sl", 3).to_vec::<i64>().unwrap(), vec![1]);
    assert_eq!(const_input("u", 1).to_vec::<i64>().unwrap(), vec![0]);
    // Softmax-1 over axis 1 of a rank-3 tensor normalises over the flattened trailing axes: rewritten as
    // reshape(softmax(flatten(u, 1), axis=1), shape(u)).
    let y = g.node(producer("y"));
    assert_eq!(y.op.kind, OpKind::Reshape);
    let inputs = g.inputs(producer("y"));
    let softmax = g.node(inputs[0].unwrap().node);
    assert_eq!((softmax.op.kind, softmax.op.int("axis")), (OpKind::Softmax, Some(1)));
    let flatten = g.inputs(inputs[0].unwrap().node)[0].unwrap();
    assert_eq!((g.node(flatten.node).op.kind, g.node(flatten.node).op.int("axis")), (OpKind::Flatten, Some(1)));
    assert_eq!(g.node(inputs[1].unwrap().node).op.kind, OpKind::Shape);
    assert_eq!(g.inputs(inputs[1].unwrap().node), vec![g.value_by_name("u")]);
}

#[test]
fn cast_target_is_a_dtype_and_optional_inputs_are_absent_slots() {
    let nodes = vec![
        node("cast", "Cast", &["x"], &["h"], vec![int("to", data_type::FLOAT16 as i64)]),
        // Clip-13 with only a max: the min slot is absent.
        node("clip", "Clip", &["h", "", "hi"], &["y"], vec![]),
    ];
    let hi = TensorProto {
        name: "hi".into(),
        data_type: data_type::FLOAT16,
        raw_data: half::f16::from_f32(6.0).to_le_bytes().to_vec().into(),
        ..Default::default()
    };
    let g = import_bytes(model(graph(nodes, vec![hi], vec![x_input()], &["y"]), 13).encode_to_vec().into(), None)
        .unwrap()
        .graph;
    let cast = g.node(g.value_by_name("h").unwrap().node);
    assert_eq!(cast.op.attr("to"), Some(&Attr::DType(DType::F16)));
    assert_eq!(g.value_type(g.value_by_name("h").unwrap()).dtype, DType::F16);
    let clip = g.value_by_name("y").unwrap().node;
    assert_eq!(g.inputs(clip), vec![g.value_by_name("h"), None, g.value_by_name("hi")]);
}

// ---------------------------------------------------------------- bad inputs

#[test]
fn truncated_and_garbage_files_are_decode_errors() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = small_model().encode_to_vec();
    let path = write(dir.path(), "cut.onnx", &bytes[..bytes.len() / 2]);
    let err = import_model(&path).unwrap_err();
    assert!(matches!(err, ImportError::Decode { .. }), "{err}");
    assert!(err.to_string().contains("cut.onnx") && err.to_string().contains("truncated"), "{err}");

    let garbage: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let path = write(dir.path(), "garbage.onnx", &garbage);
    let err = import_model(&path).unwrap_err();
    assert!(matches!(err, ImportError::Decode { .. } | ImportError::InvalidModel { .. }), "{err}");
    assert!(err.to_string().contains("garbage.onnx"), "{err}");

    let err = import_model(dir.path().join("absent.onnx")).unwrap_err();
    assert!(matches!(err, ImportError::Io { .. }) && err.to_string().contains("absent.onnx"), "{err}");

    // Every prefix of a valid model fails cleanly or imports; none panics.
    for cut in (0..bytes.len()).step_by(7) {
        let _ = import_bytes(bytes[..cut].to_vec().into(), None);
    }
}

/// Seeded byte mutations of valid models: every import returns (Ok or Err) without panicking.
#[test]
fn mutated_models_never_panic() {
    let seeds = [small_model().encode_to_vec(), {
        let nodes = vec![
            node("clip", "Clip", &["x"], &["c"], vec![ints("pads", &[0, 1]), int("axis", 1)]),
            node("sm", "Softmax", &["c"], &["y"], vec![int("axis", 0)]),
        ];
        model(graph(nodes, vec![], vec![x_input()], &["y"]), 9).encode_to_vec()
    }];
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let (mut ok, mut failed) = (0, 0);
    for seed in &seeds {
        for _ in 0..10_000 {
            let mut bytes = seed.clone();
            for _ in 0..1 + next() % 4 {
                let at = (next() % bytes.len() as u64) as usize;
                bytes[at] = match next() % 3 {
                    0 => next() as u8,
                    1 => bytes[at] ^ (1 << (next() % 8)),
                    _ => [0, 1, 0x7f, 0x80, 0xff][(next() % 5) as usize],
                };
            }
            match import_bytes(bytes.into(), None) {
                Ok(_) => ok += 1,
                Err(e) => {
                    assert!(e.to_string().starts_with("<memory>: "), "{e}");
                    failed += 1
                }
            }
        }
    }
    eprintln!("mutated models: {ok} imported, {failed} rejected");
}

#[test]
fn missing_external_file_names_the_initializer_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = vec![node("n", "Neg", &["w"], &["y"], vec![])];
    let m = model(graph(nodes, vec![external("w", &[2], "nowhere.bin", 0, Some(8))], vec![], &["y"]), 17);
    let (_, msg) = import_err(dir.path(), &m);
    assert!(msg.contains("initializer 'w'") && msg.contains("nowhere.bin"), "{msg}");
}

#[test]
fn external_range_past_end_of_file_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "w.bin", &[0u8; 12]);
    let nodes = vec![node("n", "Neg", &["w"], &["y"], vec![])];
    let m = model(graph(nodes, vec![external("w", &[4], "w.bin", 4, Some(16))], vec![], &["y"]), 17);
    let (_, msg) = import_err(dir.path(), &m);
    assert!(msg.contains("initializer 'w'") && msg.contains("past the end") && msg.contains("w.bin"), "{msg}");

    // Offsets that overflow, and locations that leave the model's folder, are refused too.
    let m = model(
        graph(
            vec![node("n", "Neg", &["w"], &["y"], vec![])],
            vec![external("w", &[1], "w.bin", u64::MAX, Some(4))],
            vec![],
            &["y"],
        ),
        17,
    );
    let (_, msg) = import_err(dir.path(), &m);
    assert!(msg.contains("past the end"), "{msg}");
    let m = model(
        graph(
            vec![node("n", "Neg", &["w"], &["y"], vec![])],
            vec![external("w", &[1], "../w.bin", 0, Some(4))],
            vec![],
            &["y"],
        ),
        17,
    );
    let (_, msg) = import_err(dir.path(), &m);
    assert!(msg.contains("inside the model's folder"), "{msg}");
}

#[test]
fn initializer_length_must_match_its_shape() {
    let dir = tempfile::tempdir().unwrap();
    // Shape says 2x3 (24 bytes) but raw_data holds 5 floats.
    let w = f32_raw("weights", &[2, 3], &[1.0; 5]);
    let m = model(graph(vec![node("n", "Neg", &["weights"], &["y"], vec![])], vec![w], vec![], &["y"]), 17);
    let (_, msg) = import_err(dir.path(), &m);
    assert!(msg.contains("initializer 'weights'") && msg.contains("20 bytes") && msg.contains("needs 24"), "{msg}");

    // External data whose slice disagrees with the shape.
    write(dir.path(), "w.bin", &[0u8; 64]);
    let m = model(
        graph(
            vec![node("n", "Neg", &["w"], &["y"], vec![])],
            vec![external("w", &[4], "w.bin", 0, Some(12))],
            vec![],
            &["y"],
        ),
        17,
    );
    let (_, msg) = import_err(dir.path(), &m);
    assert!(msg.contains("initializer 'w'") && msg.contains("needs 16"), "{msg}");
}

#[test]
fn cycles_and_dangling_inputs_name_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = vec![
        node("start", "Neg", &["x"], &["a"], vec![]),
        node("loop_a", "Add", &["a", "c"], &["b"], vec![]),
        node("loop_b", "Relu", &["b"], &["c"], vec![]),
        node("after", "Neg", &["c"], &["y"], vec![]),
    ];
    let m = model(graph(nodes, vec![], vec![x_input()], &["y"]), 17);
    let (_, msg) = import_err(dir.path(), &m);
    assert!(msg.contains("cycle") && (msg.contains("'loop_a' (Add)") || msg.contains("'loop_b' (Relu)")), "{msg}");

    let nodes = vec![node("reader", "Mul", &["x", "ghost"], &["y"], vec![])];
    let m = model(graph(nodes, vec![], vec![x_input()], &["y"]), 17);
    let (_, msg) = import_err(dir.path(), &m);
    assert!(msg.contains("'reader' (Mul)") && msg.contains("'ghost'"), "{msg}");
}

#[test]
fn all_unsupported_nodes_are_listed_in_one_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = vec![
        node("topk", "TopK", &["x", "k"], &["v", "i"], vec![]),
        node("ok", "Relu", &["x"], &["r"], vec![]),
        node("einsum", "Einsum", &["r", "r"], &["e"], vec![]),
        node("after_unsupported", "Neg", &["e"], &["n"], vec![]),
        node("ml", "Normalizer", &["x"], &["z"], vec![]),
        node("old_resize", "Resize", &["x", "scales"], &["rs"], vec![]),
    ];
    nodes[4].domain = "ai.onnx.ml".into();
    let k = TensorProto {
        name: "k".into(),
        dims: vec![1],
        data_type: data_type::INT64,
        int64_data: vec![1],
        ..Default::default()
    };
    let scales = f32_raw("scales", &[2], &[1.0, 2.0]);
    let mut m = model(graph(nodes, vec![k, scales], vec![x_input()], &["v", "n", "z", "rs"]), 10);
    m.opset_import.push(OperatorSetIdProto { domain: "ai.onnx.ml".into(), version: 3 });
    let (_, msg) = import_err(dir.path(), &m);
    assert!(msg.contains("4 unsupported node(s)"), "{msg}");
    for needle in [
        "node 'topk': TopK (domain ai.onnx, opset 10)",
        "node 'einsum': Einsum (domain ai.onnx, opset 10)",
        "node 'ml': Normalizer (domain ai.onnx.ml, opset 3)",
        "node 'old_resize': Resize (domain ai.onnx, opset 10)",
    ] {
        assert!(msg.contains(needle), "missing {needle:?} in {msg}");
    }
    assert!(!msg.contains("after_unsupported"), "a supported node downstream of an unsupported one is not listed");
    let err = import_model(dir.path().join("model.onnx")).unwrap_err();
    let ImportError::UnsupportedOps { nodes, .. } = err else { panic!("{err}") };
    assert_eq!(
        nodes.iter().map(|n| n.op_type.as_str()).collect::<Vec<_>>(),
        ["TopK", "Einsum", "Normalizer", "Resize"]
    );
}

#[test]
fn unsupported_dtypes_name_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let words = TensorProto {
        name: "vocab".into(),
        dims: vec![2],
        data_type: data_type::STRING,
        string_data: vec!["a".into(), "b".into()],
        ..Default::default()
    };
    let m = model(graph(vec![node("n", "Identity", &["vocab"], &["y"], vec![])], vec![words], vec![], &["y"]), 17);
    let (_, msg) = import_err(dir.path(), &m);
    assert!(msg.contains("initializer 'vocab'") && msg.contains("STRING"), "{msg}");

    let m = model(
        graph(
            vec![node("n", "Identity", &["x"], &["y"], vec![])],
            vec![],
            vec![tensor_value("x", data_type::COMPLEX64, &[D::Value(2)])],
            &["y"],
        ),
        17,
    );
    let (_, msg) = import_err(dir.path(), &m);
    assert!(msg.contains("graph input 'x'") && msg.contains("COMPLEX64"), "{msg}");

    let attr = AttributeProto {
        name: "value".into(),
        r#type: 4,
        t: Some(TensorProto {
            data_type: data_type::FLOAT8E5M2,
            dims: vec![1],
            raw_data: vec![0].into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let m = model(graph(vec![node("const_node", "Constant", &[], &["y"], vec![attr])], vec![], vec![], &["y"]), 21);
    let (_, msg) = import_err(dir.path(), &m);
    assert!(msg.contains("'const_node'") && msg.contains("FLOAT8E5M2"), "{msg}");
}

#[test]
fn missing_dims_and_used_optional_outputs() {
    // A missing dim is unknown; an unused optional output (LayerNormalization's Mean) is dropped, a used
    // one is reported.
    let scale = f32_raw("scale", &[4], &[1.0; 4]);
    let nodes = vec![node("ln", "LayerNormalization", &["x", "scale"], &["y", "mean"], vec![])];
    let inputs = vec![tensor_value("x", data_type::FLOAT, &[D::Missing, D::Value(4)])];
    let m = model(graph(nodes.clone(), vec![scale.clone()], inputs.clone(), &["y"]), 17);
    let g = import_bytes(m.encode_to_vec().into(), None).unwrap().graph;
    let x = g.value_by_name("x").unwrap();
    assert_eq!(g.value_type(x).shape.as_ref().unwrap().dims(), &[Dim::Unknown, Dim::Known(4)]);
    assert_eq!(g.node(g.value_by_name("y").unwrap().node).outputs.len(), 1);
    assert!(g.value_by_name("mean").is_none());

    let m = model(graph(nodes, vec![scale], inputs, &["y", "mean"]), 17);
    let err = import_bytes(m.encode_to_vec().into(), None).unwrap_err().to_string();
    assert!(err.starts_with("<memory>:") && err.contains("'ln'") && err.contains("'mean'"), "{err}");
}

// ---------------------------------------------------------------- scale

/// Current resident set size of this process in bytes.
fn resident_bytes() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// A 512 MiB initializer inline (raw_data) and another 512 MiB in an external file, both sparse files of
/// zeros: import must not touch (let alone copy) the data, so it takes milliseconds and little memory.
#[test]
fn a_gigabyte_of_weights_imports_without_copying() {
    const BIG: u64 = 512 << 20;
    let dir = tempfile::tempdir().unwrap();
    let ext = std::fs::File::create(dir.path().join("big.bin")).unwrap();
    ext.set_len(BIG).unwrap();

    // The inline tensor's raw_data is the last field of the tensor, the tensor the last field of the graph
    // and the graph the last field of the model, so the file is "prefix ++ BIG zero bytes" and the zeros
    // can be a hole made by set_len.
    let dims = [(BIG / 4) as i64];
    let nodes = vec![node("n", "Add", &["inline", "ext"], &["y"], vec![])];
    let g = graph(nodes, vec![external("ext", &dims, "big.bin", 0, Some(BIG))], vec![], &["y"]);
    let head =
        TensorProto { name: "inline".into(), dims: dims.to_vec(), data_type: data_type::FLOAT, ..Default::default() };
    let mut tensor_bytes = head.encode_to_vec();
    push_len_field(&mut tensor_bytes, 9, BIG);
    let tensor_len = tensor_bytes.len() as u64 + BIG;
    let mut graph_bytes = g.encode_to_vec();
    push_len_field(&mut graph_bytes, 5, tensor_len);
    graph_bytes.extend_from_slice(&tensor_bytes);
    let graph_len = graph_bytes.len() as u64 + BIG;
    let mut m = model(GraphProto::default(), 17);
    m.graph = None;
    let mut model_bytes = m.encode_to_vec();
    push_len_field(&mut model_bytes, 7, graph_len);
    model_bytes.extend_from_slice(&graph_bytes);
    let path = dir.path().join("big.onnx");
    let file = std::fs::File::create(&path).unwrap();
    std::io::Write::write_all(&mut &file, &model_bytes).unwrap();
    file.set_len(model_bytes.len() as u64 + BIG).unwrap();
    drop(file);

    let rss_before = resident_bytes();
    let start = std::time::Instant::now();
    let m = import_model(&path).unwrap();
    let elapsed = start.elapsed();
    let rss_growth = resident_bytes().saturating_sub(rss_before);
    eprintln!("1 GiB of initializers imported in {elapsed:?}, resident set grew by {} KiB", rss_growth >> 10);
    for name in ["inline", "ext"] {
        let t = constant_of(&m.graph, name);
        assert_eq!(t.bytes().unwrap().len() as u64, BIG);
    }
    assert!(inside(data_ptr(&constant_of(&m.graph, "inline")), &mapped_ranges(&path)));
    assert!(inside(data_ptr(&constant_of(&m.graph, "ext")), &mapped_ranges(&dir.path().join("big.bin"))));
    // Copying either tensor would add 512 MiB; other tests running in parallel share the process, so
    // leave them generous room.
    assert!(rss_growth < 128 << 20, "resident set grew by {rss_growth} bytes");
    assert!(elapsed.as_millis() < 2000, "import took {elapsed:?}");
}

fn push_len_field(out: &mut Vec<u8>, tag: u32, len: u64) {
    prost::encoding::encode_key(tag, prost::encoding::WireType::LengthDelimited, out);
    prost::encoding::encode_varint(len, out);
}

// ---------------------------------------------------------------- real models

/// The SmolLM2-135M fp32 export (scripts/fixtures.sh) imports completely, its weights as views.
#[test]
fn smollm2_export_imports() {
    let path = qcc_tests::smollm2_onnx();
    let start = std::time::Instant::now();
    let m = import_model(&path).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("SmolLM2 ONNX imported in {:?}: {} nodes", start.elapsed(), m.graph.node_count());
    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for id in m.graph.node_ids() {
        *kinds.entry(m.graph.node(id).op.kind.name()).or_default() += 1;
    }
    eprintln!("op counts: {kinds:?}");
    assert!(kinds.get("matmul").copied().unwrap_or(0) >= 30 * 7, "expected the 7 projections of 30 layers: {kinds:?}");
    assert!(!m.graph.graph_outputs().is_empty());
}

/// Imports every ONNX backend node test model and prints the outcome grouped by reason. Node tests of ops
/// outside OpKind are expected to fail as unsupported; the test fails only on a panic or on a regression
/// below the counts measured when it was written.
#[test]
fn onnx_node_test_survey() {
    let root = qcc_tests::fixture("onnx-node-tests");
    let mut cases: Vec<PathBuf> = std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().path()).collect();
    cases.sort();
    let mut imported = 0;
    let mut reasons: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for case in &cases {
        let name = case.file_name().unwrap().to_string_lossy().to_string();
        match import_model(case.join("model.onnx")) {
            Ok(_) => imported += 1,
            Err(e) => {
                let key = match &e {
                    ImportError::UnsupportedOps { nodes, .. } => {
                        // One entry per distinct reason; "opset too new" is about the model, not the op.
                        let ops: std::collections::BTreeSet<String> = nodes
                            .iter()
                            .map(|n| {
                                if n.reason.contains("newer than") {
                                    format!("unsupported: {}", n.reason)
                                } else {
                                    format!("unsupported {}: {}", n.op_type, n.reason)
                                }
                            })
                            .collect();
                        ops.into_iter().collect::<Vec<_>>().join("; ")
                    }
                    other => {
                        let text = other.to_string();
                        let text = text.split_once(": ").map_or(text.as_str(), |(_, rest)| rest).to_string();
                        format!("error: {}", text.chars().take(120).collect::<String>())
                    }
                };
                reasons.entry(key).or_default().push(name);
            }
        }
    }
    let failed: usize = reasons.values().map(Vec::len).sum();
    let mut grouped: Vec<(&String, &Vec<String>)> = reasons.iter().collect();
    grouped.sort_by_key(|(_, cases)| std::cmp::Reverse(cases.len()));
    eprintln!("ONNX node tests: {imported} imported, {failed} failed, of {}", cases.len());
    for (reason, cases) in grouped {
        eprintln!("{:5}  {reason}  (e.g. {})", cases.len(), cases[..cases.len().min(3)].join(", "));
    }
    assert!(imported >= NODE_TESTS_IMPORTED_AT_LEAST, "only {imported} node tests imported");
}

/// 967 of the 1,765 node tests of onnx 1.22 imported when this was written.
const NODE_TESTS_IMPORTED_AT_LEAST: usize = 960;
