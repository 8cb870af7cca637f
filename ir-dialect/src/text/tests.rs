//! Text format tests: property-based round trips over random graphs, hand-written error cases, and
//! save/load through the safetensors side-car.

use super::*;
use crate::{pack_nibbles, Attr, Dim, Op, OpKind, Shape, TensorType, Value, ValueInfo};
use proptest::prelude::*;

/// Structural equality: same nodes in topological order with the same names, ops, input slots (by value
/// name), outputs, graph inputs and outputs.
fn assert_same_graph(a: &Graph, b: &Graph) {
    assert_eq!(a.name, b.name);
    let ia: Vec<_> = a.graph_inputs().iter().map(|&i| a.node(i).clone()).collect();
    let ib: Vec<_> = b.graph_inputs().iter().map(|&i| b.node(i).clone()).collect();
    assert_eq!(ia, ib);
    let (oa, ob) = (a.topo_order().unwrap(), b.topo_order().unwrap());
    assert_eq!(oa.len(), ob.len());
    let slot_names = |g: &Graph, id| -> Vec<Option<String>> {
        g.inputs(id).into_iter().map(|v| v.map(|v| g.value_name(v).to_string())).collect()
    };
    for (&x, &y) in oa.iter().zip(&ob) {
        assert_eq!(a.node(x), b.node(y));
        assert_eq!(slot_names(a, x), slot_names(b, y));
    }
    let outs = |g: &Graph| -> Vec<(String, String)> {
        g.graph_outputs().iter().map(|o| (o.name.clone(), g.value_name(o.value).to_string())).collect()
    };
    assert_eq!(outs(a), outs(b));
}

fn inline() -> PrintOptions {
    PrintOptions { constants: ConstantMode::Inline }
}

fn name_strategy() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z][a-z0-9_]{0,6}",
        "/model/layers\\.[0-9]/self_attn/[A-Za-z]{1,5}_output_[0-9]",
        "onnx::[A-Za-z]{1,4}_[0-9]{1,3}",
        "[ -~]{1,8}",
        "[a-z:]{1,4}",
        "\\PC{1,4}",
    ]
}

fn dim_strategy() -> impl Strategy<Value = Dim> {
    prop_oneof![
        (0u64..5000).prop_map(Dim::Known),
        prop_oneof!["[a-z_][a-z0-9_]{0,5}", "[ -~]{0,4}"].prop_map(|s| Dim::sym(&s)),
        Just(Dim::Unknown),
    ]
}

fn type_strategy() -> impl Strategy<Value = TensorType> {
    let dtype = proptest::sample::select(DType::ALL.to_vec());
    (dtype, proptest::option::weighted(0.9, proptest::collection::vec(dim_strategy(), 0..4)))
        .prop_map(|(d, dims)| TensorType { dtype: d, shape: dims.map(Shape) })
}

fn float_strategy() -> impl Strategy<Value = f32> {
    prop_oneof![
        any::<f32>().prop_filter("no NaN in attributes", |x| !x.is_nan()),
        Just(-0.0f32),
        Just(f32::INFINITY),
        Just(1e-5f32)
    ]
}

/// A tensor with arbitrary bytes of any dtype (bits chosen so that every pattern is printable exactly).
fn tensor_strategy() -> impl Strategy<Value = Tensor> {
    let dtype = proptest::sample::select(DType::ALL.to_vec());
    (dtype, proptest::collection::vec(0usize..4, 0..3), any::<u64>()).prop_map(|(dtype, dims, seed)| {
        let n: usize = dims.iter().product();
        let mut state = seed | 1;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let bytes: Vec<u8> = match dtype {
            DType::I4 | DType::U4 => pack_nibbles((0..n).map(|_| (next() % 16) as i64)),
            DType::Bool => (0..n).map(|_| (next() % 2) as u8).collect(),
            d => (0..d.storage_bytes(n)).map(|_| next() as u8).collect(),
        };
        Tensor::from_bytes(dtype, dims, Bytes::from(bytes)).unwrap()
    })
}

