//! Unit tests of the matmul, normalisation, reduction, shape, quantization, vision and fused op
//! families against hand-computed values or straightforward f64 references.
#![allow(clippy::cloned_ref_to_slice_refs)] // tests pass owned copies of shared inputs

use super::tests::{close, f32s, f32t, i64s, i64t, op, run1, try_run};
use super::*;
use qcc_ir::{Attr, DType, Tensor};

fn ints(v: &[i64]) -> Attr {
    Attr::Ints(v.to_vec())
}

/// Plain triple-loop reference for a [m, k] x [k, n] product in f64.
fn ref_matmul(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k).map(|p| a[i * k + p] as f64 * b[p * n + j] as f64).sum::<f64>() as f32;
        }
    }
    out
}

fn seq(n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|i| ((i * 37 % 23) as f32 - 11.0) * scale).collect()
}

#[test]
fn matmul_batched_broadcast_and_vectors() {
    let a = seq(2 * 3 * 4, 0.1);
    let b = seq(4 * 5, 0.2);
    let out = run1(op(OpKind::MatMul), &[f32t(&[2, 3, 4], &a), f32t(&[4, 5], &b)]);
    assert_eq!(out.shape(), [2, 3, 5]);
    close(&f32s(&out), &ref_matmul(&a, &b, 6, 4, 5), 1e-5);
    // Batch broadcast on the right operand: [1, 3, 4] x [2, 4, 5].
    let b2 = seq(2 * 4 * 5, 0.3);
    let out = run1(op(OpKind::MatMul), &[f32t(&[1, 3, 4], &a[..12]), f32t(&[2, 4, 5], &b2)]);
    assert_eq!(out.shape(), [2, 3, 5]);
    let got = f32s(&out);
    close(&got[..15], &ref_matmul(&a[..12], &b2[..20], 3, 4, 5), 1e-5);
    close(&got[15..], &ref_matmul(&a[..12], &b2[20..], 3, 4, 5), 1e-5);
    // 1-D operands are promoted and the promoted axis removed.
    let v = run1(op(OpKind::MatMul), &[f32t(&[4], &a[..4]), f32t(&[4, 5], &b)]);
    assert_eq!(v.shape(), [5]);
    close(&f32s(&v), &ref_matmul(&a[..4], &b, 1, 4, 5), 1e-5);
    let dot = run1(op(OpKind::MatMul), &[f32t(&[4], &a[..4]), f32t(&[4], &b[..4])]);
    assert_eq!(dot.shape(), [] as [usize; 0]);
    let ints = run1(op(OpKind::MatMul), &[i64t(&[1, 2], &[3, -4]), i64t(&[2, 1], &[5, 6])]);
    assert_eq!(i64s(&ints), [-9]);
    let err = try_run(op(OpKind::MatMul), &[Some(f32t(&[2, 3], &a[..6])), Some(f32t(&[2, 3], &a[..6]))], 1);
    assert!(err.unwrap_err().to_string().contains("inner dimensions"));
}

#[test]
fn gemm_transposes_alpha_beta() {
    let a = seq(3 * 2, 0.5); // stored [K=3, M=2], transA
    let b = seq(4 * 3, 0.25); // stored [N=4, K=3], transB
    let c = f32t(&[4], &[1., 2., 3., 4.]);
    let g = op(OpKind::Gemm)
        .with("transA", Attr::Int(1))
        .with("transB", Attr::Int(1))
        .with("alpha", Attr::Float(2.0))
        .with("beta", Attr::Float(0.5));
    let out = run1(g, &[f32t(&[3, 2], &a), f32t(&[4, 3], &b), c]);
    let at: Vec<f32> = (0..2).flat_map(|i| (0..3).map(move |k| (i, k))).map(|(i, k)| a[k * 2 + i]).collect();
    let bt: Vec<f32> = (0..3).flat_map(|k| (0..4).map(move |j| (k, j))).map(|(k, j)| b[j * 3 + k]).collect();
    let p = ref_matmul(&at, &bt, 2, 3, 4);
    let expected: Vec<f32> = p.iter().enumerate().map(|(i, v)| 2.0 * v + 0.5 * (i % 4 + 1) as f32).collect();
    close(&f32s(&out), &expected, 1e-5);
}

