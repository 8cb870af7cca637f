//! Rule effects through the whole bridge (graph -> e-graph -> rules -> extraction -> graph).

use super::{rules::rules, GraphEGraph, RunLimits};
use crate::const_eval::evaluate;
use egg::StopReason;
use qcc_ir::{Attr, DType, Dim, Graph, Op, OpKind, Shape, Tensor, TensorType, Value};
use std::collections::HashMap;
use std::time::Duration;

fn f32t(dims: &[usize]) -> TensorType {
    TensorType::known(DType::F32, dims)
}

fn canonicalize(g: &Graph, limits: RunLimits) -> (Graph, super::RunReport) {
    let bridge = GraphEGraph::from_graph(g, 4096).unwrap();
    let (bridge, report) = bridge.saturate(&rules(), limits);
    let out = bridge.to_graph().unwrap();
    crate::verify::verify(&out).unwrap();
    (out, report)
}

fn run(g: &Graph) -> Graph {
    canonicalize(g, RunLimits::default()).0
}

fn count(g: &Graph, kind: OpKind) -> usize {
    g.node_ids().filter(|&n| g.node(n).op.kind == kind).count()
}

fn output(g: &Graph, i: usize) -> Value {
    g.graph_outputs()[i].value
}

/// Evaluates a graph node by node (test oracle for rewrites that must preserve values).
fn eval_graph(g: &Graph, inputs: &[(&str, Tensor)]) -> Vec<Tensor> {
    let mut vals: HashMap<Value, Tensor> = HashMap::new();
    for id in g.topo_order().unwrap() {
        let node = g.node(id);
        let outs = match node.op.kind {
            OpKind::Input => vec![inputs.iter().find(|(n, _)| *n == node.outputs[0].name).unwrap().1.clone()],
            OpKind::Constant => vec![node.op.tensor("value").unwrap().clone()],
            _ => {
                let ins: Vec<Option<Tensor>> = g.inputs(id).iter().map(|v| v.map(|v| vals[&v].clone())).collect();
                let shapes: Vec<Option<Vec<usize>>> = ins.iter().map(|t| t.as_ref().map(|t| t.dims.clone())).collect();
                evaluate(&node.op, &ins, &shapes).unwrap().unwrap_or_else(|| panic!("cannot evaluate {}", node.op.kind))
            }
        };
        for (p, t) in outs.into_iter().enumerate() {
            vals.insert(Value::new(id, p as u32), t);
        }
    }
    g.graph_outputs().iter().map(|o| vals[&o.value].clone()).collect()
}

#[test]
fn mul_by_one_and_add_zero_disappear() {
    let mut g = Graph::new("t");
    let x = g.add_input("x", f32t(&[2, 3])).unwrap();
    let one = g.add_constant("one", Tensor::scalar(1f32)).unwrap();
    let zero = g.add_constant("zero", Tensor::from_slice(vec![3], &[0f32; 3])).unwrap();
    let m = g.add_op(Op::new(OpKind::Mul), &[one, x], f32t(&[2, 3]));
    let a = g.add_op(Op::new(OpKind::Add), &[m, zero], f32t(&[2, 3]));
    let d = g.add_op(Op::new(OpKind::Div), &[a, one], f32t(&[2, 3]));
    g.add_output("y", d);
    let out = run(&g);
    assert_eq!(out.node_count(), 1, "only the input remains");
    assert_eq!(out.node(output(&out, 0).node).op.kind, OpKind::Input);
    assert_eq!(out.graph_outputs()[0].name, "y");
}

#[test]
fn broadcasting_by_one_is_not_an_identity() {
    // x[3] * ones[2,3] has shape [2,3]: replacing it by x would change the type.
    let mut g = Graph::new("t");
    let x = g.add_input("x", f32t(&[3])).unwrap();
    let ones = g.add_constant("ones", Tensor::from_slice(vec![2, 3], &[1f32; 6])).unwrap();
    let m = g.add_op(Op::new(OpKind::Mul), &[x, ones], f32t(&[2, 3]));
    g.add_output("y", m);
    let out = run(&g);
    assert_eq!(count(&out, OpKind::Mul), 1);
    // Near miss on the value: x * 2 stays.
    let mut g = Graph::new("t");
    let x = g.add_input("x", f32t(&[3])).unwrap();
    let two = g.add_constant("two", Tensor::scalar(2f32)).unwrap();
    let m = g.add_op(Op::new(OpKind::Mul), &[x, two], f32t(&[3]));
    g.add_output("y", m);
    assert_eq!(count(&run(&g), OpKind::Mul), 1);
}

