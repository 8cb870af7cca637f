//! Constant tensors. Data is a `bytes::Bytes` so that constants imported from a memory-mapped model file are
//! views into the mapping (never copied), while constants created by passes own their buffer.

use crate::DType;
use bytes::Bytes;
use std::fmt;

/// Where a constant's bytes are.
#[derive(Clone, PartialEq, Eq)]
pub enum TensorData {
    /// Little-endian element bytes (sub-byte types packed, low nibble first).
    Bytes(Bytes),
    /// The text format printed only a digest; the data itself is not available (inspection-only graphs).
    Elided { digest: String },
}

#[derive(Clone, PartialEq, Eq)]
pub struct Tensor {
    pub dtype: DType,
    pub dims: Vec<usize>,
    pub data: TensorData,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TensorError {
    #[error("tensor data has {actual} bytes but {dtype}[{dims}] needs {expected}")]
    LengthMismatch { dtype: DType, dims: String, expected: usize, actual: usize },
    #[error("tensor data was elided (digest {0}); the constant's values are not available")]
    Elided(String),
    #[error("tensor of {0} cannot be read as {1}")]
    WrongType(DType, &'static str),
}

/// Plain element types that can be read from and written to tensor bytes.
pub trait Element: bytemuck::Pod + Send {
    const DTYPE: DType;
}

macro_rules! element {
    ($($t:ty => $d:ident),*) => { $(impl Element for $t { const DTYPE: DType = DType::$d; })* };
}
element!(f64 => F64, f32 => F32, half::f16 => F16, half::bf16 => BF16, i64 => I64, i32 => I32,
    i16 => I16, i8 => I8, u64 => U64, u32 => U32, u16 => U16, u8 => U8);

/// Typed values owned by a [`Bytes`] (see [`Tensor::from_vec`]).
struct ElementBytes<T>(Vec<T>);

impl<T: Element> AsRef<[u8]> for ElementBytes<T> {
    fn as_ref(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
}

impl Tensor {
    /// A tensor over existing bytes, checking the length against the shape.
    pub fn from_bytes(dtype: DType, dims: Vec<usize>, data: Bytes) -> Result<Tensor, TensorError> {
        let expected = dtype.storage_bytes(dims.iter().product());
        if data.len() != expected {
            return Err(TensorError::LengthMismatch {
                dtype,
                dims: dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(","),
                expected,
                actual: data.len(),
            });
        }
        Ok(Tensor { dtype, dims, data: TensorData::Bytes(data) })
    }

    /// An owned tensor from typed values.
    pub fn from_slice<T: Element>(dims: Vec<usize>, values: &[T]) -> Tensor {
        assert_eq!(dims.iter().product::<usize>(), values.len(), "shape does not match value count");
        let data = Bytes::copy_from_slice(bytemuck::cast_slice(values));
        Tensor { dtype: T::DTYPE, dims, data: TensorData::Bytes(data) }
    }

    /// An owned tensor taking `values` without copying them.
    pub fn from_vec<T: Element>(dims: Vec<usize>, values: Vec<T>) -> Tensor {
        assert_eq!(dims.iter().product::<usize>(), values.len(), "shape does not match value count");
        Tensor { dtype: T::DTYPE, dims, data: TensorData::Bytes(Bytes::from_owner(ElementBytes(values))) }
    }

    pub fn scalar<T: Element>(value: T) -> Tensor {
        Tensor::from_slice(vec![], &[value])
    }

    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }

    pub fn bytes(&self) -> Result<&Bytes, TensorError> {
        match &self.data {
            TensorData::Bytes(b) => Ok(b),
            TensorData::Elided { digest } => Err(TensorError::Elided(digest.clone())),
        }
    }

    /// Reads the values as `T` (the dtype must match). Handles unaligned views into model files.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>, TensorError> {
        Ok(self.values::<T>()?.into_owned())
    }

    /// The values as `T` (the dtype must match), borrowed when the bytes are aligned for `T` (copied
    /// otherwise, e.g. from an unaligned view into a model file).
    pub fn values<T: Element>(&self) -> Result<std::borrow::Cow<'_, [T]>, TensorError> {
        if self.dtype != T::DTYPE {
            return Err(TensorError::WrongType(self.dtype, std::any::type_name::<T>()));
        }
        let bytes = self.bytes()?;
        Ok(match bytemuck::try_cast_slice::<u8, T>(bytes) {
            Ok(aligned) => std::borrow::Cow::Borrowed(aligned),
            Err(_) => std::borrow::Cow::Owned(
                bytes.chunks_exact(std::mem::size_of::<T>()).map(bytemuck::pod_read_unaligned).collect(),
            ),
        })
    }

    /// Integer values of any integer or bool tensor, widened to i64 (shape arithmetic, indices, axes).
    pub fn to_i64_vec(&self) -> Result<Vec<i64>, TensorError> {
        let b = self.bytes()?;
        let n = self.numel();
        Ok(match self.dtype {
            DType::I64 => self.to_vec::<i64>()?,
            DType::I32 => self.to_vec::<i32>()?.into_iter().map(i64::from).collect(),
            DType::I16 => self.to_vec::<i16>()?.into_iter().map(i64::from).collect(),
            DType::I8 => b.iter().map(|&x| x as i8 as i64).collect(),
            DType::U64 => self.to_vec::<u64>()?.into_iter().map(|x| x as i64).collect(),
            DType::U32 => self.to_vec::<u32>()?.into_iter().map(i64::from).collect(),
            DType::U16 => self.to_vec::<u16>()?.into_iter().map(i64::from).collect(),
            DType::U8 | DType::Bool => b.iter().map(|&x| x as i64).collect(),
            DType::I4 => (0..n).map(|i| sign_extend_nibble(nibble(b, i))).collect(),
            DType::U4 => (0..n).map(|i| nibble(b, i) as i64).collect(),
            d => return Err(TensorError::WrongType(d, "integer")),
        })
    }

