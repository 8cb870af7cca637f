//! Unit tests of the executor and of each op family, against hand-computed or f64-computed values.
#![allow(clippy::cloned_ref_to_slice_refs)] // tests pass owned copies of shared inputs

use super::*;
use qcc_ir::{Attr, DType, Op, Shape, Tensor};

pub(crate) fn f32t(dims: &[usize], v: &[f32]) -> RtTensor {
    RtTensor::from_vec(dims, v.to_vec()).unwrap()
}

pub(crate) fn i64t(dims: &[usize], v: &[i64]) -> RtTensor {
    RtTensor::from_vec(dims, v.to_vec()).unwrap()
}

pub(crate) fn f32s(t: &RtTensor) -> Vec<f32> {
    t.cast_array::<f32>().iter().copied().collect()
}

pub(crate) fn i64s(t: &RtTensor) -> Vec<i64> {
    t.to_i64_vec().unwrap()
}

pub(crate) fn close(actual: &[f32], expected: &[f32], tol: f32) {
    assert_eq!(actual.len(), expected.len(), "{actual:?} vs {expected:?}");
    for (a, e) in actual.iter().zip(expected) {
        assert!((a - e).abs() <= tol * (1.0 + e.abs()) || (a.is_nan() && e.is_nan()), "{actual:?} vs {expected:?}");
    }
}

/// Runs one op on `inputs` (`None` = absent optional input) through a one-node graph.
pub(crate) fn try_run(op: Op, inputs: &[Option<RtTensor>], outputs: usize) -> Result<Vec<RtTensor>, ExecError> {
    let mut g = Graph::new("t");
    let mut slots = Vec::new();
    for (i, t) in inputs.iter().enumerate() {
        slots
            .push(t.as_ref().map(|t| g.add_input(&format!("in{i}"), TensorType::known(t.dtype(), t.shape())).unwrap()));
    }
    let infos = (0..outputs).map(|i| ValueInfo::new(format!("out{i}"), TensorType::unranked(DType::F32))).collect();
    let id = g.add_node("node", op, &slots, infos).unwrap();
    for i in 0..outputs {
        g.add_output(format!("out{i}"), Value::new(id, i as u32));
    }
    let exec = CpuExecutor::new(&g)?;
    let named: Vec<(String, RtTensor)> =
        inputs.iter().enumerate().filter_map(|(i, t)| t.clone().map(|t| (format!("in{i}"), t))).collect();
    let args: Vec<(&str, RtTensor)> = named.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    Ok(exec.run(&args)?.into_iter().map(|(_, t)| t).collect())
}

pub(crate) fn run1(op: Op, inputs: &[RtTensor]) -> RtTensor {
    let inputs: Vec<Option<RtTensor>> = inputs.iter().cloned().map(Some).collect();
    try_run(op, &inputs, 1).unwrap().remove(0)
}

pub(crate) fn op(kind: OpKind) -> Op {
    Op::new(kind)
}

#[test]
fn broadcasting_arithmetic() {
    let a = f32t(&[2, 3], &[1., 2., 3., 4., 5., 6.]);
    let row = f32t(&[3], &[10., 20., 30.]);
    let col = f32t(&[2, 1], &[100., 200.]);
    assert_eq!(f32s(&run1(op(OpKind::Add), &[a.clone(), row.clone()])), [11., 22., 33., 14., 25., 36.]);
    let out = run1(op(OpKind::Sub), &[col.clone(), row]);
    assert_eq!(out.shape(), [2, 3]);
    assert_eq!(f32s(&out), [90., 80., 70., 190., 180., 170.]);
    assert_eq!(f32s(&run1(op(OpKind::Mul), &[a.clone(), RtTensor::scalar(2f32)])), [2., 4., 6., 8., 10., 12.]);
    assert_eq!(f32s(&run1(op(OpKind::Div), &[a, col])), [0.01, 0.02, 0.03, 0.02, 0.025, 0.03]);
    let err = try_run(op(OpKind::Add), &[Some(f32t(&[2], &[1., 2.])), Some(f32t(&[3], &[1., 2., 3.]))], 1).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("node") && msg.contains("add") && msg.contains("[2]") && msg.contains("[3]"), "{msg}");
}