fn transpose(g: &mut Graph, x: Value, perm: &[i64], dims: &[usize]) -> Value {
    g.add_op(Op::new(OpKind::Transpose).with("perm", Attr::Ints(perm.to_vec())), &[x], f32t(dims))
}

#[test]
fn double_transpose_cancels_or_composes() {
    let mut g = Graph::new("t");
    let x = g.add_input("x", f32t(&[2, 3, 4])).unwrap();
    let t1 = transpose(&mut g, x, &[1, 2, 0], &[3, 4, 2]);
    let t2 = transpose(&mut g, t1, &[2, 0, 1], &[2, 3, 4]);
    g.add_output("y", t2);
    let out = run(&g);
    assert_eq!(count(&out, OpKind::Transpose), 0);
    assert_eq!(out.node(output(&out, 0).node).op.kind, OpKind::Input);

    let mut g = Graph::new("t");
    let x = g.add_input("x", f32t(&[2, 3, 4])).unwrap();
    let t1 = transpose(&mut g, x, &[1, 0, 2], &[3, 2, 4]);
    let t2 = transpose(&mut g, t1, &[0, 2, 1], &[3, 4, 2]);
    g.add_output("y", t2);
    let out = run(&g);
    assert_eq!(count(&out, OpKind::Transpose), 1);
    let xs: Vec<f32> = (0..24).map(|i| i as f32).collect();
    let input = Tensor::from_slice(vec![2, 3, 4], &xs);
    // Reference by index arithmetic: y[i,j,k] = t1[i,k,j] = x[k,i,j].
    let mut expected = vec![0f32; 24];
    for i in 0..3 {
        for j in 0..4 {
            for k in 0..2 {
                expected[(i * 4 + j) * 2 + k] = xs[(k * 3 + i) * 4 + j];
            }
        }
    }
    let got = eval_graph(&out, &[("x", input)]).remove(0);
    assert_eq!(got.dims, vec![3, 4, 2]);
    assert_eq!(got.to_vec::<f32>().unwrap(), expected);
}

fn reshape(g: &mut Graph, x: Value, target: &[i64], dims: &[usize]) -> Value {
    let name = g.fresh_name("shape");
    let t = g.add_constant(&name, Tensor::from_slice(vec![target.len()], target)).unwrap();
    g.add_op(Op::new(OpKind::Reshape), &[x, t], f32t(dims))
}

#[test]
fn reshape_of_reshape_keeps_only_the_outer_target() {
    let mut g = Graph::new("t");
    let x = g.add_input("x", f32t(&[2, 3, 4])).unwrap();
    let r1 = reshape(&mut g, x, &[6, 4], &[6, 4]);
    let r2 = reshape(&mut g, r1, &[4, -1], &[4, 6]);
    g.add_output("y", r2);
    let out = run(&g);
    assert_eq!(count(&out, OpKind::Reshape), 1);
    let r = output(&out, 0);
    assert_eq!(out.node(r.node).op.kind, OpKind::Reshape);
    assert_eq!(out.node(out.input(r.node, 0).unwrap().node).op.kind, OpKind::Input);
    // Near miss: an outer target with 0 copies a dim of the inner result, so it must stay.
    let mut g = Graph::new("t");
    let x = g.add_input("x", f32t(&[2, 3, 4])).unwrap();
    let r1 = reshape(&mut g, x, &[6, 4], &[6, 4]);
    let r2 = reshape(&mut g, r1, &[0, 2, 2], &[6, 2, 2]);
    g.add_output("y", r2);
    assert_eq!(count(&run(&g), OpKind::Reshape), 2);
}

#[test]
fn reshape_to_the_same_symbolic_shape_is_removed() {
    let ty = TensorType::new(DType::F32, Shape(vec![Dim::sym("seq"), Dim::Known(4)]));
    let mut g = Graph::new("t");
    let x = g.add_input("x", ty.clone()).unwrap();
    let t = g.add_constant("s", Tensor::from_slice(vec![2], &[0i64, 4])).unwrap();
    let r = g.add_op(Op::new(OpKind::Reshape), &[x, t], ty);
    g.add_output("y", r);
    assert_eq!(count(&run(&g), OpKind::Reshape), 0);
}

