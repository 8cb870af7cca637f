//! Operations: a kind (with its arity schema) plus typed attributes.
//!
//! The ONNX-derived kinds keep ONNX semantics (broadcasting, attribute meaning, defaults) so that import is
//! a direct mapping and the ONNX backend node tests define their behaviour. qcc's own kinds (graph inputs,
//! constants, quantization) carry the semantics documented on each variant.

use crate::{DType, Tensor};
use std::collections::BTreeMap;
use std::fmt;

/// An attribute value. Floats are `f32` because ONNX attributes are, which keeps import exact.
#[derive(Clone, Debug, PartialEq)]
pub enum Attr {
    Int(i64),
    Float(f32),
    Str(String),
    Ints(Vec<i64>),
    Floats(Vec<f32>),
    Strs(Vec<String>),
    DType(DType),
    Tensor(Tensor),
}

pub type Attrs = BTreeMap<String, Attr>;

/// How many inputs and outputs an op kind takes. `max_inputs == usize::MAX` means variadic; outputs
/// `None` means the count is given per node (Split).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arity {
    pub min_inputs: usize,
    pub max_inputs: usize,
    pub outputs: Option<usize>,
}

const VARIADIC: usize = usize::MAX;

macro_rules! op_kinds {
    ($( $(#[$doc:meta])* $variant:ident = $name:literal, onnx $onnx:literal, in $min:literal ..= $max:expr, out $out:expr; )*) => {
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum OpKind { $( $(#[$doc])* $variant, )* }

        impl OpKind {
            pub const ALL: &'static [OpKind] = &[ $( OpKind::$variant, )* ];

            /// The op's name in the text format.
            pub fn name(self) -> &'static str {
                match self { $( OpKind::$variant => $name, )* }
            }

            /// The ONNX op type this kind imports from, or "" for qcc-only kinds.
            pub fn onnx_name(self) -> &'static str {
                match self { $( OpKind::$variant => $onnx, )* }
            }

            pub fn arity(self) -> Arity {
                match self { $( OpKind::$variant => Arity { min_inputs: $min, max_inputs: $max, outputs: $out }, )* }
            }
        }
    };
}

op_kinds! {
    /// A graph input; its name and type are the node's single output.
    Input = "input", onnx "", in 0..=0, out Some(1);
    /// A constant; attribute `value` holds the tensor.
    Constant = "constant", onnx "Constant", in 0..=0, out Some(1);

    // Elementwise arithmetic (numpy broadcasting).
    Add = "add", onnx "Add", in 2..=2, out Some(1);
    Sub = "sub", onnx "Sub", in 2..=2, out Some(1);
    Mul = "mul", onnx "Mul", in 2..=2, out Some(1);
    Div = "div", onnx "Div", in 2..=2, out Some(1);
    Pow = "pow", onnx "Pow", in 2..=2, out Some(1);
    Mod = "mod", onnx "Mod", in 2..=2, out Some(1);
    Max = "max", onnx "Max", in 1..=VARIADIC, out Some(1);
    Min = "min", onnx "Min", in 1..=VARIADIC, out Some(1);
    Sum = "sum", onnx "Sum", in 1..=VARIADIC, out Some(1);
    Mean = "mean", onnx "Mean", in 1..=VARIADIC, out Some(1);
    Clip = "clip", onnx "Clip", in 1..=3, out Some(1);
    Where = "where", onnx "Where", in 3..=3, out Some(1);
    // Elementwise unary.
    Neg = "neg", onnx "Neg", in 1..=1, out Some(1);
    Abs = "abs", onnx "Abs", in 1..=1, out Some(1);
    Sqrt = "sqrt", onnx "Sqrt", in 1..=1, out Some(1);
    Reciprocal = "reciprocal", onnx "Reciprocal", in 1..=1, out Some(1);
    Exp = "exp", onnx "Exp", in 1..=1, out Some(1);
    Log = "log", onnx "Log", in 1..=1, out Some(1);
    Sin = "sin", onnx "Sin", in 1..=1, out Some(1);
    Cos = "cos", onnx "Cos", in 1..=1, out Some(1);
    Erf = "erf", onnx "Erf", in 1..=1, out Some(1);
    Tanh = "tanh", onnx "Tanh", in 1..=1, out Some(1);
    Sigmoid = "sigmoid", onnx "Sigmoid", in 1..=1, out Some(1);
    HardSigmoid = "hard_sigmoid", onnx "HardSigmoid", in 1..=1, out Some(1);
    Relu = "relu", onnx "Relu", in 1..=1, out Some(1);
    LeakyRelu = "leaky_relu", onnx "LeakyRelu", in 1..=1, out Some(1);
    Gelu = "gelu", onnx "Gelu", in 1..=1, out Some(1);
    Softplus = "softplus", onnx "Softplus", in 1..=1, out Some(1);
    Floor = "floor", onnx "Floor", in 1..=1, out Some(1);
    Ceil = "ceil", onnx "Ceil", in 1..=1, out Some(1);
    Round = "round", onnx "Round", in 1..=1, out Some(1);
    Sign = "sign", onnx "Sign", in 1..=1, out Some(1);
    Not = "not", onnx "Not", in 1..=1, out Some(1);
    Identity = "identity", onnx "Identity", in 1..=1, out Some(1);
    /// Attribute `to` (a dtype).
    Cast = "cast", onnx "Cast", in 1..=1, out Some(1);
    CastLike = "cast_like", onnx "CastLike", in 2..=2, out Some(1);
    // Comparison and logic.
    Equal = "equal", onnx "Equal", in 2..=2, out Some(1);
    Less = "less", onnx "Less", in 2..=2, out Some(1);
    LessOrEqual = "less_or_equal", onnx "LessOrEqual", in 2..=2, out Some(1);
    Greater = "greater", onnx "Greater", in 2..=2, out Some(1);
    GreaterOrEqual = "greater_or_equal", onnx "GreaterOrEqual", in 2..=2, out Some(1);
    And = "and", onnx "And", in 2..=2, out Some(1);
    Or = "or", onnx "Or", in 2..=2, out Some(1);
    Xor = "xor", onnx "Xor", in 2..=2, out Some(1);

    // Linear algebra.
    MatMul = "matmul", onnx "MatMul", in 2..=2, out Some(1);
    Gemm = "gemm", onnx "Gemm", in 2..=3, out Some(1);
    MatMulInteger = "matmul_integer", onnx "MatMulInteger", in 2..=4, out Some(1);
    QLinearMatMul = "qlinear_matmul", onnx "QLinearMatMul", in 8..=8, out Some(1);

    // Normalisation and activation blocks.
    Softmax = "softmax", onnx "Softmax", in 1..=1, out Some(1);
    LogSoftmax = "log_softmax", onnx "LogSoftmax", in 1..=1, out Some(1);
    LayerNormalization = "layer_normalization", onnx "LayerNormalization", in 2..=3, out Some(1);
    RmsNormalization = "rms_normalization", onnx "RMSNormalization", in 2..=2, out Some(1);
    /// onnxruntime's contrib op (domain com.microsoft / ai.onnx in exports): RMS norm with a scale.
    SimplifiedLayerNormalization = "simplified_layer_normalization", onnx "SimplifiedLayerNormalization", in 2..=2, out Some(1);
    BatchNormalization = "batch_normalization", onnx "BatchNormalization", in 5..=5, out Some(1);

    // Reductions (axes as attribute before opset 18, as input from 18; import normalises to the input form).
    ReduceMean = "reduce_mean", onnx "ReduceMean", in 1..=2, out Some(1);
    ReduceSum = "reduce_sum", onnx "ReduceSum", in 1..=2, out Some(1);
    ReduceMax = "reduce_max", onnx "ReduceMax", in 1..=2, out Some(1);
    ReduceMin = "reduce_min", onnx "ReduceMin", in 1..=2, out Some(1);
    ReduceProd = "reduce_prod", onnx "ReduceProd", in 1..=2, out Some(1);
    ArgMax = "arg_max", onnx "ArgMax", in 1..=1, out Some(1);
    ArgMin = "arg_min", onnx "ArgMin", in 1..=1, out Some(1);
    CumSum = "cum_sum", onnx "CumSum", in 2..=2, out Some(1);

    // Shape and data movement.
    Shape = "shape", onnx "Shape", in 1..=1, out Some(1);
    Size = "size", onnx "Size", in 1..=1, out Some(1);
    Reshape = "reshape", onnx "Reshape", in 2..=2, out Some(1);
    Transpose = "transpose", onnx "Transpose", in 1..=1, out Some(1);
    Squeeze = "squeeze", onnx "Squeeze", in 1..=2, out Some(1);
    Unsqueeze = "unsqueeze", onnx "Unsqueeze", in 1..=2, out Some(1);
    Flatten = "flatten", onnx "Flatten", in 1..=1, out Some(1);
    Concat = "concat", onnx "Concat", in 1..=VARIADIC, out Some(1);
    Split = "split", onnx "Split", in 1..=2, out None;
    Slice = "slice", onnx "Slice", in 3..=5, out Some(1);
    Gather = "gather", onnx "Gather", in 2..=2, out Some(1);
    GatherElements = "gather_elements", onnx "GatherElements", in 2..=2, out Some(1);
    Expand = "expand", onnx "Expand", in 2..=2, out Some(1);
    Tile = "tile", onnx "Tile", in 2..=2, out Some(1);
    Pad = "pad", onnx "Pad", in 1..=4, out Some(1);
    ConstantOfShape = "constant_of_shape", onnx "ConstantOfShape", in 1..=1, out Some(1);
    Range = "range", onnx "Range", in 3..=3, out Some(1);
    Trilu = "trilu", onnx "Trilu", in 1..=2, out Some(1);

    // Vision.
    Conv = "conv", onnx "Conv", in 2..=3, out Some(1);
    MaxPool = "max_pool", onnx "MaxPool", in 1..=1, out Some(1);
    AveragePool = "average_pool", onnx "AveragePool", in 1..=1, out Some(1);
    GlobalAveragePool = "global_average_pool", onnx "GlobalAveragePool", in 1..=1, out Some(1);
    Resize = "resize", onnx "Resize", in 1..=4, out Some(1);

    // Quantization, ONNX form (as other quantizers emit it).
    QuantizeLinear = "quantize_linear", onnx "QuantizeLinear", in 2..=3, out Some(1);
    DequantizeLinear = "dequantize_linear", onnx "DequantizeLinear", in 2..=3, out Some(1);
    DynamicQuantizeLinear = "dynamic_quantize_linear", onnx "DynamicQuantizeLinear", in 1..=1, out Some(3);

    // Quantization, qcc form.
    /// `quantize(x, step)`: q = clamp(round_half_even(x / step), range of attr `to`), `step` a scalar or a
    /// vector along attribute `axis`. Symmetric (no zero point).
    Quantize = "quantize", onnx "", in 2..=2, out Some(1);
    /// `dequantize(q, step)`: x = q * step, per tensor or per channel along `axis`.
    Dequantize = "dequantize", onnx "", in 2..=2, out Some(1);
    /// `int_linear(qx[.., K], qw[N, K], scale[N], bias?[N])`: y = scale (.) (qx qw^T) + bias, where
    /// qx qw^T is an exact int32-accumulated integer product and `scale` folds both steps (the epilogue).
    /// `qw` is i4/i8 (or f8e4m3: products in f32). `qx` is an integer tensor (i4/i8, or i16 for prefix rows,
    /// see "output quantization" below), f8e4m3, or a float tensor: then, with attribute `act_bits = b`,
    /// each row is quantized dynamically (step = row absmax / (2^(b-1) - 1), round half to even) and y =
    /// step_row * scale (.) (q qw^T) + bias; without `act_bits` a float `qx` is used as is (weight-only
    /// quantization, y = scale (.) (x qw^T) + bias).
    IntLinear = "int_linear", onnx "", in 3..=4, out Some(1);

    // ---- qcc fused blocks (recognised by the block-recognition passes in qcc-passes) ----
    /// `linear(x[.., K], w[N, K], bias?[N])`: y = x w^T + bias, in x's float type.
    Linear = "linear", onnx "", in 2..=3, out Some(1);
    /// `rms_norm(x, gamma[D], beta?[D])` over the last axis: y = x / sqrt(mean(x^2) + epsilon) * gamma + beta;
    /// attribute `epsilon` (f32). The optional shift `beta` is how the `symmetrize` pass centres channels.
    RmsNorm = "rms_norm", onnx "", in 2..=3, out Some(1);
    /// `swiglu(gate, up)`: y = gate * sigmoid(gate) * up (SiLU-gated linear unit, broadcasting).
    Swiglu = "swiglu", onnx "", in 2..=2, out Some(1);
    /// `rotary(x[.., S, D], cos, sin)`: rotary position embedding in the half-rotation (GPT-NeoX/Llama)
    /// form, y = x * cos + rotate_half(x) * sin with rotate_half(x) = concat(-x[.., D/2:], x[.., :D/2]);
    /// cos and sin broadcast against x.
    Rotary = "rotary", onnx "", in 3..=3, out Some(1);
    /// `attention(q[B, Hq, S, D], k[B, Hkv, T, D], v[B, Hkv, T, Dv], mask?)`: softmax(q k^T * scale + mask) v
    /// per head, query head h reading KV head h / (Hq / Hkv) (grouped-query attention); attributes `scale`
    /// (f32) and `causal` (int, 1: keys after the query's position, counted from the end, are masked).
    /// The additive mask broadcasts to [B, Hq, S, T].
    Attention = "attention", onnx "", in 3..=4, out Some(1);
    /// `hadamard(x[.., n]) {size = n}`: the orthonormal Hadamard transform of the last axis,
    /// y = x H_n^T / sqrt(n) (each y_i = sum_j H_n[i][j] x_j / sqrt(n)), with H_n the matrix of
    /// [`crate::hadamard::Hadamard::new`]. Inserted by the `rotate` pass where no producer can absorb a
    /// rotation (the down_proj input); a kernel applies it online.
    Hadamard = "hadamard", onnx "", in 1..=1, out Some(1);
}

/// Output quantization (QSM epilogues). `rms_norm`, `swiglu`, `attention`, `hadamard`, `linear` and
/// `int_linear` accept attribute `to` (i4, i8 or f8e4m3): the op computes its float result y and emits
/// q = clamp(round_half_even(y / step), range of `to`) (f8e4m3: saturating conversion), where `step` is
/// the optional f32 tensor attribute `step` (per channel of the last axis, or scalar; default 1: QSM
/// folds the step into the producer's parameters; on `attention`, whose output is [B, H, S, D], also
/// H * D steps per head and channel: element (b, h, s, d) uses step[h * D + d]). With attribute `prefix_tokens = P` the rows whose
/// position (index along the second-to-last axis) is < P are clamped to the range of attribute
/// `prefix_to` (default i16) instead, and the output dtype is `prefix_to`: the first tokens (attention
/// sinks, whose activations are orders of magnitude larger) keep 16 bits at the same step. `quantize`
/// accepts `prefix_tokens` / `prefix_to` with the same meaning. In a graph that runs on a KV cache, rows
/// are a chunk of a longer sequence: string attribute `prefix_offset` names the dimension symbol of the
/// graph inputs that counts the tokens before the chunk (`past_seq`), and positions are absolute, that
/// index plus the symbol's value, so a decode step's token is not taken for a first token.
#[derive(Clone, Debug, PartialEq)]
pub struct OutputQuant {
    pub to: DType,
    pub prefix_tokens: usize,
    pub prefix_to: DType,
    /// The dimension symbol whose value is added to row positions (see above).
    pub prefix_offset: Option<String>,
    pub step: Option<Tensor>,
}

impl OutputQuant {
    /// The dtype of the op's output.
    pub fn output_dtype(&self) -> DType {
        if self.prefix_tokens > 0 {
            self.prefix_to
        } else {
            self.to
        }
    }
}

impl OpKind {
    /// Ops that may carry an output quantization (see [`OutputQuant`]).
    pub fn can_quantize_output(self) -> bool {
        matches!(
            self,
            OpKind::RmsNorm
                | OpKind::Swiglu
                | OpKind::Attention
                | OpKind::Hadamard
                | OpKind::Linear
                | OpKind::IntLinear
        )
    }

    pub fn from_name(name: &str) -> Option<OpKind> {
        OpKind::ALL.iter().copied().find(|k| k.name() == name)
    }

    pub fn from_onnx(op_type: &str) -> Option<OpKind> {
        OpKind::ALL.iter().copied().find(|k| !k.onnx_name().is_empty() && k.onnx_name() == op_type)
    }

    /// Ops whose output equals the input up to elementwise math, with numpy broadcasting of all inputs.
    pub fn is_elementwise(self) -> bool {
        use OpKind::*;
        matches!(
            self,
            Add | Sub
                | Mul
                | Div
                | Pow
                | Mod
                | Max
                | Min
                | Sum
                | Mean
                | Clip
                | Where
                | Neg
                | Abs
                | Sqrt
                | Reciprocal
                | Exp
                | Log
                | Sin
                | Cos
                | Erf
                | Tanh
                | Sigmoid
                | HardSigmoid
                | Relu
                | LeakyRelu
                | Gelu
                | Softplus
                | Floor
                | Ceil
                | Round
                | Sign
                | Not
                | Identity
                | Cast
                | CastLike
                | Equal
                | Less
                | LessOrEqual
                | Greater
                | GreaterOrEqual
                | And
                | Or
                | Xor
        )
    }
}

impl fmt::Display for OpKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An operation: its kind and attributes.
#[derive(Clone, Debug, PartialEq)]
pub struct Op {
    pub kind: OpKind,
    pub attrs: Attrs,
}

impl Op {
    pub fn new(kind: OpKind) -> Op {
        Op { kind, attrs: Attrs::new() }
    }

    pub fn with(mut self, name: &str, value: Attr) -> Op {
        self.attrs.insert(name.to_string(), value);
        self
    }

    pub fn attr(&self, name: &str) -> Option<&Attr> {
        self.attrs.get(name)
    }

    pub fn int(&self, name: &str) -> Option<i64> {
        match self.attrs.get(name) {
            Some(Attr::Int(v)) => Some(*v),
            _ => None,
        }
    }

    pub fn float(&self, name: &str) -> Option<f32> {
        match self.attrs.get(name) {
            Some(Attr::Float(v)) => Some(*v),
            _ => None,
        }
    }

    pub fn ints(&self, name: &str) -> Option<&[i64]> {
        match self.attrs.get(name) {
            Some(Attr::Ints(v)) => Some(v),
            _ => None,
        }
    }

    pub fn str(&self, name: &str) -> Option<&str> {
        match self.attrs.get(name) {
            Some(Attr::Str(v)) => Some(v),
            _ => None,
        }
    }

    pub fn dtype(&self, name: &str) -> Option<DType> {
        match self.attrs.get(name) {
            Some(Attr::DType(v)) => Some(*v),
            _ => None,
        }
    }

    /// The output quantization of an op that can carry one (`to` set), see [`OutputQuant`]; for
    /// `quantize`, its prefix settings.
    pub fn output_quant(&self) -> Option<OutputQuant> {
        if !self.kind.can_quantize_output() && self.kind != OpKind::Quantize {
            return None;
        }
        let to = self.dtype("to")?;
        Some(OutputQuant {
            to,
            prefix_tokens: self.int("prefix_tokens").unwrap_or(0).max(0) as usize,
            prefix_to: self.dtype("prefix_to").unwrap_or(DType::I16),
            prefix_offset: self.str("prefix_offset").map(str::to_string),
            step: self.tensor("step").cloned(),
        })
    }

    pub fn tensor(&self, name: &str) -> Option<&Tensor> {
        match self.attrs.get(name) {
            Some(Attr::Tensor(v)) => Some(v),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_resolve() {
        let mut seen = std::collections::HashSet::new();
        for &k in OpKind::ALL {
            assert!(seen.insert(k.name()), "duplicate name {}", k.name());
            assert_eq!(OpKind::from_name(k.name()), Some(k));
            if !k.onnx_name().is_empty() {
                assert_eq!(OpKind::from_onnx(k.onnx_name()), Some(k));
            }
        }
    }
}