#[test]
fn large_parallel_elementwise_matches_serial() {
    let n = 100_000;
    let a: Vec<f32> = (0..n).map(|i| i as f32 * 0.001).collect();
    let b: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
    let out = run1(op(OpKind::Mul), &[f32t(&[n], &a), f32t(&[n], &b)]);
    let expected: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x * y).collect();
    assert_eq!(f32s(&out), expected);
    let wide = f32t(&[400, 250], &a);
    let bias: Vec<f32> = (0..250).map(|i| i as f32).collect();
    let out = run1(op(OpKind::Add), &[wide, f32t(&[250], &bias)]);
    assert_eq!(f32s(&out)[251], a[251] + 1.0);
}

#[test]
fn integer_arithmetic_wraps_and_mod_follows_sign_rules() {
    let a = RtTensor::from_vec(&[3], vec![i32::MAX, -7, 7]).unwrap();
    let b = RtTensor::from_vec(&[3], vec![1i32, 2, -2]).unwrap();
    assert_eq!(i64s(&run1(op(OpKind::Add), &[a.clone(), b.clone()])), [i32::MIN as i64, -5, 5]);
    assert_eq!(i64s(&run1(op(OpKind::Div), &[a.clone(), b.clone()])), [i32::MAX as i64, -3, -3]);
    // Python-style mod takes the divisor's sign; fmod the dividend's.
    assert_eq!(i64s(&run1(op(OpKind::Mod), &[a.clone(), b.clone()])), [0, 1, -1]);
    assert_eq!(i64s(&run1(op(OpKind::Mod).with("fmod", Attr::Int(1)), &[a, b])), [0, -1, 1]);
    let fa = f32t(&[2], &[-4.5, 5.5]);
    let fb = f32t(&[2], &[2.0, -2.0]);
    assert_eq!(f32s(&run1(op(OpKind::Mod).with("fmod", Attr::Int(1)), &[fa, fb])), [-0.5, 1.5]);
}

#[test]
fn unary_math_against_f64() {
    let xs = [-3.0f32, -0.5, 0.0, 0.7, 2.5];
    let x = f32t(&[5], &xs);
    let check = |kind: OpKind, f: fn(f64) -> f64| {
        let expected: Vec<f32> = xs.iter().map(|&v| f(v as f64) as f32).collect();
        close(&f32s(&run1(op(kind), &[x.clone()])), &expected, 1e-6);
    };
    check(OpKind::Exp, f64::exp);
    check(OpKind::Tanh, f64::tanh);
    check(OpKind::Sigmoid, |v| 1.0 / (1.0 + (-v).exp()));
    check(OpKind::Softplus, |v| (1.0 + v.exp()).ln());
    check(OpKind::Erf, libm::erf);
    check(OpKind::Relu, |v| v.max(0.0));
    check(OpKind::Gelu, |v| 0.5 * v * (1.0 + libm::erf(v / 2f64.sqrt())));
    let tanh_gelu = run1(op(OpKind::Gelu).with("approximate", Attr::Str("tanh".into())), &[x.clone()]);
    let expected: Vec<f32> = xs
        .iter()
        .map(|&v| {
            let v = v as f64;
            (0.5 * v * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v.powi(3))).tanh())) as f32
        })
        .collect();
    close(&f32s(&tanh_gelu), &expected, 1e-6);
    let leaky = run1(op(OpKind::LeakyRelu).with("alpha", Attr::Float(0.1)), &[x.clone()]);
    close(&f32s(&leaky), &[-0.3, -0.05, 0.0, 0.7, 2.5], 1e-7);
    // Round: half to even.
    let r = run1(op(OpKind::Round), &[f32t(&[6], &[0.5, 1.5, 2.5, -0.5, -1.5, 2.4])]);
    assert_eq!(f32s(&r), [0., 2., 2., -0., -2., 2.]);
}

#[test]
fn half_types_compute_in_f32() {
    let h = RtTensor::from_vec(&[2], vec![half::f16::from_f32(1.5), half::f16::from_f32(-2.0)]).unwrap();
    let out = run1(op(OpKind::Mul), &[h.clone(), h.clone()]);
    assert_eq!(out.dtype(), DType::F16);
    assert_eq!(f32s(&out), [2.25, 4.0]);
    let bf = h.cast(DType::BF16);
    assert_eq!(f32s(&run1(op(OpKind::Neg), &[bf])), [-1.5, 2.0]);
}

