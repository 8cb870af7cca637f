//! `TensorProto` -> [`qcc_ir::Tensor`].
//!
//! `raw_data` and external data become zero-copy slices of the mapped model (or data) file; the typed
//! repeated fields (`float_data`, `int32_data`, ...) are converted to owned little-endian bytes following the
//! spec's packing rules. Every length is checked against the shape, and errors name the tensor.

use super::proto::{data_location, data_type, TensorProto};
use bytes::Bytes;
use memmap2::Mmap;
use qcc_ir::{DType, Tensor};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Component, Path, PathBuf};

/// Why a tensor could not be loaded (the caller adds the model path and the tensor's role).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TensorProblem {
    /// An element type qcc has no `DType` for (strings, complex, other float8 variants, ...).
    UnsupportedDType(i32),
    /// Anything else, described for the user.
    Invalid(String),
}

/// The IR element type of an ONNX data type id, if qcc supports it (the table lives in qcc-ir).
pub fn dtype_from_onnx(id: i32) -> Option<DType> {
    qcc_ir::infer::onnx_dtype(id as i64)
}

/// The ONNX data type id of an IR element type.
pub fn dtype_to_onnx(dtype: DType) -> i32 {
    use data_type as t;
    match dtype {
        DType::F64 => t::DOUBLE,
        DType::F32 => t::FLOAT,
        DType::F16 => t::FLOAT16,
        DType::BF16 => t::BFLOAT16,
        DType::F8E4M3 => t::FLOAT8E4M3FN,
        DType::I64 => t::INT64,
        DType::I32 => t::INT32,
        DType::I16 => t::INT16,
        DType::I8 => t::INT8,
        DType::U64 => t::UINT64,
        DType::U32 => t::UINT32,
        DType::U16 => t::UINT16,
        DType::U8 => t::UINT8,
        DType::I4 => t::INT4,
        DType::U4 => t::UINT4,
        DType::Bool => t::BOOL,
    }
}

/// Memory maps of external data files, each mapped once and shared by every tensor that points into it.
pub(crate) struct ExternalData {
    base_dir: Option<PathBuf>,
    mapped: HashMap<PathBuf, Bytes>,
}

impl ExternalData {
    /// `base_dir` is the model file's folder; `None` (an in-memory model) makes external data an error.
    pub fn new(base_dir: Option<PathBuf>) -> ExternalData {
        ExternalData { base_dir, mapped: HashMap::new() }
    }

    fn file(&mut self, location: &str) -> Result<(PathBuf, Bytes), TensorProblem> {
        let Some(base) = &self.base_dir else {
            return Err(TensorProblem::Invalid(format!(
                "uses external data file '{location}' but the model was loaded from memory (no folder to resolve it in)"
            )));
        };
        // The spec resolves locations relative to the model's folder; refusing absolute paths and `..`
        // keeps a model from reading arbitrary files.
        let relative = Path::new(location);
        if location.is_empty() || relative.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
        {
            return Err(TensorProblem::Invalid(format!(
                "external data location '{location}' must be a relative path inside the model's folder"
            )));
        }
        let path = base.join(relative);
        if let Some(bytes) = self.mapped.get(&path) {
            return Ok((path, bytes.clone()));
        }
        let bytes = map_file(&path)
            .map_err(|e| TensorProblem::Invalid(format!("cannot read external data file '{}': {e}", path.display())))?;
        self.mapped.insert(path.clone(), bytes.clone());
        Ok((path, bytes))
    }
}

impl TensorProblem {
    /// The user-facing error for this problem with tensor `tensor` (e.g. "initializer 'w'") of model `path`.
    pub(crate) fn at(self, path: String, tensor: String) -> super::ImportError {
        match self {
            TensorProblem::UnsupportedDType(dtype) => super::ImportError::UnsupportedDType {
                path,
                tensor,
                dtype,
                dtype_name: super::proto::data_type::name(dtype),
            },
            TensorProblem::Invalid(message) => super::ImportError::InvalidTensor { path, tensor, message },
        }
    }
}