#[test]
fn integer_matmuls_with_zero_points() {
    let a = RtTensor::from_vec(&[2, 3], vec![11u8, 7, 3, 10, 6, 2]).unwrap();
    let b = RtTensor::from_vec(&[3, 2], vec![1u8, 4, 2, 5, 3, 6]).unwrap();
    let a_zp = RtTensor::from_vec(&[2], vec![1u8, 2]).unwrap(); // per row of A
    let b_zp = RtTensor::from_vec(&[2], vec![0u8, 1]).unwrap(); // per column of B
    let out = run1(op(OpKind::MatMulInteger), &[a, b, a_zp, b_zp]);
    assert_eq!(out.dtype(), DType::I32);
    // (A - [1;2]) x (B - [0 1]) = [[10,6,2],[8,4,0]] x [[1,3],[2,4],[3,5]]
    assert_eq!(i64s(&out), [28, 64, 16, 40]);
    // int_linear: exact integer product, per-output-channel scale, bias.
    let qx = RtTensor::from_vec(&[1, 2, 3], vec![1i8, -2, 3, 7, -8, 0]).unwrap().cast(DType::I4);
    let qw = RtTensor::from_vec(&[2, 3], vec![2i8, 1, -1, -3, 0, 5]).unwrap();
    let scale = f32t(&[2], &[0.5, 0.25]);
    let bias = f32t(&[2], &[1.0, -1.0]);
    let y = run1(op(OpKind::IntLinear), &[qx, qw, scale, bias]);
    assert_eq!(y.shape(), [1, 2, 2]);
    // rows: [1,-2,3]·[2,1,-1] = -3, ·[-3,0,5] = 12; [7,-8,0]·.. = 6, -21
    assert_eq!(f32s(&y), [-0.5, 2.0, 4.0, -6.25]);
    // QLinearMatMul: requantize with round-half-even and saturation.
    let q = run1(
        op(OpKind::QLinearMatMul),
        &[
            RtTensor::from_vec(&[1, 2], vec![130u8, 120]).unwrap(),
            RtTensor::scalar(0.5f32),
            RtTensor::scalar(128u8),
            RtTensor::from_vec(&[2, 2], vec![1u8, 200, 3, 0]).unwrap(),
            RtTensor::scalar(1.0f32),
            RtTensor::scalar(0u8),
            RtTensor::scalar(2.0f32),
            RtTensor::scalar(100u8),
        ],
    );
    // A - 128 = [2, -8]; product = [2*1 - 8*3, 2*200] = [-22, 400]; * 0.25 = [-5.5, 100] -> [-6, 100] + 100
    assert_eq!(i64s(&q), [94, 200]);
}