#[test]
fn comparisons_logic_where_clip() {
    let a = f32t(&[3], &[1., 2., 3.]);
    let b = f32t(&[1], &[2.]);
    let less = run1(op(OpKind::Less), &[a.clone(), b.clone()]);
    assert_eq!(less, RtTensor::from_vec(&[3], vec![true, false, false]).unwrap());
    let ge = run1(op(OpKind::GreaterOrEqual), &[a.clone(), b.clone()]);
    let not_less = run1(op(OpKind::Not), &[less.clone()]);
    assert_eq!(ge, not_less);
    let w = run1(op(OpKind::Where), &[less.clone(), a.clone(), f32t(&[], &[-1.])]);
    assert_eq!(f32s(&w), [1., -1., -1.]);
    let x = run1(op(OpKind::Xor), &[less, RtTensor::scalar(true)]);
    assert_eq!(x, ge);
    let c = try_run(op(OpKind::Clip), &[Some(f32t(&[4], &[-5., 0.5, 3., 9.])), None, Some(RtTensor::scalar(2f32))], 1)
        .unwrap();
    assert_eq!(f32s(&c[0]), [-5., 0.5, 2., 2.]);
    let ci = run1(op(OpKind::Clip), &[i64t(&[3], &[-5, 1, 7]), RtTensor::scalar(0i64), RtTensor::scalar(3i64)]);
    assert_eq!(i64s(&ci), [0, 1, 3]);
    let variadic = run1(op(OpKind::Max), &[a.clone(), b.clone(), f32t(&[3], &[0., 0., 5.])]);
    assert_eq!(f32s(&variadic), [2., 2., 5.]);
    let mean = run1(op(OpKind::Mean), &[a, f32t(&[3], &[3., 4., 5.])]);
    assert_eq!(f32s(&mean), [2., 3., 4.]);
}

#[test]
fn cast_between_types() {
    let x = f32t(&[6], &[-1.7, 0.0, 2.5, 300.0, 1e6, f32::NAN]);
    let to = |d: DType| op(OpKind::Cast).with("to", Attr::DType(d));
    assert_eq!(i64s(&run1(to(DType::I32), &[x.clone()]))[..4], [-1, 0, 2, 300]);
    let b = run1(to(DType::Bool), &[x.clone()]);
    assert_eq!(b, RtTensor::from_vec(&[6], vec![true, false, true, true, true, true]).unwrap());
    let f8 = run1(to(DType::F8E4M3), &[x.clone()]);
    let back = f32s(&f8);
    assert_eq!(&back[..5], &[-1.75, 0.0, 2.5, 288.0, 448.0]);
    assert!(back[5].is_nan());
    let no_sat = run1(to(DType::F8E4M3).with("saturate", Attr::Int(0)), &[x.clone()]);
    assert!(f32s(&no_sat)[4].is_nan());
    let h = run1(to(DType::F16), &[f32t(&[1], &[65520.0])]);
    assert!(f32s(&h)[0].is_infinite());
    let i4 = run1(to(DType::I4), &[f32t(&[4], &[-9.0, 2.5, 3.5, 100.0])]);
    // Integer targets truncate then wrap, 4-bit ones included (ONNX Cast-25 node tests).
    assert_eq!(i64s(&i4), [7, 2, 3, 4]);
    let u8s = run1(to(DType::U8), &[i64t(&[2], &[256 + 3, -1])]);
    assert_eq!(i64s(&u8s), [3, 255]);
    let like = run1(op(OpKind::CastLike), &[i64t(&[1], &[3]), f32t(&[1], &[0.])]);
    assert_eq!(like.dtype(), DType::F32);
}