/// Maps a whole file read-only; the `Bytes` owns the mapping.
pub(crate) fn map_file(path: &Path) -> std::io::Result<Bytes> {
    let file = File::open(path)?;
    if file.metadata()?.len() == 0 {
        // mmap of an empty file fails on Linux; an empty buffer is the same thing.
        return Ok(Bytes::new());
    }
    // SAFETY: the mapping is read-only and private to this process. Like every memory-mapped reader
    // (onnxruntime, safetensors) we rely on the file not being truncated or rewritten while the model is
    // loaded; that is documented on `import_model`.
    let mmap = unsafe { Mmap::map(&file)? };
    Ok(Bytes::from_owner(mmap))
}

/// Shape of a `TensorProto`, checked to be non-negative and small enough to count.
fn dims_of(t: &TensorProto) -> Result<(Vec<usize>, usize), TensorProblem> {
    let mut dims = Vec::with_capacity(t.dims.len());
    let mut numel: usize = 1;
    for &d in &t.dims {
        let d = usize::try_from(d).map_err(|_| TensorProblem::Invalid(format!("has negative dimension {d}")))?;
        numel = numel
            .checked_mul(d)
            .filter(|&n| n <= isize::MAX as usize / 8)
            .ok_or_else(|| TensorProblem::Invalid(format!("shape {:?} is too large", t.dims)))?;
        dims.push(d);
    }
    Ok((dims, numel))
}

/// Loads a tensor's data. `external` resolves `data_location = EXTERNAL`.
pub(crate) fn load_tensor(t: &TensorProto, external: &mut ExternalData) -> Result<Tensor, TensorProblem> {
    let dtype = dtype_from_onnx(t.data_type).ok_or(TensorProblem::UnsupportedDType(t.data_type))?;
    if t.segment.is_some() {
        return Err(TensorProblem::Invalid("is segmented (TensorProto.segment), which is not supported".into()));
    }
    let (dims, numel) = dims_of(t)?;
    let expected = dtype.storage_bytes(numel);
    let data = if t.data_location == data_location::EXTERNAL {
        external_bytes(t, external)?
    } else if !t.raw_data.is_empty() {
        t.raw_data.clone()
    } else {
        typed_field_bytes(t, dtype, numel)?
    };
    if data.len() != expected {
        return Err(TensorProblem::Invalid(format!(
            "has {} bytes of data but {dtype}[{}] needs {expected}",
            data.len(),
            dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(",")
        )));
    }
    Tensor::from_bytes(dtype, dims, data).map_err(|e| TensorProblem::Invalid(e.to_string()))
}

fn external_bytes(t: &TensorProto, external: &mut ExternalData) -> Result<Bytes, TensorProblem> {
    let mut location = None;
    let mut offset: u64 = 0;
    let mut length: Option<u64> = None;
    for entry in &t.external_data {
        let parse = |what: &str| {
            entry.value.trim().parse::<u64>().map_err(|_| {
                TensorProblem::Invalid(format!("external data {what} '{}' is not a non-negative integer", entry.value))
            })
        };
        match entry.key.as_str() {
            "location" => location = Some(entry.value.as_str()),
            "offset" => offset = parse("offset")?,
            "length" => length = Some(parse("length")?),
            _ => {} // checksum and unknown keys carry no layout information
        }
    }
    let location =
        location.ok_or_else(|| TensorProblem::Invalid("has data_location EXTERNAL but no 'location' entry".into()))?;
    let (path, file) = external.file(location)?;
    let file_len = file.len() as u64;
    let end = match length {
        Some(len) => offset.checked_add(len),
        None => Some(file_len),
    };
    match end {
        Some(end) if offset <= end && end <= file_len => Ok(file.slice(offset as usize..end as usize)),
        _ => Err(TensorProblem::Invalid(format!(
            "external data range offset {offset} length {} lies past the end of '{}' ({file_len} bytes)",
            length.map_or("(to end)".to_string(), |l| l.to_string()),
            path.display()
        ))),
    }
}