#[test]
fn softmax_and_norms_against_f64() {
    let x = seq(2 * 3 * 4, 0.3);
    for axis in [-1i64, 1, 0] {
        let out = run1(op(OpKind::Softmax).with("axis", Attr::Int(axis)), &[f32t(&[2, 3, 4], &x)]);
        let logout = run1(op(OpKind::LogSoftmax).with("axis", Attr::Int(axis)), &[f32t(&[2, 3, 4], &x)]);
        let shape = [2usize, 3, 4];
        let ax = if axis < 0 { 2 } else { axis as usize };
        let stride: usize = shape[ax + 1..].iter().product();
        let mut expected = vec![0f32; 24];
        for (i, e) in expected.iter_mut().enumerate() {
            let pos = (i / stride) % shape[ax];
            let base = i - pos * stride;
            let denom: f64 = (0..shape[ax]).map(|j| (x[base + j * stride] as f64).exp()).sum();
            *e = ((x[i] as f64).exp() / denom) as f32;
        }
        close(&f32s(&out), &expected, 1e-6);
        let log_expected: Vec<f32> = expected.iter().map(|v| v.ln()).collect();
        close(&f32s(&logout), &log_expected, 1e-5);
    }
    let rows = f32t(&[2, 4], &[1., 2., 3., 4., -1., 0., 1., 6.]);
    let scale = f32t(&[4], &[1., 2., 1., 0.5]);
    let bias = f32t(&[4], &[0., 1., 0., 0.]);
    let ln =
        run1(op(OpKind::LayerNormalization).with("epsilon", Attr::Float(1e-5)), &[rows.clone(), scale.clone(), bias]);
    let row_ref = |r: &[f64]| {
        let mean = r.iter().sum::<f64>() / 4.0;
        let var = r.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 4.0;
        r.iter().map(move |v| (v - mean) / (var + 1e-5).sqrt()).collect::<Vec<_>>()
    };
    let mut expected = Vec::new();
    for r in [[1., 2., 3., 4.], [-1., 0., 1., 6.]] {
        let n = row_ref(&r);
        expected.extend([n[0] as f32, (n[1] * 2.0 + 1.0) as f32, n[2] as f32, (n[3] * 0.5) as f32]);
    }
    close(&f32s(&ln), &expected, 1e-5);
    let rms = run1(op(OpKind::RmsNormalization).with("epsilon", Attr::Float(1e-6)), &[rows.clone(), scale.clone()]);
    let fused = run1(op(OpKind::RmsNorm).with("epsilon", Attr::Float(1e-6)), &[rows, scale]);
    let r0 = (30.0f64 / 4.0 + 1e-6).sqrt();
    close(&f32s(&rms)[..4], &[(1.0 / r0) as f32, (4.0 / r0) as f32, (3.0 / r0) as f32, (2.0 / r0) as f32], 1e-6);
    assert_eq!(f32s(&rms), f32s(&fused));
}

#[test]
fn reductions_keepdims_noop_and_arg() {
    let x = f32t(&[2, 3], &[1., 5., 3., 4., 2., 6.]);
    let axes = i64t(&[1], &[-1]);
    let sum = run1(op(OpKind::ReduceSum), &[x.clone(), axes.clone()]);
    assert_eq!((sum.shape(), f32s(&sum)), (&[2usize, 1][..], vec![9., 12.]));
    let mean = run1(op(OpKind::ReduceMean).with("keepdims", Attr::Int(0)), &[x.clone(), i64t(&[1], &[0])]);
    assert_eq!((mean.shape(), f32s(&mean)), (&[3usize][..], vec![2.5, 3.5, 4.5]));
    let all = try_run(op(OpKind::ReduceMax).with("keepdims", Attr::Int(0)), &[Some(x.clone())], 1).unwrap();
    assert_eq!((all[0].shape(), f32s(&all[0])), (&[][..], vec![6.]));
    let noop = run1(op(OpKind::ReduceSum).with("noop_with_empty_axes", Attr::Int(1)), &[x.clone(), i64t(&[0], &[])]);
    assert_eq!(noop, x);
    let legacy = try_run(op(OpKind::ReduceProd).with("axes", ints(&[0, 1])), &[Some(x.clone())], 1).unwrap();
    assert_eq!(f32s(&legacy[0]), [720.]);
    let ties = f32t(&[4], &[3., 1., 3., 0.]);
    assert_eq!(i64s(&run1(op(OpKind::ArgMax), &[ties.clone()])), [0]);
    assert_eq!(i64s(&run1(op(OpKind::ArgMax).with("select_last_index", Attr::Int(1)), &[ties.clone()])), [2]);
    let am = run1(op(OpKind::ArgMin).with("axis", Attr::Int(1)).with("keepdims", Attr::Int(0)), &[x.clone()]);
    assert_eq!(i64s(&am), [0, 1]);
    let v = f32t(&[4], &[1., 2., 3., 4.]);
    let axis0 = RtTensor::scalar(0i64);
    assert_eq!(f32s(&run1(op(OpKind::CumSum), &[v.clone(), axis0.clone()])), [1., 3., 6., 10.]);
    let ex_rev = op(OpKind::CumSum).with("exclusive", Attr::Int(1)).with("reverse", Attr::Int(1));
    assert_eq!(f32s(&run1(ex_rev, &[v, axis0])), [9., 7., 4., 0.]);
}

