//! Inference tests; expected shapes are hand-computed from the ONNX spec (and PyTorch's conv/pool formulas).

use super::*;
use crate::{Attr, Op, Tensor, ValueInfo};

fn parse_shape(text: &str) -> Shape {
    if text.is_empty() {
        return Shape(vec![]);
    }
    Shape(
        text.split(',')
            .map(|d| match d.trim() {
                "?" => Dim::Unknown,
                t => t.parse::<u64>().map(Dim::Known).unwrap_or_else(|_| Dim::sym(t)),
            })
            .collect(),
    )
}

fn ty(dtype: DType, shape: &str) -> TensorType {
    TensorType::new(dtype, parse_shape(shape))
}

struct Builder {
    g: Graph,
}

impl Builder {
    fn new() -> Builder {
        Builder { g: Graph::new("t") }
    }
    fn input(&mut self, name: &str, dtype: DType, shape: &str) -> Value {
        self.g.add_input(name, ty(dtype, shape)).unwrap()
    }
    fn ints(&mut self, values: &[i64]) -> Value {
        let name = self.g.fresh_name("c");
        self.g.add_constant(&name, Tensor::from_slice(vec![values.len()], values)).unwrap()
    }
    fn scalar(&mut self, v: i64) -> Value {
        let name = self.g.fresh_name("s");
        self.g.add_constant(&name, Tensor::scalar(v)).unwrap()
    }
    /// A node whose outputs are undeclared (unranked placeholders).
    fn op_n(&mut self, op: Op, inputs: &[Option<Value>], outputs: usize) -> Vec<Value> {
        let name = self.g.fresh_name(op.kind.name());
        let outs =
            (0..outputs).map(|i| ValueInfo::new(format!("{name}_{i}"), TensorType::unranked(DType::F32))).collect();
        let id = self.g.add_node(name, op, inputs, outs).unwrap();
        (0..outputs).map(|p| Value::new(id, p as u32)).collect()
    }
    fn op(&mut self, op: Op, inputs: &[Value]) -> Value {
        let inputs: Vec<Option<Value>> = inputs.iter().copied().map(Some).collect();
        self.op_n(op, &inputs, 1)[0]
    }
    fn infer(&mut self) -> Result<(), InferError> {
        infer_types(&mut self.g)
    }
    fn ty(&self, v: Value) -> String {
        self.g.value_type(v).to_string()
    }
}

fn op(kind: OpKind) -> Op {
    Op::new(kind)
}

#[test]
fn reshape_through_shape_arithmetic_is_symbolic() {
    let mut b = Builder::new();
    let x = b.input("x", DType::F32, "batch,seq,576");
    let shape = b.op(op(OpKind::Shape), &[x]);
    let (i0, i1) = (b.scalar(0), b.scalar(1));
    let d0 = b.op(op(OpKind::Gather), &[shape, i0]);
    let d1 = b.op(op(OpKind::Gather), &[shape, i1]);
    let axes = b.ints(&[0]);
    let u0 = b.op(op(OpKind::Unsqueeze), &[d0, axes]);
    let u1 = b.op(op(OpKind::Unsqueeze), &[d1, axes]);
    let (c9, c64) = (b.ints(&[9]), b.ints(&[64]));
    let target = b.op(op(OpKind::Concat).with("axis", Attr::Int(0)), &[u0, u1, c9, c64]);
    let r = b.op(op(OpKind::Reshape), &[x, target]);
    let q = b.op(op(OpKind::Transpose).with("perm", Attr::Ints(vec![0, 2, 1, 3])), &[r]);
    let k = b.op(op(OpKind::Transpose).with("perm", Attr::Ints(vec![0, 2, 3, 1])), &[r]);
    let scores = b.op(op(OpKind::MatMul), &[q, k]);
    b.infer().unwrap();
    assert_eq!(b.ty(shape), "i64[3]");
    assert_eq!(b.ty(d0), "i64[]");
    assert_eq!(b.ty(target), "i64[4]");
    assert_eq!(b.ty(r), "f32[batch,seq,9,64]");
    assert_eq!(b.ty(scores), "f32[batch,9,seq,seq]");
}