/// Owned little-endian bytes from the typed repeated fields.
fn typed_field_bytes(t: &TensorProto, dtype: DType, numel: usize) -> Result<Bytes, TensorProblem> {
    fn check(field: &str, have: usize, want: usize) -> Result<(), TensorProblem> {
        if have == want {
            Ok(())
        } else {
            Err(TensorProblem::Invalid(format!("has {have} values in {field} but its shape needs {want}")))
        }
    }
    let mut out = Vec::with_capacity(dtype.storage_bytes(numel));
    match dtype {
        DType::F32 => {
            check("float_data", t.float_data.len(), numel)?;
            t.float_data.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        }
        DType::F64 => {
            check("double_data", t.double_data.len(), numel)?;
            t.double_data.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        }
        DType::I64 => {
            check("int64_data", t.int64_data.len(), numel)?;
            t.int64_data.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes()));
        }
        DType::U64 | DType::U32 => {
            check("uint64_data", t.uint64_data.len(), numel)?;
            for &v in &t.uint64_data {
                if dtype == DType::U32 {
                    out.extend_from_slice(&(v as u32).to_le_bytes());
                } else {
                    out.extend_from_slice(&v.to_le_bytes());
                }
            }
        }
        DType::I4 | DType::U4 => {
            // Each int32 holds one byte of two packed nibbles, low nibble first.
            check("int32_data", t.int32_data.len(), numel.div_ceil(2))?;
            out.extend(t.int32_data.iter().map(|&v| v as u8));
        }
        DType::I32
        | DType::I16
        | DType::U16
        | DType::F16
        | DType::BF16
        | DType::I8
        | DType::U8
        | DType::Bool
        | DType::F8E4M3 => {
            // One element per int32 (16-bit floats as their bit patterns), truncated to the element's width.
            check("int32_data", t.int32_data.len(), numel)?;
            let width = dtype.bits() / 8;
            for &v in &t.int32_data {
                out.extend_from_slice(&v.to_le_bytes()[..width]);
            }
        }
    }
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(data_type: i32, dims: &[i64]) -> TensorProto {
        TensorProto { data_type, dims: dims.to_vec(), name: "t".into(), ..Default::default() }
    }

    #[test]
    fn typed_fields_follow_the_spec_packing() {
        let mut no_files = ExternalData::new(None);
        let mut t = tensor(data_type::FLOAT16, &[2]);
        // 1.0 and -2.0 as f16 bit patterns.
        t.int32_data = vec![0x3c00, 0xc000];
        let loaded = load_tensor(&t, &mut no_files).unwrap();
        assert_eq!(loaded.to_f32_vec().unwrap(), vec![1.0, -2.0]);

        let mut t = tensor(data_type::INT4, &[3]);
        // -1, 7 in the first byte (low nibble first), 3 alone in the second.
        t.int32_data = vec![0x7f, 0x03];
        assert_eq!(load_tensor(&t, &mut no_files).unwrap().to_i64_vec().unwrap(), vec![-1, 7, 3]);

        let mut t = tensor(data_type::UINT32, &[2]);
        t.uint64_data = vec![7, u32::MAX as u64];
        assert_eq!(load_tensor(&t, &mut no_files).unwrap().to_vec::<u32>().unwrap(), vec![7, u32::MAX]);

        let mut t = tensor(data_type::BOOL, &[3]);
        t.int32_data = vec![1, 0, 1];
        assert_eq!(load_tensor(&t, &mut no_files).unwrap().to_i64_vec().unwrap(), vec![1, 0, 1]);
    }

    #[test]
    fn wrong_counts_and_types_are_errors() {
        let mut no_files = ExternalData::new(None);
        let mut t = tensor(data_type::FLOAT, &[2, 2]);
        t.float_data = vec![1.0; 3];
        let err = load_tensor(&t, &mut no_files).unwrap_err();
        assert_eq!(err, TensorProblem::Invalid("has 3 values in float_data but its shape needs 4".into()));
        let t = tensor(data_type::STRING, &[1]);
        assert_eq!(load_tensor(&t, &mut no_files).unwrap_err(), TensorProblem::UnsupportedDType(8));
        let t = tensor(data_type::FLOAT, &[-1]);
        assert!(
            matches!(load_tensor(&t, &mut no_files).unwrap_err(), TensorProblem::Invalid(m) if m.contains("negative"))
        );
        let t = tensor(data_type::FLOAT, &[i64::MAX, i64::MAX]);
        assert!(
            matches!(load_tensor(&t, &mut no_files).unwrap_err(), TensorProblem::Invalid(m) if m.contains("too large"))
        );
    }

    #[test]
    fn dtype_ids_round_trip() {
        for d in DType::ALL {
            assert_eq!(dtype_from_onnx(dtype_to_onnx(d)), Some(d));
        }
        assert_eq!(dtype_to_onnx(DType::F8E4M3), 17);
        assert_eq!(dtype_to_onnx(DType::U4), 21);
        assert_eq!(dtype_to_onnx(DType::I4), 22);
    }
}