#[test]
fn slice_gather_pad_split_and_friends() {
    let x = f32t(&[2, 5], &(0..10).map(|i| i as f32).collect::<Vec<_>>());
    // Negative step from the end, clamped ends.
    let s = run1(
        op(OpKind::Slice),
        &[x.clone(), i64t(&[1], &[-1]), i64t(&[1], &[-100]), i64t(&[1], &[1]), i64t(&[1], &[-2])],
    );
    assert_eq!(f32s(&s), [4., 2., 0., 9., 7., 5.]);
    let s = run1(op(OpKind::Slice), &[x.clone(), i64t(&[2], &[1, 1]), i64t(&[2], &[i64::MAX, 3])]);
    assert_eq!(f32s(&s), [6., 7.]);
    let g = run1(op(OpKind::Gather).with("axis", Attr::Int(1)), &[x.clone(), i64t(&[2], &[-1, 0])]);
    assert_eq!((g.shape(), f32s(&g)), (&[2usize, 2][..], vec![4., 0., 9., 5.]));
    let emb = run1(op(OpKind::Gather), &[x.clone(), i64t(&[1, 3], &[1, 0, 1])]);
    assert_eq!(emb.shape(), [1, 3, 5]);
    assert!(try_run(op(OpKind::Gather), &[Some(x.clone()), Some(i64t(&[1], &[2]))], 1).is_err());
    let ge = run1(op(OpKind::GatherElements).with("axis", Attr::Int(1)), &[x.clone(), i64t(&[2, 2], &[4, 0, 1, 1])]);
    assert_eq!(f32s(&ge), [4., 0., 6., 6.]);
    let row = f32t(&[4], &[1., 2., 3., 4.]);
    let pad =
        |mode: &str| run1(op(OpKind::Pad).with("mode", Attr::Str(mode.into())), &[row.clone(), i64t(&[2], &[2, 3])]);
    assert_eq!(f32s(&pad("constant")), [0., 0., 1., 2., 3., 4., 0., 0., 0.]);
    assert_eq!(f32s(&pad("reflect")), [3., 2., 1., 2., 3., 4., 3., 2., 1.]);
    assert_eq!(f32s(&pad("edge")), [1., 1., 1., 2., 3., 4., 4., 4., 4.]);
    assert_eq!(f32s(&pad("wrap")), [3., 4., 1., 2., 3., 4., 1., 2., 3.]);
    let cv = run1(op(OpKind::Pad), &[row.clone(), i64t(&[2], &[1, -2]), RtTensor::scalar(9f32)]);
    assert_eq!(f32s(&cv), [9., 1., 2.]);
    let parts =
        try_run(op(OpKind::Split).with("num_outputs", Attr::Int(3)), &[Some(f32t(&[5], &[1., 2., 3., 4., 5.]))], 3)
            .unwrap();
    assert_eq!(parts.iter().map(f32s).collect::<Vec<_>>(), vec![vec![1., 2.], vec![3., 4.], vec![5.]]);
    let t = run1(op(OpKind::Transpose), &[x.clone()]);
    assert_eq!((t.shape(), f32s(&t)[..3].to_vec()), (&[5usize, 2][..], vec![0., 5., 1.]));
    let sq = run1(op(OpKind::Unsqueeze), &[row.clone(), i64t(&[2], &[0, -1])]);
    assert_eq!(sq.shape(), [1, 4, 1]);
    assert_eq!(run1(op(OpKind::Squeeze), &[sq]).shape(), [4]);
    let r = run1(op(OpKind::Reshape), &[x.clone(), i64t(&[3], &[0, -1, 1])]);
    assert_eq!(r.shape(), [2, 5, 1]);
    let sh = run1(op(OpKind::Shape).with("start", Attr::Int(-1)), &[x.clone()]);
    assert_eq!(i64s(&sh), [5]);
    let tri = run1(
        op(OpKind::Trilu).with("upper", Attr::Int(0)),
        &[f32t(&[2, 3], &[1., 2., 3., 4., 5., 6.]), RtTensor::scalar(1i64)],
    );
    assert_eq!(f32s(&tri), [1., 2., 0., 4., 5., 6.]);
    let rg = run1(op(OpKind::Range), &[RtTensor::scalar(10i64), RtTensor::scalar(1i64), RtTensor::scalar(-3i64)]);
    assert_eq!(i64s(&rg), [10, 7, 4]);
    let tile = run1(op(OpKind::Tile), &[f32t(&[2], &[1., 2.]), i64t(&[1], &[3])]);
    assert_eq!(f32s(&tile), [1., 2., 1., 2., 1., 2.]);
    let ex = run1(op(OpKind::Expand), &[f32t(&[2, 1], &[1., 2.]), i64t(&[2], &[1, 3])]);
    assert_eq!(f32s(&ex), [1., 1., 1., 2., 2., 2.]);
    let value = Tensor::from_slice(vec![1], &[7i32]);
    let cs = run1(op(OpKind::ConstantOfShape).with("value", Attr::Tensor(value)), &[i64t(&[2], &[2, 2])]);
    assert_eq!((cs.dtype(), i64s(&cs)), (DType::I32, vec![7; 4]));
    let cat = run1(op(OpKind::Concat).with("axis", Attr::Int(-1)), &[x.clone(), f32t(&[2, 1], &[-1., -2.])]);
    assert_eq!(f32s(&cat)[4..7], [4., -1., 5.]);
}