fn qdq_graph(requant_step: f32, inner_dtype: DType) -> Graph {
    let mut g = Graph::new("t");
    let q = g.add_input("q", TensorType::known(inner_dtype, &[4])).unwrap();
    let s = g.add_constant("s", Tensor::scalar(0.05f32)).unwrap();
    let s2 = g.add_constant("s2", Tensor::scalar(requant_step)).unwrap();
    let d = g.add_op(Op::new(OpKind::Dequantize), &[q, s], f32t(&[4]));
    let q2 = g.add_op(
        Op::new(OpKind::Quantize).with("to", Attr::DType(DType::I8)),
        &[d, s2],
        TensorType::known(DType::I8, &[4]),
    );
    g.add_output("y", q2);
    g
}

#[test]
fn quantize_of_dequantize_with_the_same_step_folds() {
    let out = run(&qdq_graph(0.05, DType::I8));
    assert_eq!(out.node_count(), 1);
    // Different step: not an identity.
    let out = run(&qdq_graph(0.1, DType::I8));
    assert_eq!((count(&out, OpKind::Quantize), count(&out, OpKind::Dequantize)), (1, 1));
    // q of a different integer type (i4 requantized to i8): types differ, no fold.
    let out = run(&qdq_graph(0.05, DType::I4));
    assert_eq!(count(&out, OpKind::Quantize), 1);
}

#[test]
fn dequantize_of_quantize_is_never_folded() {
    let mut g = Graph::new("t");
    let x = g.add_input("x", f32t(&[4])).unwrap();
    let s = g.add_constant("s", Tensor::scalar(0.05f32)).unwrap();
    let q = g.add_op(
        Op::new(OpKind::Quantize).with("to", Attr::DType(DType::I8)),
        &[x, s],
        TensorType::known(DType::I8, &[4]),
    );
    let d = g.add_op(Op::new(OpKind::Dequantize), &[q, s], f32t(&[4]));
    g.add_output("y", d);
    let out = run(&g);
    assert_eq!((count(&out, OpKind::Quantize), count(&out, OpKind::Dequantize)), (1, 1));
}

#[test]
fn requantize_exactness_holds_for_every_int8_value() {
    // The fold's claim, checked directly: round((q * s) / s) == q in f32 for all int8 q and varied s.
    for s in [0.05f32, 1e-3, 7.3, 2f32.powi(-90), 3.0e20] {
        for q in -128i32..=127 {
            let x = q as f32 * s;
            assert_eq!((x / s).round_ties_even() as i32, q, "q={q} s={s}");
        }
    }
}

#[test]
fn matmul_of_transposed_weight_becomes_gemm() {
    let mut g = Graph::new("t");
    let a = g.add_input("a", f32t(&[5, 4])).unwrap();
    let w = g.add_input("w", f32t(&[3, 4])).unwrap();
    let wt = transpose(&mut g, w, &[1, 0], &[4, 3]);
    let m = g.add_op(Op::new(OpKind::MatMul), &[a, wt], f32t(&[5, 3]));
    g.add_output("y", m);
    let out = run(&g);
    assert_eq!((count(&out, OpKind::Gemm), count(&out, OpKind::Transpose), count(&out, OpKind::MatMul)), (1, 0, 0));
    let gemm = output(&out, 0);
    assert_eq!(out.node(gemm.node).op.int("transB"), Some(1));
    assert_eq!(out.value_type(gemm), &f32t(&[5, 3]));
    // Rank-3 activations: gemm is 2-D only, so the rule must not fire.
    let mut g = Graph::new("t");
    let a = g.add_input("a", f32t(&[2, 5, 4])).unwrap();
    let w = g.add_input("w", f32t(&[3, 4])).unwrap();
    let wt = transpose(&mut g, w, &[1, 0], &[4, 3]);
    let m = g.add_op(Op::new(OpKind::MatMul), &[a, wt], f32t(&[2, 5, 3]));
    g.add_output("y", m);
    assert_eq!(count(&run(&g), OpKind::Gemm), 0);
}

