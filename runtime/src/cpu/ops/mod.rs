//! Op implementations, one module per family, and the context every op reads its inputs and attributes
//! from. Ops return [`OpError`] messages; the executor adds the node name and op kind.

pub mod elementwise;
pub mod fused;
pub mod matmul;
pub mod nn;
pub mod output_quant;
pub mod quant;
pub mod reduce;
pub mod shape;
pub mod vision;

use crate::cpu::value::RtTensor;
use qcc_ir::{Attr, DType, Op, ValueInfo};
use std::collections::HashMap;

/// What went wrong inside one op (the executor wraps it with the node's name and op).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpError(pub String);

pub type OpResult<T> = Result<T, OpError>;

/// Builds an [`OpError`] with `format!` syntax.
macro_rules! op_err {
    ($($arg:tt)*) => { $crate::cpu::ops::OpError(format!($($arg)*)) };
}
pub(crate) use op_err;

/// Returns early with an [`OpError`].
macro_rules! bail {
    ($($arg:tt)*) => { return Err($crate::cpu::ops::op_err!($($arg)*)) };
}
pub(crate) use bail;

/// One node's inputs (absent optional inputs are `None`), attributes and declared output types.
pub struct OpCtx<'a> {
    pub op: &'a Op,
    pub inputs: &'a [Option<&'a RtTensor>],
    pub outputs: &'a [ValueInfo],
    /// Products of `linear` may round their f32 operands to bf16 ([`crate::cpu::MatmulPrecision`]).
    pub bf16_products: bool,
    /// Values of the graph inputs' dimension symbols in this run (for `prefix_offset`).
    pub symbols: &'a HashMap<String, usize>,
}

impl<'a> OpCtx<'a> {
    /// A required input.
    pub fn input(&self, i: usize) -> OpResult<&'a RtTensor> {
        self.opt_input(i).ok_or_else(|| op_err!("input {i} is required but absent"))
    }

    /// An optional input (absent slots and empty-named ONNX inputs are `None`).
    pub fn opt_input(&self, i: usize) -> Option<&'a RtTensor> {
        self.inputs.get(i).copied().flatten()
    }

    /// Every present input, in order.
    pub fn present_inputs(&self) -> Vec<&'a RtTensor> {
        self.inputs.iter().flatten().copied().collect()
    }

    pub fn int(&self, name: &str, default: i64) -> i64 {
        self.op.int(name).unwrap_or(default)
    }

    pub fn float(&self, name: &str, default: f32) -> f32 {
        match self.op.attr(name) {
            Some(Attr::Float(v)) => *v,
            Some(Attr::Int(v)) => *v as f32,
            _ => default,
        }
    }

    pub fn str(&self, name: &str, default: &'a str) -> &'a str {
        self.op.str(name).unwrap_or(default)
    }

    pub fn ints(&self, name: &str) -> Option<Vec<i64>> {
        match self.op.attr(name) {
            Some(Attr::Ints(v)) => Some(v.clone()),
            Some(Attr::Int(v)) => Some(vec![*v]),
            _ => None,
        }
    }

    pub fn floats(&self, name: &str) -> Option<Vec<f32>> {
        match self.op.attr(name) {
            Some(Attr::Floats(v)) => Some(v.clone()),
            Some(Attr::Float(v)) => Some(vec![*v]),
            _ => None,
        }
    }

    /// A dtype attribute (accepting ONNX's integer type codes too), else the declared output type when
    /// the graph recorded one.
    pub fn dtype_attr(&self, name: &str) -> Option<DType> {
        match self.op.attr(name) {
            Some(Attr::DType(d)) => Some(*d),
            Some(Attr::Int(code)) => onnx_dtype(*code),
            _ => None,
        }
    }

    /// Integer values of input `i` if present, else of attribute `attr` (ops whose axes/pads/splits
    /// moved from attributes to inputs across opsets).
    pub fn ints_input_or_attr(&self, i: usize, attr: &str) -> OpResult<Option<Vec<i64>>> {
        match self.opt_input(i) {
            Some(t) => Ok(Some(t.to_i64_vec().ok_or_else(|| op_err!("input {i} must be an integer tensor"))?)),
            None => Ok(self.ints(attr)),
        }
    }
}

/// ONNX TensorProto data type codes for the types qcc knows (one table, in qcc-ir).
pub fn onnx_dtype(code: i64) -> Option<DType> {
    qcc_ir::infer::onnx_dtype(code)
}

/// Resolves a possibly negative axis against `rank`.
pub fn norm_axis(axis: i64, rank: usize) -> OpResult<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r {
        bail!("axis {axis} is out of range for rank {rank}");
    }
    Ok(a as usize)
}

/// Numpy broadcasting of two shapes.
pub fn broadcast_shapes(a: &[usize], b: &[usize]) -> OpResult<Vec<usize>> {
    let rank = a.len().max(b.len());
    let mut out = vec![0; rank];
    for i in 0..rank {
        let da = if i + a.len() >= rank { a[i + a.len() - rank] } else { 1 };
        let db = if i + b.len() >= rank { b[i + b.len() - rank] } else { 1 };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => bail!("shapes {a:?} and {b:?} do not broadcast"),
        };
    }
    Ok(out)
}

/// Runs `$body` on a float tensor's array bound to `$a` (f32 and f64 natively; f16, bf16 and fp8 in f32,
/// rounded back), wrapping the resulting array in the matching variant.
macro_rules! float_dispatch {
    ($t:expr, $a:ident => $body:expr) => {
        match $t {
            $crate::cpu::value::RtTensor::F32($a) => $crate::cpu::value::RtTensor::F32($body),
            $crate::cpu::value::RtTensor::F64($a) => $crate::cpu::value::RtTensor::F64($body),
            other if other.dtype().is_float() => {
                let up = other.cast_array::<f32>();
                let $a = &up;
                $crate::cpu::value::RtTensor::F32($body).cast(other.dtype())
            }
            other => $crate::cpu::ops::bail!("expected a float tensor, got {}", other.dtype()),
        }
    };
}
pub(crate) use float_dispatch;