#[test]
fn quantization_rounds_half_even_and_saturates() {
    let x = f32t(&[6], &[0.5, 1.5, 2.5, -2.5, 1000.0, -1000.0]);
    let q = run1(op(OpKind::QuantizeLinear), &[x.clone(), RtTensor::scalar(1f32), RtTensor::scalar(10u8)]);
    assert_eq!((q.dtype(), i64s(&q)), (DType::U8, vec![10, 12, 12, 8, 255, 0]));
    let q8 = run1(op(OpKind::QuantizeLinear), &[x.clone(), RtTensor::scalar(1f32), RtTensor::scalar(0i8)]);
    assert_eq!(i64s(&q8), [0, 2, 2, -2, 127, -128]);
    // Per-axis scales along axis 1 and blocked scales.
    let m = f32t(&[2, 2], &[1., 1., 3., 3.]);
    let per_axis = run1(
        op(OpKind::QuantizeLinear),
        &[m.clone(), f32t(&[2], &[1., 0.5]), RtTensor::from_vec(&[2], vec![0i8, 0]).unwrap()],
    );
    assert_eq!(i64s(&per_axis), [1, 2, 3, 6]);
    let blocked = op(OpKind::DequantizeLinear).with("axis", Attr::Int(1)).with("block_size", Attr::Int(2));
    let dq = run1(blocked, &[RtTensor::from_vec(&[2, 2], vec![1i8, 2, 3, 4]).unwrap(), f32t(&[2, 1], &[0.5, 2.0])]);
    assert_eq!(f32s(&dq), [0.5, 1.0, 6.0, 8.0]);
    let i4 =
        run1(op(OpKind::QuantizeLinear), &[x.clone(), RtTensor::scalar(1f32), RtTensor::scalar(0i8).cast(DType::I4)]);
    assert_eq!((i4.dtype(), i64s(&i4)), (DType::I4, vec![0, 2, 2, -2, 7, -8]));
    let dyn_q = try_run(op(OpKind::DynamicQuantizeLinear), &[Some(f32t(&[3], &[-1.0, 0.0, 2.0]))], 3).unwrap();
    // scale = 3/255, zero point = round(255/3) = 85, y = round(x / scale) + 85
    close(&f32s(&dyn_q[1]), &[3.0 / 255.0], 1e-7);
    assert_eq!(i64s(&dyn_q[2]), [85]);
    assert_eq!(i64s(&dyn_q[0]), [0, 85, 255]);
    let qcc_q = op(OpKind::Quantize).with("to", Attr::DType(DType::I4)).with("axis", Attr::Int(1));
    let qq = run1(qcc_q, &[m.clone(), f32t(&[2], &[0.4, 2.0])]);
    assert_eq!(i64s(&qq), [2, 0, 7, 2]); // 2.5 -> 2, 0.5 -> 0, 7.5 -> 7 (clamp), 1.5 -> 2
    let dq = run1(op(OpKind::Dequantize).with("axis", Attr::Int(1)), &[qq, f32t(&[2], &[0.4, 2.0])]);
    close(&f32s(&dq), &[0.8, 0.0, 2.8, 4.0], 1e-6);
}

