//! `.npy` files in and out of the CPU executor (`qcc run --input NAME=FILE.npy --output-dir DIR`).

use anyhow::{anyhow, bail, Context, Result};
use npyz::WriterBuilder;
use qcc_ir::DType;
use qcc_runtime::RtTensor;
use std::path::Path;

/// Reads a C-order little-endian `.npy` file into a runtime tensor of the matching dtype.
pub fn read(path: &Path) -> Result<RtTensor> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let npy = npyz::NpyFile::new(&bytes[..]).map_err(|e| anyhow!("{}: not a valid .npy file: {e}", path.display()))?;
    if npy.order() != npyz::Order::C {
        bail!("{}: Fortran-order arrays are not supported; save with np.ascontiguousarray", path.display());
    }
    let shape: Vec<usize> = npy.shape().iter().map(|&d| d as usize).collect();
    let descr = npy.dtype().descr();
    let bad = |e: std::io::Error| anyhow!("{}: {e}", path.display());
    macro_rules! load {
        ($t:ty) => {
            RtTensor::from_vec(&shape, npy.into_vec::<$t>().map_err(bad)?)
        };
    }
    let tensor = match descr.trim_matches('\'') {
        "<f8" => load!(f64),
        "<f4" => load!(f32),
        "<f2" => load!(half::f16),
        "<i8" => load!(i64),
        "<i4" => load!(i32),
        "<i2" => load!(i16),
        "|i1" => load!(i8),
        "<u8" => load!(u64),
        "<u4" => load!(u32),
        "<u2" => load!(u16),
        "|u1" => load!(u8),
        "|b1" => load!(bool),
        other => bail!("{}: dtype {other} is not supported", path.display()),
    };
    tensor.ok_or_else(|| anyhow!("{}: data length disagrees with shape {shape:?}", path.display()))
}

/// Writes a tensor as `.npy` through a temporary file, renamed into place when complete.
pub fn write(path: &Path, t: &RtTensor) -> Result<()> {
    let tmp = path.with_extension("npy.tmp");
    let result = write_to(&tmp, t)
        .and_then(|()| std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display())));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn write_to(path: &Path, t: &RtTensor) -> Result<()> {
    let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    let shape: Vec<u64> = t.shape().iter().map(|&d| d as u64).collect();
    macro_rules! save {
        ($a:expr) => {{
            let mut w = npyz::WriteOptions::new().default_dtype().shape(&shape).writer(&mut out).begin_nd()?;
            w.extend($a.iter().copied())?;
            w.finish()?;
        }};
    }
    match t {
        RtTensor::F64(a) => save!(a),
        RtTensor::F32(a) => save!(a),
        RtTensor::F16(a) => save!(a),
        RtTensor::I64(a) => save!(a),
        RtTensor::I32(a) => save!(a),
        RtTensor::I16(a) => save!(a),
        RtTensor::I8(a) | RtTensor::I4(a) => save!(a),
        RtTensor::U64(a) => save!(a),
        RtTensor::U32(a) => save!(a),
        RtTensor::U16(a) => save!(a),
        RtTensor::U8(a) | RtTensor::U4(a) => save!(a),
        RtTensor::Bool(a) => save!(a),
        other => {
            // numpy has no bf16 or fp8: widen to f32 so the values are still readable.
            let f = other.cast(DType::F32);
            return write_to(path, &f);
        }
    }
    std::io::Write::flush(&mut out).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// A file name for a graph output: ONNX names may contain '/' or ':'.
pub fn file_stem_for(name: &str) -> String {
    name.chars().map(|c| if c.is_ascii_alphanumeric() || "._-".contains(c) { c } else { '_' }).collect()
}
