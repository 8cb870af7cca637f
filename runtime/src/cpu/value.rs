//! The runtime tensor: one `ndarray` array per element type, with conversions to and from the IR's
//! constant [`Tensor`] and ONNX `Cast` semantics between every pair of element types.
//!
//! Sub-byte and FP8 types are stored unpacked: `I4` as one `i8` per value, `U4` as one `u8`, and
//! `F8E4M3` as its raw bit pattern in a `u8` (ops decode it to f32 before doing math).

use half::{bf16, f16};
use ndarray::{ArrayD, CowArray, IxDyn};
use qcc_ir::{f32_to_f8e4m3, f8e4m3_to_f32, pack_nibbles, DType, Tensor, TensorError};

/// A tensor produced or consumed by the CPU executor.
#[derive(Clone, Debug, PartialEq)]
pub enum RtTensor {
    F64(ArrayD<f64>),
    F32(ArrayD<f32>),
    F16(ArrayD<f16>),
    BF16(ArrayD<bf16>),
    /// FP8 E4M3FN bit patterns.
    F8E4M3(ArrayD<u8>),
    I64(ArrayD<i64>),
    I32(ArrayD<i32>),
    I16(ArrayD<i16>),
    I8(ArrayD<i8>),
    U64(ArrayD<u64>),
    U32(ArrayD<u32>),
    U16(ArrayD<u16>),
    U8(ArrayD<u8>),
    /// int4 values in [-8, 7], one per `i8`.
    I4(ArrayD<i8>),
    /// uint4 values in [0, 15], one per `u8`.
    U4(ArrayD<u8>),
    Bool(ArrayD<bool>),
}

/// Applies `$body` (which sees the array as `$a`) to whichever variant `$t` holds.
macro_rules! with_any {
    ($t:expr, $a:ident => $body:expr) => {
        match $t {
            $crate::cpu::value::RtTensor::F64($a) => $body,
            $crate::cpu::value::RtTensor::F32($a) => $body,
            $crate::cpu::value::RtTensor::F16($a) => $body,
            $crate::cpu::value::RtTensor::BF16($a) => $body,
            $crate::cpu::value::RtTensor::F8E4M3($a) => $body,
            $crate::cpu::value::RtTensor::I64($a) => $body,
            $crate::cpu::value::RtTensor::I32($a) => $body,
            $crate::cpu::value::RtTensor::I16($a) => $body,
            $crate::cpu::value::RtTensor::I8($a) => $body,
            $crate::cpu::value::RtTensor::U64($a) => $body,
            $crate::cpu::value::RtTensor::U32($a) => $body,
            $crate::cpu::value::RtTensor::U16($a) => $body,
            $crate::cpu::value::RtTensor::U8($a) => $body,
            $crate::cpu::value::RtTensor::I4($a) => $body,
            $crate::cpu::value::RtTensor::U4($a) => $body,
            $crate::cpu::value::RtTensor::Bool($a) => $body,
        }
    };
}
pub(crate) use with_any;