#[test]
fn reshape_minus_one_cancels_symbols() {
    let mut b = Builder::new();
    let x = b.input("x", DType::F32, "batch,seq,9,64");
    let t = b.ints(&[0, 0, -1]);
    let r = b.op(op(OpKind::Reshape), &[x, t]);
    let t2 = b.ints(&[-1, 576]);
    let flat = b.op(op(OpKind::Reshape), &[x, t2]);
    let t3 = b.ints(&[5, -1]);
    let bad = b.op(op(OpKind::Reshape), &[flat, t3]);
    b.infer().unwrap();
    assert_eq!(b.ty(r), "f32[batch,seq,576]");
    assert_eq!(b.ty(flat), "f32[?,576]");
    assert_eq!(b.ty(bad), "f32[5,?]");

    let mut b = Builder::new();
    let x = b.input("x", DType::F32, "2,3");
    let t = b.ints(&[4, 2]);
    b.op(op(OpKind::Reshape), &[x, t]);
    let err = b.infer().unwrap_err().to_string();
    assert!(err.contains("reshape") && err.contains("6 elements"), "{err}");
}

#[test]
fn broadcast_and_matmul_errors_name_the_node() {
    let mut b = Builder::new();
    let x = b.input("x", DType::F32, "2,3");
    let y = b.input("y", DType::F32, "2,4");
    b.op(op(OpKind::Add), &[x, y]);
    let err = b.infer().unwrap_err().to_string();
    assert!(err.contains("'add") && err.contains("(add)") && err.contains("3") && err.contains("4"), "{err}");

    let mut b = Builder::new();
    let x = b.input("x", DType::F32, "b,2,3");
    let y = b.input("y", DType::F32, "4,5");
    b.op(op(OpKind::MatMul), &[x, y]);
    let err = b.infer().unwrap_err().to_string();
    assert!(err.contains("(matmul)") && err.contains("inner"), "{err}");

    let mut b = Builder::new();
    let x = b.input("x", DType::F32, "2");
    let y = b.input("y", DType::F16, "2");
    b.op(op(OpKind::Mul), &[x, y]);
    assert!(b.infer().unwrap_err().to_string().contains("f16"));
}

#[test]
fn matmul_broadcasts_batches_and_promotes_vectors() {
    let mut b = Builder::new();
    let x = b.input("x", DType::F32, "7,1,seq,64");
    let y = b.input("y", DType::F32, "3,64,10");
    let v = b.input("v", DType::F32, "64");
    let m = b.op(op(OpKind::MatMul), &[x, y]);
    let mv = b.op(op(OpKind::MatMul), &[x, v]);
    let vm = b.op(op(OpKind::MatMul), &[v, y]);
    let a = b.input("a", DType::F32, "4,3");
    let w = b.input("w", DType::F32, "5,3");
    let bias = b.input("bias", DType::F32, "5");
    let gemm = b.op(op(OpKind::Gemm).with("transB", Attr::Int(1)), &[a, w, bias]);
    b.infer().unwrap();
    assert_eq!(b.ty(m), "f32[7,3,seq,10]");
    assert_eq!(b.ty(mv), "f32[7,1,seq]");
    assert_eq!(b.ty(vm), "f32[3,10]");
    assert_eq!(b.ty(gemm), "f32[4,5]");
}