#[test]
fn conv_pool_resize_by_hand() {
    // 1x1x3x3 input, 2x2 kernel of ones, pad 1 on the top-left only, stride 2.
    let x = f32t(&[1, 1, 3, 3], &[1., 2., 3., 4., 5., 6., 7., 8., 9.]);
    let w = f32t(&[1, 1, 2, 2], &[1., 1., 1., 1.]);
    let conv = op(OpKind::Conv).with("pads", ints(&[1, 1, 0, 0])).with("strides", ints(&[2, 2]));
    let y = run1(conv, &[x.clone(), w.clone()]);
    assert_eq!((y.shape(), f32s(&y)), (&[1usize, 1, 2, 2][..], vec![1., 5., 11., 28.]));
    // Two groups, each one channel, dilation 2 with a 2x2 kernel on 3x3 picks the corners.
    let x2 = f32t(&[1, 2, 3, 3], &(0..18).map(|i| i as f32).collect::<Vec<_>>());
    let w2 = f32t(&[2, 1, 2, 2], &[1., 1., 1., 1., 1., 0., 0., -1.]);
    let g = run1(
        op(OpKind::Conv).with("group", Attr::Int(2)).with("dilations", ints(&[2, 2])),
        &[x2, w2, f32t(&[2], &[0.5, 0.])],
    );
    assert_eq!(f32s(&g), [0. + 2. + 6. + 8. + 0.5, 9. - 17.]);
    let same = run1(op(OpKind::Conv).with("auto_pad", Attr::Str("SAME_UPPER".into())), &[x.clone(), w]);
    assert_eq!(f32s(&same), [12., 16., 9., 24., 28., 15., 15., 17., 9.]);
    let mp = op(OpKind::MaxPool)
        .with("kernel_shape", ints(&[2, 2]))
        .with("strides", ints(&[2, 2]))
        .with("ceil_mode", Attr::Int(1));
    assert_eq!(f32s(&run1(mp, &[x.clone()])), [5., 6., 8., 9.]);
    let ap = |include: i64| {
        op(OpKind::AveragePool)
            .with("kernel_shape", ints(&[2, 2]))
            .with("pads", ints(&[1, 1, 1, 1]))
            .with("strides", ints(&[2, 2]))
            .with("count_include_pad", Attr::Int(include))
    };
    assert_eq!(f32s(&run1(ap(0), &[x.clone()])), [1., 2.5, 5.5, 7.]);
    assert_eq!(f32s(&run1(ap(1), &[x.clone()])), [0.25, 1.25, 2.75, 7.]);
    assert_eq!(f32s(&run1(op(OpKind::GlobalAveragePool), &[x.clone()])), [5.]);
    let row = f32t(&[1, 4], &[1., 2., 3., 4.]);
    let resize = |mode: &str, ctm: &str| {
        let o = op(OpKind::Resize)
            .with("mode", Attr::Str(mode.into()))
            .with("coordinate_transformation_mode", Attr::Str(ctm.into()));
        try_run(o, &[Some(row.clone()), None, Some(f32t(&[2], &[1., 2.]))], 1).unwrap().remove(0)
    };
    assert_eq!(f32s(&resize("nearest", "asymmetric")), [1., 1., 2., 2., 3., 3., 4., 4.]);
    assert_eq!(f32s(&resize("linear", "half_pixel")), [1., 1.25, 1.75, 2.25, 2.75, 3.25, 3.75, 4.]);
    let ac = f32s(&resize("linear", "align_corners"));
    close(&ac, &(0..8).map(|i| 1.0 + 3.0 * i as f32 / 7.0).collect::<Vec<_>>(), 1e-6);
}