/// Like [`with_any`], but `$body` yields an array of the same element type, rewrapped in the same variant
/// (data movement ops: transpose, slice, gather, ...).
macro_rules! map_any {
    ($t:expr, $a:ident => $body:expr) => {
        match $t {
            $crate::cpu::value::RtTensor::F64($a) => $crate::cpu::value::RtTensor::F64($body),
            $crate::cpu::value::RtTensor::F32($a) => $crate::cpu::value::RtTensor::F32($body),
            $crate::cpu::value::RtTensor::F16($a) => $crate::cpu::value::RtTensor::F16($body),
            $crate::cpu::value::RtTensor::BF16($a) => $crate::cpu::value::RtTensor::BF16($body),
            $crate::cpu::value::RtTensor::F8E4M3($a) => $crate::cpu::value::RtTensor::F8E4M3($body),
            $crate::cpu::value::RtTensor::I64($a) => $crate::cpu::value::RtTensor::I64($body),
            $crate::cpu::value::RtTensor::I32($a) => $crate::cpu::value::RtTensor::I32($body),
            $crate::cpu::value::RtTensor::I16($a) => $crate::cpu::value::RtTensor::I16($body),
            $crate::cpu::value::RtTensor::I8($a) => $crate::cpu::value::RtTensor::I8($body),
            $crate::cpu::value::RtTensor::U64($a) => $crate::cpu::value::RtTensor::U64($body),
            $crate::cpu::value::RtTensor::U32($a) => $crate::cpu::value::RtTensor::U32($body),
            $crate::cpu::value::RtTensor::U16($a) => $crate::cpu::value::RtTensor::U16($body),
            $crate::cpu::value::RtTensor::U8($a) => $crate::cpu::value::RtTensor::U8($body),
            $crate::cpu::value::RtTensor::I4($a) => $crate::cpu::value::RtTensor::I4($body),
            $crate::cpu::value::RtTensor::U4($a) => $crate::cpu::value::RtTensor::U4($body),
            $crate::cpu::value::RtTensor::Bool($a) => $crate::cpu::value::RtTensor::Bool($body),
        }
    };
}
pub(crate) use map_any;

/// Element types that convert to and from each other with ONNX `Cast` semantics.
pub trait Scalar: Copy + Clone + Send + Sync + PartialOrd + std::fmt::Debug + 'static {
    const DTYPE: DType;
    /// Integers and bool convert among themselves through `i64` (exact, wrapping); anything involving a
    /// float goes through `f64`.
    const IS_INT: bool;
    fn to_f64(self) -> f64;
    fn from_f64(v: f64) -> Self;
    fn to_i64(self) -> i64;
    fn from_i64(v: i64) -> Self;
    fn wrap(a: ArrayD<Self>) -> RtTensor;
}

macro_rules! int_scalar {
    ($($t:ty => $d:ident),*) => {$(
        impl Scalar for $t {
            const DTYPE: DType = DType::$d;
            const IS_INT: bool = true;
            fn to_f64(self) -> f64 { self as f64 }
            // `as` saturates (and maps NaN to 0): ONNX leaves out-of-range float-to-int casts undefined.
            fn from_f64(v: f64) -> Self { v as $t }
            fn to_i64(self) -> i64 { self as i64 }
            fn from_i64(v: i64) -> Self { v as $t }
            fn wrap(a: ArrayD<Self>) -> RtTensor { RtTensor::$d(a) }
        }
    )*};
}
int_scalar!(i64 => I64, i32 => I32, i16 => I16, i8 => I8, u64 => U64, u32 => U32, u16 => U16, u8 => U8);

impl Scalar for f64 {
    const DTYPE: DType = DType::F64;
    const IS_INT: bool = false;
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(v: f64) -> Self {
        v
    }
    fn to_i64(self) -> i64 {
        self as i64
    }
    fn from_i64(v: i64) -> Self {
        v as f64
    }
    fn wrap(a: ArrayD<Self>) -> RtTensor {
        RtTensor::F64(a)
    }
}

macro_rules! narrow_float_scalar {
    ($($t:ty => $d:ident, $from64:expr),*) => {$(
        impl Scalar for $t {
            const DTYPE: DType = DType::$d;
            const IS_INT: bool = false;
            fn to_f64(self) -> f64 { f64::from(self) }
            fn from_f64(v: f64) -> Self { $from64(v) }
            fn to_i64(self) -> i64 { f64::from(self) as i64 }
            fn from_i64(v: i64) -> Self { $from64(v as f64) }
            fn wrap(a: ArrayD<Self>) -> RtTensor { RtTensor::$d(a) }
        }
    )*};
}
narrow_float_scalar!(f32 => F32, |v: f64| v as f32, f16 => F16, f16::from_f64, bf16 => BF16, bf16::from_f64);

