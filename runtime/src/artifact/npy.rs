//! Minimal `.npy` (format 1.0/2.0/3.0) reading and writing for the runtime's driver program, so
//! `qcc-run` exchanges tensors with `qcc run` and numpy without the compiler crate. Little-endian,
//! C order; f64, f32, f16, i64, i32, i16, i8, u8 and bool.

use std::path::Path;

use half::f16;
use ndarray::{ArrayD, IxDyn};

use crate::RtTensor;

#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Format { path: String, what: String },
}

fn descr_of(t: &RtTensor) -> Option<&'static str> {
    Some(match t {
        RtTensor::F64(_) => "<f8",
        RtTensor::F32(_) => "<f4",
        RtTensor::F16(_) => "<f2",
        RtTensor::I64(_) => "<i8",
        RtTensor::I32(_) => "<i4",
        RtTensor::I16(_) => "<i2",
        RtTensor::I8(_) | RtTensor::I4(_) => "|i1",
        RtTensor::U8(_) => "|u1",
        RtTensor::Bool(_) => "|b1",
        _ => return None,
    })
}

/// Reads an `.npy` file into a tensor.
pub fn read(path: &Path) -> Result<RtTensor, NpyError> {
    let p = path.display().to_string();
    let bytes = std::fs::read(path).map_err(|source| NpyError::Io { path: p.clone(), source })?;
    parse(&bytes).map_err(|what| NpyError::Format { path: p, what })
}

fn parse(bytes: &[u8]) -> Result<RtTensor, String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("not an .npy file".into());
    }
    let (header_len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize, 12),
        v => return Err(format!("unsupported .npy version {v}")),
    };
    let header = bytes.get(start..start + header_len).ok_or("truncated header")?;
    let header = std::str::from_utf8(header).map_err(|_| "header is not text")?;
    let field = |key: &str| -> Result<&str, String> {
        let at = header.find(&format!("'{key}'")).ok_or(format!("header lacks '{key}'"))?;
        let rest = &header[at + key.len() + 2..];
        Ok(rest.trim_start().trim_start_matches(':').trim_start())
    };
    let descr = field("descr")?;
    let descr = descr.get(1..).and_then(|d| d.split('\'').next()).ok_or("bad descr")?;
    if field("fortran_order")?.starts_with("True") {
        return Err("Fortran-order arrays are not supported".into());
    }
    let shape_text = field("shape")?;
    let shape_text = shape_text.strip_prefix('(').and_then(|s| s.split(')').next()).ok_or("bad shape")?;
    let dims: Vec<usize> = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().map_err(|e| format!("bad shape entry '{s}': {e}")))
        .collect::<Result<_, _>>()?;
    let data = &bytes[start + header_len..];
    let count: usize = dims.iter().product();
    let shape = IxDyn(&dims);
    macro_rules! array {
        ($ty:ty, $n:expr, $conv:expr, $variant:ident) => {{
            let need = count * $n;
            if data.len() < need {
                return Err(format!("{} data bytes, {need} needed", data.len()));
            }
            let values: Vec<$ty> = data[..need].chunks_exact($n).map($conv).collect();
            RtTensor::$variant(ArrayD::from_shape_vec(shape, values).map_err(|e| e.to_string())?)
        }};
    }
    Ok(match descr {
        "<f8" => array!(f64, 8, |c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8])), F64),
        "<f4" => array!(f32, 4, |c| f32::from_le_bytes(c.try_into().unwrap_or([0; 4])), F32),
        "<f2" => array!(f16, 2, |c| f16::from_le_bytes(c.try_into().unwrap_or([0; 2])), F16),
        "<i8" => array!(i64, 8, |c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8])), I64),
        "<i4" => array!(i32, 4, |c| i32::from_le_bytes(c.try_into().unwrap_or([0; 4])), I32),
        "<i2" => array!(i16, 2, |c| i16::from_le_bytes(c.try_into().unwrap_or([0; 2])), I16),
        "|i1" => array!(i8, 1, |c| c[0] as i8, I8),
        "|u1" => array!(u8, 1, |c| c[0], U8),
        "|b1" => array!(bool, 1, |c| c[0] != 0, Bool),
        other => return Err(format!("unsupported dtype '{other}'")),
    })
}

/// Writes a tensor as `.npy` (version 1.0). Types numpy lacks (bf16, f8, int4) are written as f32
/// (int4 as i8).
pub fn write(path: &Path, t: &RtTensor) -> Result<(), NpyError> {
    let converted;
    let t = match descr_of(t) {
        Some(_) => t,
        None => {
            converted = t.cast(qcc_ir::DType::F32);
            &converted
        }
    };
    let descr = descr_of(t).unwrap_or("<f4");
    let shape = t.shape();
    let shape_text = match shape.len() {
        1 => format!("({},)", shape[0]),
        _ => format!("({})", shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape_text}, }}");
    while (10 + header.len() + 1) % 64 != 0 {
        header.push(' ');
    }
    header.push('\n');
    let mut out = b"\x93NUMPY\x01\x00".to_vec();
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    match t {
        RtTensor::I4(a) => out.extend(a.iter().map(|&v| v as u8)),
        RtTensor::Bool(a) => out.extend(a.iter().map(|&v| v as u8)),
        other => {
            let ir = other.to_ir_tensor();
            let bytes =
                ir.bytes().map_err(|e| NpyError::Format { path: path.display().to_string(), what: e.to_string() })?;
            out.extend_from_slice(bytes);
        }
    }
    let p = path.display().to_string();
    let tmp = path.with_extension(format!("npy.tmp{}", std::process::id()));
    std::fs::write(&tmp, &out).map_err(|source| NpyError::Io { path: p.clone(), source })?;
    std::fs::rename(&tmp, path).map_err(|source| NpyError::Io { path: p, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_numpy_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.npy");
        let t = RtTensor::from_vec(&[2, 3], vec![1.5f32, -2.0, 0.25, 8.0, 1e-3, -0.0]).unwrap();
        write(&path, &t).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        // numpy's own header for this array (np.save of float32 (2, 3)).
        let header = std::str::from_utf8(&bytes[10..10 + u16::from_le_bytes([bytes[8], bytes[9]]) as usize]).unwrap();
        assert!(header.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"), "{header}");
        assert_eq!((10 + header.len()) % 64, 0);
        assert_eq!(read(&path).unwrap(), t);
        let ids = RtTensor::from_vec(&[1, 4], vec![504i64, 3575, 282, 4649]).unwrap();
        write(&path, &ids).unwrap();
        assert_eq!(read(&path).unwrap(), ids);
        std::fs::write(&path, b"garbage").unwrap();
        assert!(read(&path).is_err());
    }
}