#[test]
fn fused_blocks_match_their_definitions() {
    let x = seq(2 * 3, 0.3);
    let w = seq(4 * 3, 0.2);
    let lin = run1(op(OpKind::Linear), &[f32t(&[2, 3], &x), f32t(&[4, 3], &w), f32t(&[4], &[1., 0., 0., 0.])]);
    let wt: Vec<f32> = (0..3).flat_map(|k| (0..4).map(move |n| (k, n))).map(|(k, n)| w[n * 3 + k]).collect();
    let mut expected = ref_matmul(&x, &wt, 2, 3, 4);
    expected[0] += 1.0;
    expected[4] += 1.0;
    close(&f32s(&lin), &expected, 1e-5);
    let sw = run1(op(OpKind::Swiglu), &[f32t(&[2], &[1., -2.]), f32t(&[2], &[3., 0.5])]);
    close(&f32s(&sw), &[(1.0 / (1.0 + (-1f64).exp()) * 3.0) as f32, (-2.0 / (1.0 + 2f64.exp()) * 0.5) as f32], 1e-6);
    let rot =
        run1(op(OpKind::Rotary), &[f32t(&[1, 4], &[1., 2., 3., 4.]), f32t(&[4], &[0.5; 4]), f32t(&[4], &[2.; 4])]);
    // x*cos + [-3,-4,1,2]*sin
    assert_eq!(f32s(&rot), [0.5 - 6., 1. - 8., 1.5 + 2., 2. + 4.]);
    // Grouped-query causal attention against an f64 loop: 2 query heads share 1 KV head.
    let (s_len, d) = (3usize, 2usize);
    let q = seq(2 * s_len * d, 0.4);
    let k = seq(s_len * d, 0.3);
    let v = seq(s_len * d, 0.7);
    let att = op(OpKind::Attention).with("causal", Attr::Int(1)).with("scale", Attr::Float(0.5));
    let out = run1(att, &[f32t(&[1, 2, s_len, d], &q), f32t(&[1, 1, s_len, d], &k), f32t(&[1, 1, s_len, d], &v)]);
    let mut expected = Vec::new();
    for h in 0..2 {
        for i in 0..s_len {
            let scores: Vec<f64> = (0..=i)
                .map(|j| 0.5 * (0..d).map(|c| q[(h * s_len + i) * d + c] as f64 * k[j * d + c] as f64).sum::<f64>())
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let z: f64 = scores.iter().map(|s| (s - max).exp()).sum();
            for c in 0..d {
                expected.push((0..=i).map(|j| (scores[j] - max).exp() / z * v[j * d + c] as f64).sum::<f64>() as f32);
            }
        }
    }
    close(&f32s(&out), &expected, 1e-5);
}