impl Scalar for bool {
    const DTYPE: DType = DType::Bool;
    const IS_INT: bool = true;
    fn to_f64(self) -> f64 {
        self as u8 as f64
    }
    fn from_f64(v: f64) -> Self {
        v != 0.0
    }
    fn to_i64(self) -> i64 {
        self as i64
    }
    fn from_i64(v: i64) -> Self {
        v != 0
    }
    fn wrap(a: ArrayD<Self>) -> RtTensor {
        RtTensor::Bool(a)
    }
}

/// One element converted with `Cast` semantics.
#[inline]
pub fn convert<S: Scalar, D: Scalar>(s: S) -> D {
    if S::IS_INT && D::IS_INT {
        D::from_i64(s.to_i64())
    } else {
        D::from_f64(s.to_f64())
    }
}

fn array<T>(dims: &[usize], values: Vec<T>) -> Result<ArrayD<T>, TensorError> {
    let n = values.len();
    ArrayD::from_shape_vec(IxDyn(dims), values).map_err(|_| TensorError::LengthMismatch {
        dtype: DType::U8,
        dims: format!("{dims:?}"),
        expected: dims.iter().product(),
        actual: n,
    })
}

/// Contiguous row-major values of an array (copied only when the layout is not standard).
pub fn standard_vec<T: Clone>(a: &ArrayD<T>) -> Vec<T> {
    match a.as_slice() {
        Some(s) => s.to_vec(),
        None => a.iter().cloned().collect(),
    }
}

impl RtTensor {
    /// The tensor with its axes permuted (axis i of the result is axis `perm[i]` of this one),
    /// in standard layout. `perm` must be a permutation of the rank.
    pub fn permuted(&self, perm: &[usize]) -> RtTensor {
        map_any!(self, a => a.view().permuted_axes(ndarray::IxDyn(perm)).as_standard_layout().into_owned())
    }

    pub fn dtype(&self) -> DType {
        match self {
            RtTensor::F64(_) => DType::F64,
            RtTensor::F32(_) => DType::F32,
            RtTensor::F16(_) => DType::F16,
            RtTensor::BF16(_) => DType::BF16,
            RtTensor::F8E4M3(_) => DType::F8E4M3,
            RtTensor::I64(_) => DType::I64,
            RtTensor::I32(_) => DType::I32,
            RtTensor::I16(_) => DType::I16,
            RtTensor::I8(_) => DType::I8,
            RtTensor::U64(_) => DType::U64,
            RtTensor::U32(_) => DType::U32,
            RtTensor::U16(_) => DType::U16,
            RtTensor::U8(_) => DType::U8,
            RtTensor::I4(_) => DType::I4,
            RtTensor::U4(_) => DType::U4,
            RtTensor::Bool(_) => DType::Bool,
        }
    }

    pub fn shape(&self) -> &[usize] {
        with_any!(self, a => a.shape())
    }