fn attr_strategy() -> impl Strategy<Value = Attr> {
    prop_oneof![
        any::<i64>().prop_map(Attr::Int),
        float_strategy().prop_map(Attr::Float),
        "\\PC{0,6}".prop_map(Attr::Str),
        proptest::collection::vec(any::<i64>(), 0..4).prop_map(Attr::Ints),
        proptest::collection::vec(float_strategy(), 0..4).prop_map(Attr::Floats),
        proptest::collection::vec("[ -~]{0,4}", 0..3).prop_map(Attr::Strs),
        proptest::sample::select(DType::ALL.to_vec()).prop_map(Attr::DType),
        tensor_strategy().prop_map(Attr::Tensor),
    ]
}

#[derive(Debug, Clone)]
struct NodeSpec {
    kind: OpKind,
    name: Option<String>,
    inputs: Vec<Option<usize>>,
    outputs: Vec<(String, TensorType)>,
    attrs: Vec<(String, Attr)>,
}

#[derive(Debug, Clone)]
struct GraphSpec {
    name: String,
    inputs: Vec<(String, TensorType)>,
    nodes: Vec<NodeSpec>,
    outputs: Vec<(String, usize)>,
}

fn node_strategy() -> impl Strategy<Value = NodeSpec> {
    let kinds: Vec<OpKind> = OpKind::ALL.iter().copied().filter(|&k| k != OpKind::Input).collect();
    (
        proptest::sample::select(kinds),
        proptest::option::of(name_strategy()),
        proptest::collection::vec(proptest::option::weighted(0.8, any::<usize>()), 0..4),
        proptest::collection::vec((name_strategy(), type_strategy()), 0..3),
        proptest::collection::vec(("[a-z_]{1,8}|[ -~]{1,4}", attr_strategy()), 0..4),
    )
        .prop_map(|(kind, name, inputs, outputs, attrs)| NodeSpec { kind, name, inputs, outputs, attrs })
}

fn graph_strategy() -> impl Strategy<Value = GraphSpec> {
    (
        name_strategy(),
        proptest::collection::vec((name_strategy(), type_strategy()), 0..4),
        proptest::collection::vec(node_strategy(), 0..8),
        proptest::collection::vec((name_strategy(), any::<usize>()), 0..3),
    )
        .prop_map(|(name, inputs, nodes, outputs)| GraphSpec { name, inputs, nodes, outputs })
}