#[test]
fn squeeze_unsqueeze_reduce_axes() {
    let mut b = Builder::new();
    let x = b.input("x", DType::F32, "batch,1,seq,1");
    let ax = b.ints(&[1, -1]);
    let sq = b.op(op(OpKind::Squeeze), &[x, ax]);
    let ax2 = b.ints(&[0, 3]);
    let un = b.op(op(OpKind::Unsqueeze), &[sq, ax2]);
    let ax3 = b.ints(&[-2]);
    let mean = b.op(op(OpKind::ReduceMean).with("keepdims", Attr::Int(0)), &[x, ax3]);
    let sum_all = b.op(op(OpKind::ReduceSum), &[x]);
    let empty = b.ints(&[]);
    let noop = b.op_n(op(OpKind::ReduceMax).with("noop_with_empty_axes", Attr::Int(1)), &[Some(x), Some(empty)], 1)[0];
    let old_style = b.op(op(OpKind::ReduceMean).with("axes", Attr::Ints(vec![2])), &[x]);
    let am = b.op(op(OpKind::ArgMax).with("axis", Attr::Int(2)).with("keepdims", Attr::Int(0)), &[x]);
    b.infer().unwrap();
    assert_eq!(b.ty(sq), "f32[batch,seq]");
    assert_eq!(b.ty(un), "f32[1,batch,seq,1]");
    assert_eq!(b.ty(mean), "f32[batch,1,1]");
    assert_eq!(b.ty(sum_all), "f32[1,1,1,1]");
    assert_eq!(b.ty(noop), "f32[batch,1,seq,1]");
    assert_eq!(b.ty(old_style), "f32[batch,1,1,1]");
    assert_eq!(b.ty(am), "i64[batch,1,1]");
}

#[test]
fn split_slice_concat_gather() {
    let mut b = Builder::new();
    let x = b.input("x", DType::F32, "batch,seq,10");
    let even = b.op_n(op(OpKind::Split).with("axis", Attr::Int(-1)).with("num_outputs", Attr::Int(3)), &[Some(x)], 3);
    let sizes = b.ints(&[2, 8]);
    let sized = b.op_n(op(OpKind::Split).with("axis", Attr::Int(2)), &[Some(x), Some(sizes)], 2);
    let (st, en, ax) = (b.ints(&[1, 0]), b.ints(&[-1, i64::MAX]), b.ints(&[2, 1]));
    let sl = b.op(op(OpKind::Slice), &[x, st, en, ax]);
    let (st, en, ax, stp) = (b.ints(&[8]), b.ints(&[0]), b.ints(&[-1]), b.ints(&[-3]));
    let back = b.op(op(OpKind::Slice), &[x, st, en, ax, stp]);
    let cat = b.op(op(OpKind::Concat).with("axis", Attr::Int(-1)), &[x, x, sl]);
    let ids = b.input("ids", DType::I64, "batch,seq");
    let table = b.input("table", DType::F32, "100,16");
    let emb = b.op(op(OpKind::Gather), &[table, ids]);
    b.infer().unwrap();
    // ONNX opset 18: ceil(10 / 3) = 4 per chunk, the last one smaller.
    let even: Vec<String> = even.iter().map(|v| b.ty(*v)).collect();
    assert_eq!(even, ["f32[batch,seq,4]", "f32[batch,seq,4]", "f32[batch,seq,2]"]);
    assert_eq!(b.ty(sized[1]), "f32[batch,seq,8]");
    assert_eq!(b.ty(sl), "f32[batch,seq,8]");
    // numpy: len(range(10)[8:0:-3]) == 3
    assert_eq!(b.ty(back), "f32[batch,seq,3]");
    assert_eq!(b.ty(cat), "f32[batch,seq,28]");
    assert_eq!(b.ty(emb), "f32[batch,seq,16]");
}