    pub fn len(&self) -> usize {
        with_any!(self, a => a.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Converts an IR constant (copying once; unaligned views are handled by `Tensor::to_vec`).
    pub fn from_ir_tensor(t: &Tensor) -> Result<RtTensor, TensorError> {
        let d = &t.dims;
        Ok(match t.dtype {
            DType::F64 => RtTensor::F64(array(d, t.to_vec()?)?),
            DType::F32 => RtTensor::F32(array(d, t.to_vec()?)?),
            DType::F16 => RtTensor::F16(array(d, t.to_vec()?)?),
            DType::BF16 => RtTensor::BF16(array(d, t.to_vec()?)?),
            DType::F8E4M3 => RtTensor::F8E4M3(array(d, t.bytes()?.to_vec())?),
            DType::I64 => RtTensor::I64(array(d, t.to_vec()?)?),
            DType::I32 => RtTensor::I32(array(d, t.to_vec()?)?),
            DType::I16 => RtTensor::I16(array(d, t.to_vec()?)?),
            DType::I8 => RtTensor::I8(array(d, t.bytes()?.iter().map(|&b| b as i8).collect())?),
            DType::U64 => RtTensor::U64(array(d, t.to_vec()?)?),
            DType::U32 => RtTensor::U32(array(d, t.to_vec()?)?),
            DType::U16 => RtTensor::U16(array(d, t.to_vec()?)?),
            DType::U8 => RtTensor::U8(array(d, t.bytes()?.to_vec())?),
            DType::I4 => RtTensor::I4(array(d, t.to_i64_vec()?.into_iter().map(|v| v as i8).collect())?),
            DType::U4 => RtTensor::U4(array(d, t.to_i64_vec()?.into_iter().map(|v| v as u8).collect())?),
            DType::Bool => RtTensor::Bool(array(d, t.bytes()?.iter().map(|&b| b != 0).collect())?),
        })
    }

    /// Converts to an owned IR tensor (sub-byte types packed two per byte, low nibble first).
    pub fn to_ir_tensor(&self) -> Tensor {
        let dims = self.shape().to_vec();
        let raw = |dtype: DType, bytes: Vec<u8>| Tensor {
            dtype,
            dims: dims.clone(),
            data: qcc_ir::TensorData::Bytes(bytes::Bytes::from(bytes)),
        };
        match self {
            RtTensor::F64(a) => Tensor::from_slice(dims, &standard_vec(a)),
            RtTensor::F32(a) => Tensor::from_slice(dims, &standard_vec(a)),
            RtTensor::F16(a) => Tensor::from_slice(dims, &standard_vec(a)),
            RtTensor::BF16(a) => Tensor::from_slice(dims, &standard_vec(a)),
            RtTensor::I64(a) => Tensor::from_slice(dims, &standard_vec(a)),
            RtTensor::I32(a) => Tensor::from_slice(dims, &standard_vec(a)),
            RtTensor::I16(a) => Tensor::from_slice(dims, &standard_vec(a)),
            RtTensor::I8(a) => Tensor::from_slice(dims, &standard_vec(a)),
            RtTensor::U64(a) => Tensor::from_slice(dims, &standard_vec(a)),
            RtTensor::U32(a) => Tensor::from_slice(dims, &standard_vec(a)),
            RtTensor::U16(a) => Tensor::from_slice(dims, &standard_vec(a)),
            RtTensor::U8(a) => Tensor::from_slice(dims, &standard_vec(a)),
            RtTensor::F8E4M3(a) => raw(DType::F8E4M3, standard_vec(a)),
            RtTensor::Bool(a) => raw(DType::Bool, a.iter().map(|&b| b as u8).collect()),
            RtTensor::I4(a) => raw(DType::I4, pack_nibbles(a.iter().map(|&v| v as i64))),
            RtTensor::U4(a) => raw(DType::U4, pack_nibbles(a.iter().map(|&v| v as i64))),
        }
    }

    /// A scalar (rank-0) tensor.
    pub fn scalar<T: Scalar>(v: T) -> RtTensor {
        T::wrap(ArrayD::from_elem(IxDyn(&[]), v))
    }

    /// A tensor from a shape and row-major values; `None` when the counts disagree.
    pub fn from_vec<T: Scalar>(dims: &[usize], values: Vec<T>) -> Option<RtTensor> {
        ArrayD::from_shape_vec(IxDyn(dims), values).ok().map(T::wrap)
    }

    /// The elements converted to `D` with `Cast` semantics (FP8 and 4-bit values decoded first).
    pub fn cast_array<D: Scalar>(&self) -> ArrayD<D> {
        match self {
            RtTensor::F8E4M3(a) => a.mapv(|b| D::from_f64(f8e4m3_to_f32(b) as f64)),
            RtTensor::F64(a) => a.mapv(convert),
            RtTensor::F32(a) => a.mapv(convert),
            RtTensor::F16(a) => a.mapv(convert),
            RtTensor::BF16(a) => a.mapv(convert),
            RtTensor::I64(a) => a.mapv(convert),
            RtTensor::I32(a) => a.mapv(convert),
            RtTensor::I16(a) => a.mapv(convert),
            RtTensor::I8(a) | RtTensor::I4(a) => a.mapv(convert),
            RtTensor::U64(a) => a.mapv(convert),
            RtTensor::U32(a) => a.mapv(convert),
            RtTensor::U16(a) => a.mapv(convert),
            RtTensor::U8(a) | RtTensor::U4(a) => a.mapv(convert),
            RtTensor::Bool(a) => a.mapv(convert),
        }
    }

    /// ONNX `Cast` to `to` (FP8 saturating by default; integer and 4-bit targets wrap).
    pub fn cast(&self, to: DType) -> RtTensor {
        self.cast_with(to, true)
    }

    /// `Cast` with an explicit FP8 `saturate` flag (false: out-of-range values become NaN).
    pub fn cast_with(&self, to: DType, saturate: bool) -> RtTensor {
        if self.dtype() == to {
            return self.clone();
        }
        match to {
            DType::F64 => RtTensor::F64(self.cast_array()),
            DType::F32 => RtTensor::F32(self.cast_array()),
            DType::F16 => RtTensor::F16(self.cast_array()),
            DType::BF16 => RtTensor::BF16(self.cast_array()),
            DType::I64 => RtTensor::I64(self.cast_array()),
            DType::I32 => RtTensor::I32(self.cast_array()),
            DType::I16 => RtTensor::I16(self.cast_array()),
            DType::I8 => RtTensor::I8(self.cast_array()),
            DType::U64 => RtTensor::U64(self.cast_array()),
            DType::U32 => RtTensor::U32(self.cast_array()),
            DType::U16 => RtTensor::U16(self.cast_array()),
            DType::U8 => RtTensor::U8(self.cast_array()),
            DType::Bool => RtTensor::Bool(self.cast_array()),
            DType::F8E4M3 => RtTensor::F8E4M3(self.cast_array::<f32>().mapv(|x| f32_to_f8(x, saturate))),
            // Like every integer cast, 4-bit casts truncate and wrap (ONNX Cast 25; the node tests expect it).
            DType::I4 => RtTensor::I4(self.cast_array::<i64>().mapv(|x| (((x & 0xf) as i8) << 4) >> 4)),
            DType::U4 => RtTensor::U4(self.cast_array::<i64>().mapv(|x| (x & 0xf) as u8)),
        }
    }

    /// Float view for math: borrowed for f32, converted (once) for every other type.
    pub fn to_f32(&self) -> CowArray<'_, f32, IxDyn> {
        match self {
            RtTensor::F32(a) => CowArray::from(a.view()),
            other => CowArray::from(other.cast_array::<f32>()),
        }
    }

    /// Integer values widened to i64 (shapes, axes, indices); `None` for float tensors.
    pub fn to_i64_vec(&self) -> Option<Vec<i64>> {
        if self.dtype().is_float() {
            return None;
        }
        Some(self.cast_array::<i64>().iter().copied().collect())
    }

    /// Values widened to f64 in row-major order.
    pub fn to_f64_vec(&self) -> Vec<f64> {
        self.cast_array::<f64>().iter().copied().collect()
    }
}

/// f32 to E4M3FN. With `saturate` false, magnitudes that round past 448 (and infinities) become NaN.
pub fn f32_to_f8(x: f32, saturate: bool) -> u8 {
    // 464 is the midpoint between 448 and the first unrepresentable step (480); ties go to 448 (even).
    if !saturate && (x.is_infinite() || x.abs() > 464.0) {
        return if x.is_sign_negative() { 0xff } else { 0x7f };
    }
    f32_to_f8e4m3(x)
}