/// Builds the graph, skipping duplicate names; inputs refer to any earlier value.
fn build(spec: &GraphSpec) -> Graph {
    let mut g = Graph::new(spec.name.clone());
    let mut values: Vec<Value> = Vec::new();
    for (name, ty) in &spec.inputs {
        if let Ok(v) = g.add_input(name, ty.clone()) {
            values.push(v);
        }
    }
    for n in &spec.nodes {
        let inputs: Vec<Option<Value>> =
            n.inputs.iter().map(|i| i.and_then(|i| (!values.is_empty()).then(|| values[i % values.len()]))).collect();
        let mut outputs: Vec<ValueInfo> = Vec::new();
        for (name, ty) in &n.outputs {
            if g.value_by_name(name).is_none() && !outputs.iter().any(|o| &o.name == name) {
                outputs.push(ValueInfo::new(name.clone(), ty.clone()));
            }
        }
        let node_name = n.name.clone().or_else(|| outputs.first().map(|o| o.name.clone())).unwrap_or_default();
        let mut op = Op::new(n.kind);
        for (k, a) in &n.attrs {
            op = op.with(k, a.clone());
        }
        let count = outputs.len();
        let id = g.add_node(node_name, op, &inputs, outputs).unwrap();
        values.extend((0..count).map(|p| Value::new(id, p as u32)));
    }
    if !values.is_empty() {
        for (name, i) in &spec.outputs {
            g.add_output(name.clone(), values[i % values.len()]);
        }
    }
    g
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn inline_round_trip_is_exact(spec in graph_strategy()) {
        let g = build(&spec);
        let text = print_with(&g, &inline()).text;
        let back = parse(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(&print_with(&back, &inline()).text, &text);
        assert_same_graph(&g, &back);
    }

    #[test]
    fn elided_text_round_trips(spec in graph_strategy()) {
        let g = build(&spec);
        let text = print(&g);
        let back = parse(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(print(&back), text);
    }

    #[test]
    fn parser_never_panics(text in "\\PC{0,200}") {
        let _ = parse(&text);
    }

    #[test]
    fn mutated_text_never_panics(spec in graph_strategy(), cut in any::<usize>(), insert in "[ -~]{0,3}") {
        let text = print_with(&build(&spec), &inline()).text;
        // Replace one character (or append at the end) with a few random ones.
        let boundaries: Vec<usize> = text.char_indices().map(|(i, _)| i).chain([text.len()]).collect();
        let k = cut % boundaries.len();
        let (at, next) = (boundaries[k], boundaries.get(k + 1).copied().unwrap_or(text.len()));
        let mutated = format!("{}{insert}{}", &text[..at], &text[next..]);
        if let Ok(g) = parse(&mutated) {
            let once = print_with(&g, &inline()).text;
            let twice = print_with(&parse(&once).unwrap(), &inline()).text;
            prop_assert_eq!(once, twice);
        }
    }
}

#[test]
fn example_prints_as_documented() {
    let mut g = Graph::new("smollm2");
    let ids =
        g.add_input("input_ids", TensorType::new(DType::I64, Shape(vec![Dim::sym("batch"), Dim::sym("seq")]))).unwrap();
    let embed = g.add_constant("embed", Tensor::from_slice(vec![8, 3], &[0.5f32; 24])).unwrap();
    let eps = g.add_constant("eps", Tensor::scalar(1e-5f32)).unwrap();
    let ty = TensorType::new(DType::F32, Shape(vec![Dim::sym("batch"), Dim::sym("seq"), Dim::Known(3)]));
    let gathered = g
        .add_node(
            "/model/embed_tokens/Gather",
            Op::new(OpKind::Gather).with("axis", Attr::Int(0)),
            &[Some(embed), Some(ids)],
            vec![ValueInfo::new("/model/embed_tokens/Gather_output_0", ty.clone())],
        )
        .unwrap();
    let add = g
        .add_node(
            "onnx::Add_7",
            Op::new(OpKind::Add),
            &[Some(Value::new(gathered, 0)), Some(eps)],
            vec![ValueInfo::new("onnx::Add_7", ty)],
        )
        .unwrap();
    g.add_output("logits", Value::new(add, 0));
    let expected = "graph @smollm2(%input_ids: i64[batch,seq]) -> (%logits) {
  %embed = constant {value = dense<f32[8,3], digest \"DIGEST\">} : f32[8,3]
  %eps = constant {value = dense<f32[] [1e-5]>} : f32[]
  %/model/embed_tokens/Gather_output_0 = gather(%embed, %input_ids) {axis = 0} : f32[batch,seq,3] loc(\"/model/embed_tokens/Gather\")
  %onnx::Add_7 = add(%/model/embed_tokens/Gather_output_0, %eps) : f32[batch,seq,3]
  return %onnx::Add_7
}
"
    .replace("DIGEST", &g.constant(embed).unwrap().digest());
    assert_eq!(print(&g), expected);
    let back = parse(&expected).unwrap();
    assert_eq!(print(&back), expected);
    let elided = back.constant(back.value_by_name("embed").unwrap()).unwrap();
    assert!(elided.data == crate::TensorData::Elided { digest: g.constant(embed).unwrap().digest() });
}

#[test]
fn special_floats_and_small_types_round_trip_exactly() {
    let text = "graph @g() -> (%a) {
  %a = constant {value = dense<f32[6] [0.1, -0.0, inf, -inf, nan, 0x7fc00001]>} : f32[6]
  %b = constant {value = dense<f16[3] [0.099975586, 65504.0, 0x7e01]>} : f16[3]
  %c = constant {value = dense<bf16[2] [1.0078125, -3.3895314e38]>} : bf16[2]
  %d = constant {value = dense<f8e4m3[4] [448.0, -0.001953125, nan, 0xff]>} : f8e4m3[4]
  %e = constant {value = dense<i4[3] [-8, 7, -1]>} : i4[3]
  %f = constant {value = dense<u64[1] [18446744073709551615]>} : u64[1]
  %g = constant {value = dense<bool[2] [true, false]>} : bool[2]
  %h = constant {value = dense<f64[1] [0.30000000000000004]>} : f64[1]
  return %a
}
";
    let g = parse(text).unwrap();
    assert_eq!(print_with(&g, &inline()).text, text);
    let t = |n: &str| g.constant(g.value_by_name(n).unwrap()).unwrap().clone();
    let a = t("a").to_vec::<f32>().unwrap();
    assert_eq!(a[0], 0.1f32);
    assert!(a[1] == 0.0 && a[1].is_sign_negative());
    assert_eq!(a[5].to_bits(), 0x7fc00001);
    assert_eq!(t("b").to_vec::<half::f16>().unwrap()[0], half::f16::from_f32(0.1));
    assert_eq!(t("d").bytes().unwrap().as_ref(), &[0x7e, 0x81, 0x7f, 0xff]);
    assert_eq!(t("e").to_i64_vec().unwrap(), vec![-8, 7, -1]);
    assert_eq!(t("f").to_vec::<u64>().unwrap(), vec![u64::MAX]);
    assert_eq!(t("h").to_vec::<f64>().unwrap(), vec![0.1 + 0.2]);
}

#[test]
fn graph_outputs_names_locs_and_absent_inputs() {
    let text = "graph @\"my graph\"(%x: f32[?,*]) -> () {\n  return\n}\n";
    assert!(parse(text).is_err(), "[?,*] is not a valid shape");
    let text = "graph @\"my graph\"(%x: f32[?,\"a b\",3] loc(\"in\"), %u: i8[*]) -> (%out, %\"out 2\", %x) {
  %q, %k = split(%x, _) {axis = -1, split = ints[], to = i4, \"weird key\" = [\"a\", \"\\\"\"]} : f32[*], f32[] loc(\"n\")
  clip(%q)
  %c = constant {value = dense<f32[2,2], digest \"abc\">} : f32[2,2]
  return %q, %k, %q
}
";
    let g = parse(text).unwrap();
    assert_eq!(print(&g), text);
    assert_eq!(g.graph_outputs()[2].name, "x");
    assert_eq!(g.node(g.graph_inputs()[0]).name, "in");
    let q = g.value_by_name("q").unwrap();
    assert_eq!(g.node(q.node).name, "n");
    assert_eq!(g.inputs(q.node), vec![Some(g.value_by_name("x").unwrap()), None]);
}

#[test]
fn parse_errors_say_where_and_what() {
    let cases: &[(&str, usize, usize, &str)] = &[
        ("graph @g() -> () {\n  %a = nope(%x) : f32[]\n  return\n}", 2, 8, "unknown op 'nope'"),
        ("graph @g() -> () {\n  %a = neg(%x) : f32[]\n  return\n}", 2, 12, "%x is not defined"),
        ("graph @g(%x: f32[2]) -> () {\n  %x = neg(%x) : f32[2]\n  return\n}", 2, 3, "defined twice"),
        ("graph @g(%x: f33[2]) -> () {\n  return\n}", 1, 14, "unknown dtype 'f33'"),
        ("graph @g() -> (%y) {\n  return\n}", 3, 1, "declares 1 outputs but returns 0"),
        (
            "graph @g() -> () {\n  %a = constant {value = dense<f32[3] [1.0, 2.0]>} : f32[3]\n  return\n}",
            2,
            39,
            "2 values for a shape of 3",
        ),
        (
            "graph @g() -> () {\n  %a = constant {value = dense<i8[1] [300]>} : i8[1]\n  return\n}",
            2,
            39,
            "out of range for i8",
        ),
        (
            "graph @g() -> () {\n  %a = constant {value = dense<f32[1], \"w\">} : f32[1]\n  return\n}",
            2,
            40,
            "expected 'digest'",
        ),
        (
            "graph @g() -> () {\n  %a = constant {value = dense_resource<f32[1], \"w\">} : f32[1]\n  return\n}",
            2,
            49,
            "resource \"w\" is not available",
        ),
        ("graph @g() -> () {\n  %a, %b = neg(_) : f32[1]\n  return\n}", 2, 3, "2 outputs but 1 types"),
        ("graph @g() -> () {\n  %a = neg(_) {x = 1, x = 2} : f32[1]\n  return\n}", 2, 23, "given twice"),
        ("graph @g() -> () {\n  %a = neg(_) {s = \"abc} : f32[1]\n  return\n}", 2, 20, "unterminated string"),
        ("graph @g() -> () {\n  return\n} extra", 3, 3, "expected end of input"),
        ("graph @g() -> () {\n  %\"\" = neg(_) : f32[1]\n  return\n}", 2, 3, "must not be empty"),
        ("", 1, 1, "expected 'graph'"),
    ];
    for &(text, line, col, needle) in cases {
        let err = parse(text).unwrap_err();
        assert!(err.message.contains(needle), "{text:?}: got {err}, wanted {needle:?}");
        assert_eq!((err.line, err.col), (line, col), "{text:?}: {err}");
    }
}

#[test]
fn save_and_load_round_trip_with_zero_copy_weights() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.qir");
    let mut g = Graph::new("m");
    let x = g.add_input("x", TensorType::new(DType::F32, Shape(vec![Dim::sym("t"), Dim::Known(64)]))).unwrap();
    let values: Vec<f32> = (0..64 * 32).map(|i| (i as f32 * 0.37).sin()).collect();
    let w = g.add_constant("model.layers.0.q_proj.weight", Tensor::from_slice(vec![32, 64], &values)).unwrap();
    let q4 = Tensor::from_bytes(DType::I4, vec![5, 7], Bytes::from(pack_nibbles((0..35).map(|i| i % 16 - 8)))).unwrap();
    let w4 = g.add_constant("w4", q4.clone()).unwrap();
    let f8 = Tensor::from_bytes(DType::F8E4M3, vec![40], Bytes::from((0u8..40).collect::<Vec<_>>())).unwrap();
    let w8 = g.add_constant("w8", f8.clone()).unwrap();
    let eps = g.add_constant("eps", Tensor::scalar(1e-6f32)).unwrap();
    let y = g.add_op(
        Op::new(OpKind::MatMul),
        &[x, w],
        TensorType::new(DType::F32, Shape(vec![Dim::sym("t"), Dim::Known(32)])),
    );
    g.add_output("y", y);
    for v in [w4, w8, eps] {
        g.add_output(g.value_name(v).to_string(), v);
    }
    save(&path, &g).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("dense_resource<f32[32,64], \"model.layers.0.q_proj.weight\">"), "{text}");
    assert!(text.contains("dense<f32[] [1e-6]>"), "{text}");
    let back = load(&path).unwrap();
    assert_same_graph(&g, &back);
    let loaded = back.constant(back.value_by_name("model.layers.0.q_proj.weight").unwrap()).unwrap();
    assert_eq!(loaded.to_vec::<f32>().unwrap(), values);
    assert_eq!(back.constant(back.value_by_name("w4").unwrap()).unwrap(), &q4);
    assert_eq!(back.constant(back.value_by_name("w8").unwrap()).unwrap(), &f8);
    // The weights are views into the mapped side-car file, not copies.
    let file = std::fs::read(weights_path(&path)).unwrap();
    let bytes = loaded.bytes().unwrap();
    let header = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize + 8;
    assert!(file[header..].windows(bytes.len()).any(|w| w == bytes.as_ref()));
    // Saving again over the old files works (rename over existing).
    save(&path, &back).unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    // Only the two result files remain: no temporaries left behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
}

#[test]
fn fuzz_seeds_parse_and_print_canonically() {
    let seed = include_str!("../../../fuzz/seeds/attention.qir");
    let g = parse(seed).unwrap();
    let printed = print(&g);
    assert_eq!(print(&parse(&printed).unwrap()), printed);
    // The seed is written by hand in non-canonical attribute order; canonical printing sorts attributes.
    assert!(printed.contains("{auto_pad = \"VALID\", dilations = [1], eps = 1e-5, fl = floats[]"), "{printed}");
}