#[test]
fn ir_tensor_round_trip() {
    for t in [
        RtTensor::from_vec(&[2, 2], vec![1i8, -8, 7, 0]).unwrap().cast(DType::I4),
        RtTensor::from_vec(&[3], vec![true, false, true]).unwrap(),
        f32t(&[2], &[1.0, -0.5]).cast(DType::F8E4M3),
        f32t(&[2], &[1.0, -0.5]).cast(DType::BF16),
        RtTensor::from_vec(&[1], vec![u64::MAX]).unwrap(),
    ] {
        let ir = t.to_ir_tensor();
        assert_eq!(ir.dtype, t.dtype());
        assert_eq!(RtTensor::from_ir_tensor(&ir).unwrap(), t);
    }
    let packed = RtTensor::from_vec(&[3], vec![1i8, -1, 2]).unwrap().cast(DType::I4).to_ir_tensor();
    assert_eq!(packed.bytes().unwrap().as_ref(), &[0xf1, 0x02]);
}

#[test]
fn missing_input_and_shape_mismatch_are_errors() {
    let mut g = Graph::new("t");
    let x = g.add_input("x", TensorType::known(DType::F32, &[2])).unwrap();
    let y = g.add_input("y", TensorType::new(DType::F32, Shape(vec![qcc_ir::Dim::sym("n")]))).unwrap();
    let s = g.add_op(op(OpKind::Add), &[x, y], TensorType::known(DType::F32, &[2]));
    g.add_output("s", s);
    let exec = CpuExecutor::new(&g).unwrap();
    let err = exec.run(&[("x", f32t(&[2], &[1., 2.]))]).unwrap_err();
    assert!(matches!(&err, ExecError::MissingInput(n) if n == "y"), "{err}");
    let err = exec.run(&[("x", f32t(&[3], &[1., 2., 3.])), ("y", f32t(&[2], &[1., 2.]))]).unwrap_err();
    assert!(matches!(&err, ExecError::InputMismatch { .. }) && err.to_string().contains("f32[2]"), "{err}");
    let err = exec.run(&[("x", f32t(&[2], &[1., 2.])), ("y", f32t(&[3], &[1., 2., 3.]))]).unwrap_err();
    assert!(matches!(&err, ExecError::Node { op: "add", .. }), "{err}");
    assert!(err.to_string().contains("[2]") && err.to_string().contains("[3]"), "{err}");
    let ok = exec.run(&[("x", f32t(&[2], &[1., 2.])), ("y", f32t(&[2], &[3., 4.]))]).unwrap();
    assert_eq!(ok[0].0, "s");
    assert_eq!(f32s(&ok[0].1), [4., 6.]);
}

#[test]
fn intermediates_are_freed_on_a_long_chain() {
    let mut g = Graph::new("chain");
    let x = g.add_input("x", TensorType::known(DType::F32, &[4])).unwrap();
    let c = g.add_constant("one", Tensor::from_slice(vec![4], &[1f32; 4])).unwrap();
    let mut v = x;
    for _ in 0..200 {
        v = g.add_op(op(OpKind::Add), &[v, c], TensorType::known(DType::F32, &[4]));
    }
    let side = g.add_op(op(OpKind::Neg), &[v], TensorType::known(DType::F32, &[4]));
    let _unused = g.add_op(op(OpKind::Exp), &[side], TensorType::known(DType::F32, &[4]));
    g.add_output("y", v);
    let exec = CpuExecutor::new(&g).unwrap();
    let mut seen = 0;
    let (out, stats) = exec.run_inner(&[("x", f32t(&[4], &[0.; 4]))], &mut |_, _| seen += 1).unwrap();
    assert_eq!(f32s(&out[0].1), [200.; 4]);
    assert_eq!(seen, 202, "the observer sees every node output");
    assert!(stats.peak_live <= 3, "peak live tensors {}", stats.peak_live);
}

#[test]
fn observer_sees_values_by_node() {
    let mut g = Graph::new("t");
    let x = g.add_input("x", TensorType::known(DType::F32, &[2])).unwrap();
    let a = g.add_op(op(OpKind::Abs), &[x], TensorType::known(DType::F32, &[2]));
    let n = g.add_op(op(OpKind::Neg), &[a], TensorType::known(DType::F32, &[2]));
    g.add_output("n", n);
    let exec = CpuExecutor::new(&g).unwrap();
    let mut seen = Vec::new();
    exec.run_observed(&[("x", f32t(&[2], &[-1., 2.]))], &mut |v, t| seen.push((v, f32s(t)))).unwrap();
    assert_eq!(seen, vec![(a, vec![1., 2.]), (n, vec![-1., -2.])]);
}