#[test]
fn constants_fold_and_duplicates_merge() {
    let mut g = Graph::new("t");
    let x = g.add_input("x", f32t(&[3])).unwrap();
    let unused = g.add_input("unused", f32t(&[1])).unwrap();
    let a = g.add_constant("a", Tensor::from_slice(vec![3], &[1f32, 2., 3.])).unwrap();
    let b = g.add_constant("b", Tensor::from_slice(vec![3], &[0.5f32, 0.25, 2.])).unwrap();
    let ab = g.add_op(Op::new(OpKind::Mul), &[a, b], f32t(&[3]));
    let e1 = g.add_op(Op::new(OpKind::Exp), &[x], f32t(&[3]));
    let e2 = g.add_op(Op::new(OpKind::Exp), &[x], f32t(&[3]));
    let s = g.add_op(Op::new(OpKind::Add), &[e1, e2], f32t(&[3]));
    let y = g.add_op(Op::new(OpKind::Add), &[s, ab], f32t(&[3]));
    g.add_output("y", y);
    let out = run(&g);
    assert_eq!(count(&out, OpKind::Exp), 1, "identical exp nodes merge");
    assert_eq!(count(&out, OpKind::Mul), 0, "a*b folds");
    assert_eq!(out.graph_inputs().len(), 2);
    assert_eq!(out.value_name(Value::new(out.graph_inputs()[1], 0)), "unused");
    let _ = unused;
    let xs = Tensor::from_slice(vec![3], &[0f32, 1., -1.]);
    let got = eval_graph(&out, &[("x", xs.clone()), ("unused", Tensor::from_slice(vec![1], &[0f32]))]).remove(0);
    let want: Vec<f32> = [0f32, 1., -1.].iter().zip([0.5f32, 0.5, 6.]).map(|(x, c)| 2.0 * x.exp() + c).collect();
    assert_eq!(got.to_vec::<f32>().unwrap(), want);
}

#[test]
fn multi_output_nodes_and_shared_subgraphs_are_rebuilt_once() {
    let mut g = Graph::new("t");
    let x = g.add_input("x", f32t(&[4])).unwrap();
    let one = g.add_constant("one", Tensor::scalar(1f32)).unwrap();
    let shared = g.add_op(Op::new(OpKind::Exp), &[x], f32t(&[4]));
    let split = g
        .add_node(
            "split0",
            Op::new(OpKind::Split).with("axis", Attr::Int(0)).with("num_outputs", Attr::Int(2)),
            &[Some(shared)],
            vec![qcc_ir::ValueInfo::new("lo", f32t(&[2])), qcc_ir::ValueInfo::new("hi", f32t(&[2]))],
        )
        .unwrap();
    let lo = g.add_op(Op::new(OpKind::Mul), &[Value::new(split, 0), one], f32t(&[2]));
    let hi = g.add_op(Op::new(OpKind::Neg), &[Value::new(split, 1)], f32t(&[2]));
    g.add_output("lo", lo);
    g.add_output("hi", hi);
    g.add_output("shared", shared);
    let out = run(&g);
    assert_eq!(count(&out, OpKind::Split), 1);
    assert_eq!(count(&out, OpKind::Exp), 1);
    assert_eq!(count(&out, OpKind::Mul), 0);
    let lo = output(&out, 0);
    assert_eq!((out.value_name(lo), lo.port), ("lo", 0));
    assert_eq!(out.node(lo.node).name, "split0");
    assert_eq!(out.value_name(Value::new(lo.node, 1)), "hi");
}

#[test]
fn runner_stop_reasons_are_reported() {
    let mut g = Graph::new("t");
    let x = g.add_input("x", f32t(&[2, 3])).unwrap();
    let one = g.add_constant("one", Tensor::scalar(1f32)).unwrap();
    let mut v = x;
    for _ in 0..4 {
        v = g.add_op(Op::new(OpKind::Neg), &[v], f32t(&[2, 3]));
    }
    let m = g.add_op(Op::new(OpKind::Mul), &[v, one], f32t(&[2, 3]));
    g.add_output("y", m);
    let (out, report) = canonicalize(&g, RunLimits::default());
    assert!(matches!(report.stop_reason, StopReason::Saturated), "{:?}", report.stop_reason);
    assert_eq!(out.node_count(), 1);
    assert!(report.applied["neg-neg"] >= 2 && report.applied["mul-one-right"] >= 1, "{report:?}");
    let one_iteration = RunLimits { iterations: 1, ..RunLimits::default() };
    let (_, report) = canonicalize(&g, one_iteration);
    assert!(matches!(report.stop_reason, StopReason::IterationLimit(1)), "{:?}", report.stop_reason);
    let tiny = RunLimits { nodes: 3, ..RunLimits::default() };
    let (out, report) = canonicalize(&g, tiny);
    // egg reports the e-graph size that exceeded the limit.
    assert!(matches!(report.stop_reason, StopReason::NodeLimit(n) if n > 3), "{:?}", report.stop_reason);
    assert_eq!(count(&out, OpKind::Neg), 4, "stopped before any rule ran");
    let no_time = RunLimits { time: Duration::ZERO, ..RunLimits::default() };
    let (_, report) = canonicalize(&g, no_time);
    assert!(matches!(report.stop_reason, StopReason::TimeLimit(_)), "{:?}", report.stop_reason);
    assert!(report.summary().contains("time limit"));
}