#[test]
fn conv_and_pool_sizes_match_pytorch() {
    let mut b = Builder::new();
    let x = b.input("x", DType::F32, "n,3,224,224");
    let w = b.input("w", DType::F32, "64,3,7,7");
    let conv = b.op(
        op(OpKind::Conv).with("strides", Attr::Ints(vec![2, 2])).with("pads", Attr::Ints(vec![3, 3, 3, 3])),
        &[x, w],
    );
    let pool = b.op(
        op(OpKind::MaxPool)
            .with("kernel_shape", Attr::Ints(vec![3, 3]))
            .with("strides", Attr::Ints(vec![2, 2]))
            .with("pads", Attr::Ints(vec![1, 1, 1, 1])),
        &[conv],
    );
    let y = b.input("y", DType::F32, "1,1,5,5");
    let ceil = b.op(
        op(OpKind::AveragePool)
            .with("kernel_shape", Attr::Ints(vec![2, 2]))
            .with("strides", Attr::Ints(vec![2, 2]))
            .with("ceil_mode", Attr::Int(1)),
        &[y],
    );
    let same = b.op(
        op(OpKind::MaxPool)
            .with("kernel_shape", Attr::Ints(vec![3, 3]))
            .with("strides", Attr::Ints(vec![2, 2]))
            .with("auto_pad", Attr::Str("SAME_UPPER".into())),
        &[y],
    );
    let gap = b.op(op(OpKind::GlobalAveragePool), &[pool]);
    b.infer().unwrap();
    // torchvision resnet: conv1 224 -> 112, maxpool 112 -> 56.
    assert_eq!(b.ty(conv), "f32[n,64,112,112]");
    assert_eq!(b.ty(pool), "f32[n,64,56,56]");
    // torch.nn.AvgPool2d(2, 2, ceil_mode=True) on 5x5 gives 3x3.
    assert_eq!(b.ty(ceil), "f32[1,1,3,3]");
    assert_eq!(b.ty(same), "f32[1,1,3,3]");
    assert_eq!(b.ty(gap), "f32[n,64,1,1]");
}

#[test]
fn quantization_dtypes() {
    let mut b = Builder::new();
    let x = b.input("x", DType::F32, "t,64");
    let scale = b.input("scale", DType::F32, "");
    let zp = b.g.add_constant("zp", Tensor::scalar(0i8)).unwrap();
    let q_default = b.op(op(OpKind::QuantizeLinear), &[x, scale]);
    let q_zp = b.op(op(OpKind::QuantizeLinear), &[x, scale, zp]);
    let dq = b.op(op(OpKind::DequantizeLinear), &[q_zp, scale, zp]);
    let dyn_q = b.op_n(op(OpKind::DynamicQuantizeLinear), &[Some(x)], 3);
    let q4 = b.op(op(OpKind::Quantize).with("to", Attr::DType(DType::I4)), &[x, scale]);
    let w = b.input("w", DType::I4, "32,64");
    let s = b.input("s", DType::F32, "32");
    let lin = b.op(op(OpKind::IntLinear), &[q4, w, s]);
    let back = b.op(op(OpKind::Dequantize), &[q4, scale]);
    let a8 = b.input("a8", DType::U8, "t,64");
    let w8 = b.input("w8", DType::I8, "64,16");
    let mmi = b.op(op(OpKind::MatMulInteger), &[a8, w8]);
    b.infer().unwrap();
    assert_eq!(b.ty(q_default), "u8[t,64]");
    assert_eq!(b.ty(q_zp), "i8[t,64]");
    assert_eq!(b.ty(dq), "f32[t,64]");
    assert_eq!(b.ty(dyn_q[0]), "u8[t,64]");
    assert_eq!(b.ty(dyn_q[1]), "f32[]");
    assert_eq!(b.ty(q4), "i4[t,64]");
    assert_eq!(b.ty(lin), "f32[t,32]");
    assert_eq!(b.ty(back), "f32[t,64]");
    assert_eq!(b.ty(mmi), "i32[t,16]");

    // Integer linears take quantized (or float, for prefix tokens) activations, never i64.
    let mut b = Builder::new();
    let x = b.input("x", DType::I64, "t,64");
    let w = b.input("w", DType::I8, "32,64");
    let s = b.input("s", DType::F32, "32");
    b.op(op(OpKind::IntLinear), &[x, w, s]);
    assert!(b.infer().unwrap_err().to_string().contains("activation must be"));
}