    /// Values of a float tensor widened to f64, read straight from the stored values (no f32 copy).
    pub fn to_f64_vec(&self) -> Result<Vec<f64>, TensorError> {
        Ok(match self.dtype {
            DType::F64 => self.to_vec::<f64>()?,
            DType::F32 => self.values::<f32>()?.iter().map(|&v| f64::from(v)).collect(),
            DType::F16 => self.values::<half::f16>()?.iter().map(|v| v.to_f64()).collect(),
            DType::BF16 => self.values::<half::bf16>()?.iter().map(|v| v.to_f64()).collect(),
            _ => self.to_f32_vec()?.into_iter().map(f64::from).collect(),
        })
    }

    /// Values of any float tensor (or integer tensor) converted to f32.
    pub fn to_f32_vec(&self) -> Result<Vec<f32>, TensorError> {
        Ok(match self.dtype {
            DType::F32 => self.to_vec::<f32>()?,
            DType::F64 => self.to_vec::<f64>()?.into_iter().map(|x| x as f32).collect(),
            DType::F16 => self.to_vec::<half::f16>()?.into_iter().map(f32::from).collect(),
            DType::BF16 => self.to_vec::<half::bf16>()?.into_iter().map(f32::from).collect(),
            DType::F8E4M3 => self.bytes()?.iter().map(|&b| f8e4m3_to_f32(b)).collect(),
            _ => self.to_i64_vec()?.into_iter().map(|x| x as f32).collect(),
        })
    }

    /// Short content digest used when the text format elides large constants.
    pub fn digest(&self) -> String {
        match &self.data {
            TensorData::Bytes(b) => blake3::hash(b).to_hex()[..16].to_string(),
            TensorData::Elided { digest } => digest.clone(),
        }
    }
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tensor({}{:?}, {})", self.dtype, self.dims, self.digest())
    }
}

/// The `i`-th 4-bit element of packed storage (low nibble first).
pub fn nibble(bytes: &[u8], i: usize) -> u8 {
    let b = bytes[i / 2];
    if i.is_multiple_of(2) {
        b & 0x0f
    } else {
        b >> 4
    }
}

pub fn sign_extend_nibble(n: u8) -> i64 {
    ((n << 4) as i8 >> 4) as i64
}

/// Packs 4-bit values (taken modulo 16) two per byte, low nibble first.
pub fn pack_nibbles(values: impl IntoIterator<Item = i64>) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, v) in values.into_iter().enumerate() {
        let n = (v & 0x0f) as u8;
        if i % 2 == 0 {
            out.push(n);
        } else {
            *out.last_mut().expect("pushed above") |= n << 4;
        }
    }
    out
}

/// OCP FP8 E4M3 (finite-only, "fn" variant as in ONNX FLOAT8E4M3FN): bias 7, no infinities, 0x7f/0xff NaN.
pub fn f8e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = ((b >> 3) & 0x0f) as i32;
    let man = (b & 0x07) as f32;
    if exp == 0x0f && (b & 0x07) == 0x07 {
        return f32::NAN;
    }
    if exp == 0 {
        sign * man / 8.0 * 2f32.powi(-6)
    } else {
        sign * (1.0 + man / 8.0) * 2f32.powi(exp - 7)
    }
}

/// Round-to-nearest-even conversion to E4M3FN, saturating to +-448 (ONNX's saturate=1 default).
pub fn f32_to_f8e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7f;
    }
    let sign = if x.is_sign_negative() { 0x80u8 } else { 0 };
    let a = x.abs();
    if a >= 448.0 {
        return sign | 0x7e;
    }
    // Exhaustive nearest search over the 127 non-negative finite codes keeps this obviously correct.
    let mut best = 0u8;
    let mut best_err = f32::INFINITY;
    for code in 0u8..0x7f {
        let v = f8e4m3_to_f32(code);
        let err = (v - a).abs();
        if err < best_err || (err == best_err && code % 2 == 0) {
            best = code;
            best_err = err;
        }
    }
    sign | best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nibbles_round_trip() {
        let vals = [-8i64, 7, 0, -1, 3];
        let packed = pack_nibbles(vals);
        assert_eq!(packed.len(), 3);
        let back: Vec<i64> = (0..5).map(|i| sign_extend_nibble(nibble(&packed, i))).collect();
        assert_eq!(back, vals);
    }

    #[test]
    fn f8_known_values() {
        assert_eq!(f8e4m3_to_f32(0x7e), 448.0);
        assert_eq!(f8e4m3_to_f32(0x38), 1.0);
        assert_eq!(f8e4m3_to_f32(0x01), 2f32.powi(-9));
        for code in 0u8..0x7f {
            assert_eq!(f32_to_f8e4m3(f8e4m3_to_f32(code)), code);
        }
        assert_eq!(f32_to_f8e4m3(1000.0), 0x7e);
    }

    #[test]
    fn length_is_checked() {
        let err = Tensor::from_bytes(DType::F32, vec![2, 3], Bytes::from(vec![0u8; 20])).unwrap_err();
        assert!(err.to_string().contains("needs 24"));
    }

    #[test]
    fn unaligned_reads() {
        let mut raw = vec![0u8; 1];
        raw.extend_from_slice(bytemuck::cast_slice(&[1.5f32, -2.0]));
        let b = Bytes::from(raw).slice(1..);
        let t = Tensor::from_bytes(DType::F32, vec![2], b).unwrap();
        assert_eq!(t.to_vec::<f32>().unwrap(), vec![1.5, -2.0]);
    }
}