#[test]
fn explicit_causal_mask_takes_the_causal_path_with_the_same_bits() {
    // Two sequences of 300 tokens (three causal row blocks), 4 query heads on 2 KV heads, and the mask an
    // exported model builds: 0 up to the diagonal, f32::MIN after it.
    let (b, hq, hkv, s_len, d) = (2usize, 4usize, 2usize, 300usize, 8usize);
    let q = f32t(&[b, hq, s_len, d], &seq(b * hq * s_len * d, 0.05));
    let k = f32t(&[b, hkv, s_len, d], &seq(b * hkv * s_len * d, 0.04).into_iter().rev().collect::<Vec<_>>());
    let v = f32t(&[b, hkv, s_len, d], &seq(b * hkv * s_len * d, 0.3));
    let mut mask: Vec<f32> = (0..s_len * s_len).map(|p| if p % s_len <= p / s_len { 0.0 } else { f32::MIN }).collect();
    let att = op(OpKind::Attention).with("scale", Attr::Float(0.35));
    let detected = run1(att.clone(), &[q.clone(), k.clone(), v.clone(), f32t(&[1, 1, s_len, s_len], &mask)]);
    let causal = run1(att.clone().with("causal", Attr::Int(1)), &[q.clone(), k.clone(), v.clone()]);
    assert!(ops::fused::causal_mask(&f32t(&[1, 1, s_len, s_len], &mask), s_len, s_len));
    // One masked entry at -1e29 (still masked, but not the exact causal form): the general path.
    mask[5] = -1e29;
    assert!(!ops::fused::causal_mask(&f32t(&[1, 1, s_len, s_len], &mask), s_len, s_len));
    let general = run1(att, &[q.clone(), k.clone(), v.clone(), f32t(&[1, 1, s_len, s_len], &mask)]);
    let bits = |t: &RtTensor| f32s(t).iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&detected), bits(&general));
    assert_eq!(bits(&detected), bits(&causal));
    // And against an f64 reference, for one query row late in the sequence (head 3, batch 1, row 290).
    let (qv, kv, vv) = (f32s(&q), f32s(&k), f32s(&v));
    let (bi, h, i) = (1, 3, 290);
    let kvh = h / (hq / hkv);
    let scores: Vec<f64> = (0..=i)
        .map(|j| {
            let qr = &qv[((bi * hq + h) * s_len + i) * d..][..d];
            let kr = &kv[((bi * hkv + kvh) * s_len + j) * d..][..d];
            0.35 * qr.iter().zip(kr).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>()
        })
        .collect();
    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let z: f64 = scores.iter().map(|s| (s - max).exp()).sum();
    let out = f32s(&detected);
    for c in 0..d {
        let want: f64 =
            (0..=i).map(|j| (scores[j] - max).exp() / z * vv[((bi * hkv + kvh) * s_len + j) * d + c] as f64).sum();
        let got = out[((bi * hq + h) * s_len + i) * d + c] as f64;
        assert!((got - want).abs() <= 1e-5 * want.abs().max(1.0), "channel {c}: {got} vs {want}");
    }
}

#[test]
fn hadamard_and_rms_norm_with_beta() {
    // Sylvester H_4 rows (1,1,1,1), (1,-1,1,-1), (1,1,-1,-1), (1,-1,-1,1), divided by sqrt(4).
    let x = f32t(&[2, 4], &[1., 2., 3., 4., 0., 0., 2., 0.]);
    let out = run1(op(OpKind::Hadamard).with("size", Attr::Int(4)), &[x.clone()]);
    assert_eq!(out.shape(), [2, 4]);
    close(&f32s(&out), &[5., -1., -2., 0., 1., 1., -1., -1.], 1e-6);
    let bad = try_run(op(OpKind::Hadamard).with("size", Attr::Int(8)), &[Some(x)], 1);
    assert!(bad.is_err());
    // Paley I order 12: the transform preserves the norm of each row.
    let v: Vec<f32> = (0..24).map(|i| (i as f32 * 0.7).sin()).collect();
    let out = f32s(&run1(op(OpKind::Hadamard).with("size", Attr::Int(12)), &[f32t(&[2, 12], &v)]));
    for r in 0..2 {
        let (a, b): (f32, f32) =
            (v[r * 12..][..12].iter().map(|x| x * x).sum(), out[r * 12..][..12].iter().map(|x| x * x).sum());
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
    let rows = f32t(&[1, 4], &[1., 4., 3., 2.]);
    let gamma = f32t(&[4], &[1., 2., 1., 1.]);
    let beta = f32t(&[4], &[0.5, 0., -1., 0.]);
    let y = run1(op(OpKind::RmsNorm).with("epsilon", Attr::Float(0.0)), &[rows, gamma, beta]);
    let r = (30.0f64 / 4.0).sqrt();
    close(&f32s(&y), &[(1.0 / r + 0.5) as f32, (8.0 / r) as f32, (3.0 / r - 1.0) as f32, (2.0 / r) as f32], 1e-6);
}