#[test]
fn value_propagation_through_exporter_patterns() {
    let mut b = Builder::new();
    let x = b.input("x", DType::F32, "batch,seq,64");
    let shape = b.op(op(OpKind::Shape).with("start", Attr::Int(-2)), &[x]);
    // ConstantOfShape(Shape(shape)) -> ones, Range, Expand, Where(Equal(t, -1), ones, t)
    let len = b.op(op(OpKind::Shape), &[shape]);
    let ones =
        b.op(op(OpKind::ConstantOfShape).with("value", Attr::Tensor(Tensor::from_slice(vec![1], &[1i64]))), &[len]);
    let minus1 = b.ints(&[-1, 7]);
    let eq = b.op(op(OpKind::Equal), &[minus1, shape]);
    let target = b.op(op(OpKind::Where), &[eq, ones, minus1]);
    let mask_shape = b.op(op(OpKind::Concat).with("axis", Attr::Int(0)), &[shape, target]);
    let fill = b.op(op(OpKind::ConstantOfShape), &[mask_shape]);
    let (s0, s5, s1) = (b.scalar(0), b.scalar(5), b.scalar(1));
    let range = b.op(op(OpKind::Range), &[s0, s5, s1]);
    let two = b.ints(&[2]);
    let mul = b.op(op(OpKind::Mul), &[shape, two]);
    let expanded = b.op(op(OpKind::Reshape), &[fill, mul]);
    b.infer().unwrap();
    assert_eq!(b.ty(shape), "i64[2]");
    assert_eq!(b.ty(ones), "i64[2]");
    assert_eq!(b.ty(fill), "f32[seq,64,?,7]");
    assert_eq!(b.ty(range), "i64[5]");
    assert_eq!(b.ty(expanded), "f32[?,128]");
}

#[test]
fn declared_types_merge_and_conflict() {
    let mut g = Graph::new("t");
    let x = g.add_input("x", ty(DType::F32, "batch,4")).unwrap();
    let id = g
        .add_node("relu", Op::new(OpKind::Relu), &[Some(x)], vec![ValueInfo::new("y", ty(DType::F32, "2,?"))])
        .unwrap();
    infer_types(&mut g).unwrap();
    assert_eq!(g.value_type(Value::new(id, 0)).to_string(), "f32[2,4]");

    let mut g = Graph::new("t");
    let x = g.add_input("x", ty(DType::F32, "batch,4")).unwrap();
    g.add_node("relu", Op::new(OpKind::Relu), &[Some(x)], vec![ValueInfo::new("y", ty(DType::F32, "batch,5"))])
        .unwrap();
    let err = infer_types(&mut g).unwrap_err().to_string();
    assert!(err.contains("'relu' (relu)") && err.contains("declared f32[batch,5]"), "{err}");
}

#[test]
fn unknown_inputs_give_unknown_dims_not_errors() {
    let mut b = Builder::new();
    let x = b.input("x", DType::F32, "batch,seq,64");
    let dynamic = b.input("shape", DType::I64, "3");
    let r = b.op(op(OpKind::Reshape), &[x, dynamic]);
    let u = b.g.add_input("u", TensorType::unranked(DType::F32)).unwrap();
    let add = b.op(op(OpKind::Add), &[x, u]);
    let (st, en) = (b.input("st", DType::I64, "1"), b.input("en", DType::I64, "1"));
    let ax = b.ints(&[1]);
    let sl = b.op(op(OpKind::Slice), &[x, st, en, ax]);
    b.infer().unwrap();
    assert_eq!(b.ty(r), "f32[?,?,?]");
    assert_eq!(b.ty(add), "f32[*]");
    assert_eq!(b.ty(sl), "f32[batch,?,64]");
}
