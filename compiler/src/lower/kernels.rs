//! MLIR text of the generated kernels: one `gpu.func` per distinct kernel, written at the
//! gpu/scf/arith/memref level with the thread mapping explicit, so that the launch geometry and the
//! argument order are known here and go straight into the manifest.
//!
//! Every generator returns a [`Kernel`]: the function text (named `@__NAME__` until the module
//! deduplicates identical kernels and names them), and the manifest arguments, grid and block of the
//! call it was generated for, in the same order as the function's parameters (the ABI of
//! `crate::lower`: buffer pointers, then i64 sizes, then f32 scalars).
//!
//! Buffers are `memref<2^40 x T>` with a static extent: the bare-pointer calling convention (one
//! pointer per memref) only exists for static shapes. The extent is a bound, not the size; every
//! access is guarded by the i64 sizes passed at launch.
//!
//! Numerics follow the CPU executor (runtime/src/cpu/ops) operation by operation, in f32 unless the
//! CPU uses f64 (the RMS of `rms_norm`, summed sequentially in f64 exactly as the CPU does), with no
//! fused multiply-adds (MLIR's arith ops carry no `contract` flag, so NVPTX emits separate mul/add).
//! Output quantization: q = clamp(roundeven(y / step), lo, hi), rows at position (index along the
//! second-to-last axis) < prefix_tokens clamped to the `prefix_to` range. The only operation that is
//! not bit-exact against the CPU is `exp` (swiglu), computed as `ex2.approx(x * log2 e)`.

use qcc_ir::DType;
use qcc_runtime::artifact::{Arg, DimExpr};
use std::fmt::Write;

/// Static extent of every buffer memref (see the module header).
pub const MAX_ELEMENTS: u64 = 1 << 40;
/// Threads per block of the element-wise kernels.
pub const POINTWISE_BLOCK: u32 = 256;
/// Rows per block of the row kernels (one warp per row, or per row share for `rms_norm`).
pub const ROWS_PER_BLOCK: u32 = 4;
/// `rms_norm` splits each row's outputs over up to ROW_SPLIT / (rows + 1) blocks (grid y): a decode
/// row's second pass was one warp issuing ~30 instructions per element.
pub const ROW_SPLIT: i64 = 16;
/// Elements per lane per round of `rms_norm`'s second pass (x, gamma and beta loads in flight).
const PASS2_UNROLL: u64 = 16;
/// Placeholder for a kernel's name until the module names it.
pub const NAME_PLACEHOLDER: &str = "__NAME__";

/// One generated kernel call.
#[derive(Clone, Debug)]
pub struct Kernel {
    /// Descriptive base of the entry name (`rms_norm_f32_i16`, ...).
    pub base: String,
    /// The `gpu.func` text, named [`NAME_PLACEHOLDER`].
    pub text: String,
    pub args: Vec<Arg>,
    pub grid: [DimExpr; 3],
    pub block: [u32; 3],
}

/// MLIR element type that stores `dtype` in a buffer. int4 activations are stored one per byte
/// (sign-extended) in generated buffers; packed int4 exists only in weights.
pub fn storage_type(dtype: DType) -> Option<&'static str> {
    Some(match dtype {
        DType::F64 => "f64",
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::I64 | DType::U64 => "i64",
        DType::I32 | DType::U32 => "i32",
        DType::I16 | DType::U16 => "i16",
        DType::I8 | DType::U8 | DType::I4 | DType::Bool => "i8",
        DType::U4 | DType::F8E4M3 => return None,
    })
}

/// Bytes per element of a generated buffer of `dtype` (int4 takes a byte).
pub fn storage_bytes(dtype: DType) -> u64 {
    match dtype {
        DType::I4 | DType::U4 => 1,
        d => (d.bits() / 8) as u64,
    }
}

fn memref(ty: &str) -> String {
    format!("memref<{MAX_ELEMENTS}x{ty}>")
}

/// A function body under construction: numbered SSA values, one op per line.
struct Body {
    text: String,
    next: usize,
    indent: usize,
}

impl Body {
    fn new() -> Body {
        Body { text: String::new(), next: 0, indent: 3 }
    }

    fn line(&mut self, s: &str) {
        let _ = writeln!(self.text, "{}{s}", "  ".repeat(self.indent));
    }

    /// Emits `%vN = rhs` and returns `%vN`.
    fn v(&mut self, rhs: &str) -> String {
        let name = format!("%v{}", self.next);
        self.next += 1;
        self.line(&format!("{name} = {rhs}"));
        name
    }

    fn index(&mut self, c: i64) -> String {
        self.v(&format!("arith.constant {c} : index"))
    }

    fn f32(&mut self, x: f32) -> String {
        self.v(&format!("arith.constant 0x{:08X} : f32", x.to_bits()))
    }

    fn f64(&mut self, x: f64) -> String {
        self.v(&format!("arith.constant 0x{:016X} : f64", x.to_bits()))
    }

    fn arg_index(&mut self, arg: &str) -> String {
        self.v(&format!("arith.index_cast {arg} : i64 to index"))
    }

    fn binop(&mut self, op: &str, a: &str, b: &str, ty: &str) -> String {
        self.v(&format!("arith.{op} {a}, {b} : {ty}"))
    }

    fn load(&mut self, mem: &str, ty: &str, idx: &str) -> String {
        self.v(&format!("memref.load {mem}[{idx}] : {}", memref(ty)))
    }

    fn store(&mut self, value: &str, mem: &str, ty: &str, idx: &str) {
        self.line(&format!("memref.store {value}, {mem}[{idx}] : {}", memref(ty)));
    }

    fn intrinsic(&mut self, name: &str, x: &str, ty: &str) -> String {
        self.v(&format!("llvm.call_intrinsic \"{name}\"({x}) : ({ty}) -> {ty}"))
    }

    /// A stored element as f32.
    fn widen_to_f32(&mut self, x: &str, ty: &str) -> String {
        match ty {
            "f32" => x.to_string(),
            "f16" | "bf16" => self.v(&format!("arith.extf {x} : {ty} to f32")),
            "f64" => self.v(&format!("arith.truncf {x} : f64 to f32")),
            _ => self.v(&format!("arith.sitofp {x} : {ty} to f32")),
        }
    }

    /// An f32 as a stored float element.
    fn narrow_from_f32(&mut self, x: &str, ty: &str) -> String {
        match ty {
            "f32" => x.to_string(),
            "f64" => self.v(&format!("arith.extf {x} : f32 to f64")),
            _ => self.v(&format!("arith.truncf {x} : f32 to {ty}")),
        }
    }

    /// Linear thread index over the grid's x dimension.
    fn global_index(&mut self) -> String {
        let bid = self.v("gpu.block_id x");
        let bdim = self.v("gpu.block_dim x");
        let tid = self.v("gpu.thread_id x");
        let base = self.binop("muli", &bid, &bdim, "index");
        self.binop("addi", &base, &tid, "index")
    }

    fn open(&mut self, header: &str) {
        self.line(&format!("{header} {{"));
        self.indent += 1;
    }

    fn close(&mut self, footer: &str) {
        self.indent -= 1;
        self.line(&format!("}}{footer}"));
    }
}

/// How an output quantization gets its step.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// No step attribute: y is rounded as is.
    None,
    /// One step for the whole tensor (an f32 argument).
    Scalar(f32),
    /// One step per channel of the last axis (an f32 buffer).
    PerChannel(u32),
    /// One step per (axis 1, last axis) pair, element (c0, c1, c2, c3) reading step[c1 * d3 + c3]:
    /// an attention output [B, H, S, D] with steps per head and channel (an f32 buffer of H * D;
    /// element-wise kernels only).
    PerHeadChannel(u32),
}

/// Output quantization of a generated kernel (`qcc_ir::OutputQuant`).
#[derive(Clone, Debug, PartialEq)]
pub struct Quant {
    pub to: DType,
    pub prefix_tokens: usize,
    pub prefix_to: DType,
    /// Positions before the chunk (a KV cache's past length), added to row positions: `%past`.
    pub prefix_offset: Option<DimExpr>,
    pub step: Step,
}

impl Quant {
    pub fn output_dtype(&self) -> DType {
        if self.prefix_tokens > 0 {
            self.prefix_to
        } else {
            self.to
        }
    }

    fn key(&self) -> String {
        let step = match self.step {
            Step::None => "",
            Step::Scalar(_) => "s",
            Step::PerChannel(_) => "c",
            Step::PerHeadChannel(_) => "h",
        };
        format!("q{}{step}", self.to)
    }

    /// Kernel name suffix of the prefix rule.
    fn prefix_key(&self) -> String {
        match (self.prefix_tokens, &self.prefix_offset) {
            (0, _) => String::new(),
            (p, None) => format!("_p{p}"),
            (p, Some(_)) => format!("_p{p}o"),
        }
    }

    /// The `%past: i64` parameter, after the others, when positions are offset.
    fn push_offset_param(&self, params: &mut Vec<String>, args: &mut Vec<Arg>) {
        if let (true, Some(past)) = (self.prefix_tokens > 0, &self.prefix_offset) {
            params.push("%past: i64".into());
            args.push(Arg::I64(past.clone()));
        }
    }
}

/// Emits the quantization of `y` (f32) for channel `channel` at position `pos` (both index values);
/// `step` is the step parameter's SSA name. Returns the integer in storage type `ty`.
fn emit_quant(b: &mut Body, y: &str, channel: &str, pos: &str, q: &Quant, step: &str, ty: &str) -> String {
    let scaled = match q.step {
        Step::None => y.to_string(),
        Step::Scalar(_) => b.binop("divf", y, step, "f32"),
        Step::PerChannel(_) | Step::PerHeadChannel(_) => {
            let s = b.load(step, "f32", channel);
            b.binop("divf", y, &s, "f32")
        }
    };
    let rounded = b.intrinsic("llvm.roundeven.f32", &scaled, "f32");
    let (lo, hi) = q.to.int_range().unwrap_or((0, 0));
    let (mut lo, mut hi) = (b.f32(lo as f32), b.f32(hi as f32));
    if q.prefix_tokens > 0 {
        let (plo, phi) = q.prefix_to.int_range().unwrap_or((0, 0));
        let (plo, phi) = (b.f32(plo as f32), b.f32(phi as f32));
        let p = b.index(q.prefix_tokens as i64);
        let pos = match q.prefix_offset {
            Some(_) => {
                let past = b.arg_index("%past");
                b.binop("addi", pos, &past, "index")
            }
            None => pos.to_string(),
        };
        let is_prefix = b.v(&format!("arith.cmpi ult, {pos}, {p} : index"));
        lo = b.v(&format!("arith.select {is_prefix}, {plo}, {lo} : f32"));
        hi = b.v(&format!("arith.select {is_prefix}, {phi}, {hi} : f32"));
    }
    let clamped = b.binop("maximumf", &rounded, &lo, "f32");
    let clamped = b.binop("minimumf", &clamped, &hi, "f32");
    b.v(&format!("arith.fptosi {clamped} : f32 to {ty}"))
}

/// A buffer read or written with element strides over the 4-D iteration space.
#[derive(Clone, Debug)]
pub struct Strided {
    pub buffer: u32,
    pub dtype: DType,
    pub strides: [DimExpr; 4],
    /// Element offset of the view's first element in the buffer (concat writes, slices).
    pub offset: DimExpr,
}

/// The element-wise kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PointwiseOp {
    Add,
    Sub,
    Mul,
    Div,
    /// gate * sigmoid(gate) * up, as the CPU computes it: g / (1 + exp(-g)) * u.
    Swiglu,
    /// x * cos + rotate_half(x) * sin (inputs x, cos, sin).
    Rotary,
    /// A copy (materialises a strided view), a float conversion, or with a quantization the
    /// epilogue of a micro-kernel's float result.
    Identity,
    Neg,
    Exp,
    Sqrt,
    Reciprocal,
    Relu,
    /// 1 / (1 + exp(-x)) for x >= 0, exp(x) / (1 + exp(x)) otherwise (the CPU's two branches).
    Sigmoid,
}

impl PointwiseOp {
    fn name(self) -> &'static str {
        match self {
            PointwiseOp::Add => "add",
            PointwiseOp::Sub => "sub",
            PointwiseOp::Mul => "mul",
            PointwiseOp::Div => "div",
            PointwiseOp::Swiglu => "swiglu",
            PointwiseOp::Rotary => "rotary",
            PointwiseOp::Identity => "copy",
            PointwiseOp::Neg => "neg",
            PointwiseOp::Exp => "exp",
            PointwiseOp::Sqrt => "sqrt",
            PointwiseOp::Reciprocal => "reciprocal",
            PointwiseOp::Relu => "relu",
            PointwiseOp::Sigmoid => "sigmoid",
        }
    }

    pub fn arity(self) -> usize {
        match self {
            PointwiseOp::Identity
            | PointwiseOp::Neg
            | PointwiseOp::Exp
            | PointwiseOp::Sqrt
            | PointwiseOp::Reciprocal
            | PointwiseOp::Relu
            | PointwiseOp::Sigmoid => 1,
            PointwiseOp::Rotary => 3,
            _ => 2,
        }
    }
}

/// The size parameters of an element-wise kernel over `dims` with operands `strided` (out first):
/// `%total`, `%d{i}`, and per operand its strides `%s{t}_{i}` and element offset `%o{t}`. Sizes known
/// at compile time become constants of the kernel (cheaper index math, fewer arguments), returned as
/// the body's first lines; the others are i64 parameters.
fn size_params(dims: &[DimExpr; 4], strided: &[&Strided], params: &mut Vec<String>, args: &mut Vec<Arg>) -> String {
    let mut consts = Body::new();
    let mut size = |name: String, value: &DimExpr| match value {
        DimExpr::Const(c) => consts.line(&format!("%{name} = arith.constant {c} : i64")),
        _ => {
            params.push(format!("%{name}: i64"));
            args.push(Arg::I64(value.clone()));
        }
    };
    size("total".into(), &super::shapes::product(dims));
    for (i, d) in dims.iter().enumerate() {
        size(format!("d{i}"), d);
    }
    for (t, s) in strided.iter().enumerate() {
        for (i, stride) in s.strides.iter().enumerate() {
            size(format!("s{t}_{i}"), stride);
        }
        size(format!("o{t}"), &s.offset);
    }
    consts.text
}

/// Opens the body of an element-wise kernel at element `i` (one per thread, `if i < total`) and
/// returns its coordinates c0..c3 (row-major over d0..d3) and d0..d3 as index values.
fn open_elementwise(b: &mut Body) -> ([String; 4], Vec<String>) {
    let i = b.global_index();
    let n = b.arg_index("%total");
    let inside = b.v(&format!("arith.cmpi ult, {i}, {n} : index"));
    b.open(&format!("scf.if {inside}"));
    let d: Vec<String> = (0..4).map(|k| b.arg_index(&format!("%d{k}"))).collect();
    let c3 = b.binop("remui", &i, &d[3], "index");
    let t = b.binop("divui", &i, &d[3], "index");
    let c2 = b.binop("remui", &t, &d[2], "index");
    let t = b.binop("divui", &t, &d[2], "index");
    let c1 = b.binop("remui", &t, &d[1], "index");
    let c0 = b.binop("divui", &t, &d[1], "index");
    ([c0, c1, c2, c3], d)
}

/// Element offset of operand `t` (0 = out) at `coords`.
fn operand_offset(b: &mut Body, t: usize, coords: &[String; 4]) -> String {
    let mut acc = b.arg_index(&format!("%o{t}"));
    for (k, c) in coords.iter().enumerate() {
        let s = b.arg_index(&format!("%s{t}_{k}"));
        let term = b.binop("muli", c, &s, "index");
        acc = b.binop("addi", &acc, &term, "index");
    }
    acc
}

/// Bytes moved per thread by a vectorised copy or float conversion.
const VECTOR_BYTES: u64 = 16;

/// `Identity` without a quantization (a copy or a float conversion) as a kernel that moves up to
/// [`VECTOR_BYTES`] per thread: the one-element kernel spends ~30 integer instructions of index math
/// per element, which made a decode step's KV-cache copies (millions of elements) issue-bound.
/// Applies when every operand's innermost stride is 1 and its other strides, its offset and the
/// innermost dim are provable multiples of the lane count, so that each vector is one aligned access
/// (arena buffers start at 256-byte boundaries). Same values as the one-element kernel: a copy moves
/// bits, a conversion rounds each lane alike.
fn vector_convert(op: PointwiseOp, out: &Strided, inputs: &[Strided], dims: &[DimExpr; 4]) -> Option<Kernel> {
    let [input] = inputs else { return None };
    if op != PointwiseOp::Identity {
        return None;
    }
    let (in_ty, out_ty) = (storage_type(input.dtype)?, storage_type(out.dtype)?);
    let float = |t: &str| matches!(t, "f32" | "f16" | "bf16");
    if in_ty != out_ty && !(float(in_ty) && float(out_ty)) {
        return None;
    }
    let lanes = (VECTOR_BYTES / storage_bytes(input.dtype).max(storage_bytes(out.dtype))) as i64;
    if lanes < 2 {
        return None;
    }
    let scaled = |s: &Strided| -> Option<Strided> {
        if s.strides[3] != DimExpr::Const(1) {
            return None;
        }
        let [s0, s1, s2, _] = &s.strides;
        Some(Strided {
            strides: [
                super::shapes::exact_div(s0, lanes)?,
                super::shapes::exact_div(s1, lanes)?,
                super::shapes::exact_div(s2, lanes)?,
                DimExpr::Const(1),
            ],
            offset: super::shapes::exact_div(&s.offset, lanes)?,
            ..s.clone()
        })
    };
    let (vout, vin) = (scaled(out)?, scaled(input)?);
    let vdims = [dims[0].clone(), dims[1].clone(), dims[2].clone(), super::shapes::exact_div(&dims[3], lanes)?];
    let (vin_ty, vout_ty) = (format!("vector<{lanes}x{in_ty}>"), format!("vector<{lanes}x{out_ty}>"));
    let mut params = vec![format!("%out: {}", memref(&vout_ty)), format!("%in0: {}", memref(&vin_ty))];
    let mut args = vec![Arg::Buffer(out.buffer), Arg::Buffer(input.buffer)];
    let mut b = Body::new();
    b.text = size_params(&vdims, &[&vout, &vin], &mut params, &mut args);
    let (coords, _) = open_elementwise(&mut b);
    let from = operand_offset(&mut b, 1, &coords);
    let to = operand_offset(&mut b, 0, &coords);
    let mut y = b.load("%in0", &vin_ty, &from);
    if in_ty != out_ty {
        let wide = format!("vector<{lanes}xf32>");
        if in_ty != "f32" {
            y = b.v(&format!("arith.extf {y} : {vin_ty} to {wide}"));
        }
        if out_ty != "f32" {
            y = b.v(&format!("arith.truncf {y} : {wide} to {vout_ty}"));
        }
    }
    b.store(&y, "%out", &vout_ty, &to);
    b.close("");
    Some(Kernel {
        base: format!("copy{lanes}_{}_{}", input.dtype, out.dtype),
        text: function(&params, &b.text),
        args,
        grid: [
            super::shapes::ceil_div(&super::shapes::product(&vdims), POINTWISE_BLOCK as i64),
            DimExpr::Const(1),
            DimExpr::Const(1),
        ],
        block: [POINTWISE_BLOCK, 1, 1],
    })
}

/// An element-wise kernel over a 4-D iteration space `dims` (leading dims padded with 1).
/// Parameters: out, inputs..., [per-channel step]; total, d0..d3, then per operand (out first) its
/// four strides and its element offset, each only when not a compile-time constant (constants are
/// baked into the kernel); [scalar step]. One thread per element, [`POINTWISE_BLOCK`] threads per
/// block.
pub fn pointwise(
    op: PointwiseOp,
    out: &Strided,
    inputs: &[Strided],
    dims: &[DimExpr; 4],
    quant: Option<&Quant>,
) -> Option<Kernel> {
    if quant.is_none() {
        if let Some(k) = vector_convert(op, out, inputs, dims) {
            return Some(k);
        }
    }
    let out_ty = storage_type(out.dtype)?;
    let in_tys: Vec<&str> = inputs.iter().map(|i| storage_type(i.dtype)).collect::<Option<_>>()?;
    let mut params = vec![format!("%out: {}", memref(out_ty))];
    let mut args = vec![Arg::Buffer(out.buffer)];
    for (i, (input, ty)) in inputs.iter().zip(&in_tys).enumerate() {
        params.push(format!("%in{i}: {}", memref(ty)));
        args.push(Arg::Buffer(input.buffer));
    }
    if let Some(Quant { step: Step::PerChannel(buffer) | Step::PerHeadChannel(buffer), .. }) = quant {
        params.push(format!("%step: {}", memref("f32")));
        args.push(Arg::Buffer(*buffer));
    }
    let strided: Vec<&Strided> = std::iter::once(out).chain(inputs).collect();
    let consts = size_params(dims, &strided, &mut params, &mut args);
    if let Some(Quant { step: Step::Scalar(v), .. }) = quant {
        params.push("%step: f32".into());
        args.push(Arg::F32(*v));
    }
    if let Some(q) = quant {
        q.push_offset_param(&mut params, &mut args);
    }

    let mut b = Body::new();
    b.text = consts;
    let (coords, d) = open_elementwise(&mut b);
    let c3 = coords[3].clone();
    let offset = operand_offset;
    let out_off = offset(&mut b, 0, &coords);
    let mut loaded = Vec::new();
    for (k, ty) in in_tys.iter().enumerate() {
        let off = offset(&mut b, k + 1, &coords);
        loaded.push(b.load(&format!("%in{k}"), ty, &off));
    }
    let raw_copy = op == PointwiseOp::Identity && quant.is_none() && in_tys[0] == out_ty;
    let y = if raw_copy {
        loaded[0].clone()
    } else {
        let x: Vec<String> = loaded.iter().zip(&in_tys).map(|(v, ty)| b.widen_to_f32(v, ty)).collect();
        match op {
            PointwiseOp::Add => b.binop("addf", &x[0], &x[1], "f32"),
            PointwiseOp::Sub => b.binop("subf", &x[0], &x[1], "f32"),
            PointwiseOp::Mul => b.binop("mulf", &x[0], &x[1], "f32"),
            PointwiseOp::Div => b.binop("divf", &x[0], &x[1], "f32"),
            PointwiseOp::Identity => x[0].clone(),
            PointwiseOp::Neg => b.v(&format!("arith.negf {} : f32", x[0])),
            PointwiseOp::Exp => emit_exp(&mut b, &x[0]),
            PointwiseOp::Sqrt => b.intrinsic("llvm.sqrt.f32", &x[0], "f32"),
            PointwiseOp::Reciprocal => {
                let one = b.f32(1.0);
                b.binop("divf", &one, &x[0], "f32")
            }
            PointwiseOp::Relu => {
                // x if x > 0 or NaN, else 0 (the CPU's rule).
                let zero = b.f32(0.0);
                let keep = b.v(&format!("arith.cmpf ugt, {}, {zero} : f32", x[0]));
                b.v(&format!("arith.select {keep}, {}, {zero} : f32", x[0]))
            }
            PointwiseOp::Sigmoid => {
                let zero = b.f32(0.0);
                let one = b.f32(1.0);
                let nonneg = b.v(&format!("arith.cmpf oge, {}, {zero} : f32", x[0]));
                let neg = b.v(&format!("arith.negf {} : f32", x[0]));
                let arg = b.v(&format!("arith.select {nonneg}, {neg}, {} : f32", x[0]));
                let e = emit_exp(&mut b, &arg);
                let den = b.binop("addf", &one, &e, "f32");
                let num = b.v(&format!("arith.select {nonneg}, {one}, {e} : f32"));
                b.binop("divf", &num, &den, "f32")
            }
            PointwiseOp::Swiglu => {
                let neg = b.v(&format!("arith.negf {} : f32", x[0]));
                let e = emit_exp(&mut b, &neg);
                let one = b.f32(1.0);
                let den = b.binop("addf", &one, &e, "f32");
                let sig = b.binop("divf", &x[0], &den, "f32");
                b.binop("mulf", &sig, &x[1], "f32")
            }
            PointwiseOp::Rotary => {
                // rotate_half(x)[c] = -x[c + D/2] for c < D/2, x[c - D/2] otherwise.
                let two = b.index(2);
                let half = b.binop("divui", &d[3], &two, "index");
                let low = b.v(&format!("arith.cmpi ult, {c3}, {half} : index"));
                let up = b.binop("addi", &c3, &half, "index");
                let down = b.binop("subi", &c3, &half, "index");
                let partner = b.v(&format!("arith.select {low}, {up}, {down} : index"));
                let pc = [coords[0].clone(), coords[1].clone(), coords[2].clone(), partner];
                let poff = offset(&mut b, 1, &pc);
                let xp = b.load("%in0", in_tys[0], &poff);
                let xp = b.widen_to_f32(&xp, in_tys[0]);
                let neg = b.v(&format!("arith.negf {xp} : f32"));
                let rot = b.v(&format!("arith.select {low}, {neg}, {xp} : f32"));
                let a = b.binop("mulf", &x[0], &x[1], "f32");
                let r = b.binop("mulf", &rot, &x[2], "f32");
                b.binop("addf", &a, &r, "f32")
            }
        }
    };
    let stored = match quant {
        Some(q) => {
            let channel = match q.step {
                Step::PerHeadChannel(_) => {
                    let head = b.binop("muli", &coords[1], &d[3], "index");
                    b.binop("addi", &head, &coords[3], "index")
                }
                _ => coords[3].clone(),
            };
            emit_quant(&mut b, &y, &channel, &coords[2], q, "%step", out_ty)
        }
        None if raw_copy => y,
        None => b.narrow_from_f32(&y, out_ty),
    };
    b.store(&stored, "%out", out_ty, &out_off);
    b.close("");

    let types: Vec<String> = inputs.iter().map(|i| i.dtype.to_string()).collect();
    let mut base = format!("{}_{}_{}", op.name(), types.join("_"), out.dtype);
    if let Some(q) = quant {
        base = format!("{base}_{}{}", q.key(), q.prefix_key());
    }
    Some(Kernel {
        base,
        text: function(&params, &b.text),
        args,
        grid: [
            super::shapes::ceil_div(&super::shapes::product(dims), POINTWISE_BLOCK as i64),
            DimExpr::Const(1),
            DimExpr::Const(1),
        ],
        block: [POINTWISE_BLOCK, 1, 1],
    })
}

/// exp(x) as ex2.approx(x * log2 e): NVPTX has no exp instruction, and MLIR's math.exp becomes a
/// libdevice call that cannot be linked without a CUDA toolkit.
fn emit_exp(b: &mut Body, x: &str) -> String {
    let log2e = b.f32(std::f32::consts::LOG2_E);
    let t = b.binop("mulf", x, &log2e, "f32");
    b.intrinsic("llvm.exp2.f32", &t, "f32")
}

/// The sum over a warp's 32 lanes of an f64 `value`, in the butterfly order of `qcc_ir::lane_sum`
/// (xor 16, 8, 4, 2, 1: every lane ends with the same bits). Each f64 travels as two i32 shuffles.
fn emit_lane_butterfly_f64(b: &mut Body, value: &str) -> String {
    let width = b.v("arith.constant 32 : i32");
    let c32 = b.v("arith.constant 32 : i64");
    let mut acc = value.to_string();
    for offset in [16, 8, 4, 2, 1] {
        let off = b.v(&format!("arith.constant {offset} : i32"));
        let bits = b.v(&format!("arith.bitcast {acc} : f64 to i64"));
        let lo = b.v(&format!("arith.trunci {bits} : i64 to i32"));
        let high = b.binop("shrui", &bits, &c32, "i64");
        let hi = b.v(&format!("arith.trunci {high} : i64 to i32"));
        let shuffled = |b: &mut Body, half: &str| {
            let (v, ok) = (format!("%v{}", b.next), format!("%v{}", b.next + 1));
            b.next += 2;
            b.line(&format!("{v}, {ok} = gpu.shuffle xor {half}, {off}, {width} : i32"));
            b.v(&format!("arith.extui {v} : i32 to i64"))
        };
        let lo = shuffled(b, &lo);
        let hi = shuffled(b, &hi);
        let hi = b.binop("shli", &hi, &c32, "i64");
        let joined = b.binop("ori", &hi, &lo, "i64");
        let other = b.v(&format!("arith.bitcast {joined} : i64 to f64"));
        acc = b.binop("addf", &acc, &other, "f64");
    }
    acc
}

/// One warp per row: warp w of block b takes row b * ROWS_PER_BLOCK + w and opens `scf.if row <
/// %rows`. Returns the warp size constant, the lane and the row.
fn open_warp_row(b: &mut Body) -> (String, String, String) {
    let tid = b.v("gpu.thread_id x");
    let bid = b.v("gpu.block_id x");
    let warp_size = b.index(32);
    let per_block = b.index(ROWS_PER_BLOCK as i64);
    let warp = b.binop("divui", &tid, &warp_size, "index");
    let lane = b.binop("remui", &tid, &warp_size, "index");
    let first = b.binop("muli", &bid, &per_block, "index");
    let row = b.binop("addi", &first, &warp, "index");
    let rows_i = b.arg_index("%rows");
    let inside = b.v(&format!("arith.cmpi ult, {row}, {rows_i} : index"));
    b.open(&format!("scf.if {inside}"));
    (warp_size, lane, row)
}

/// `rms_norm(x, gamma, beta?)` over rows of `k` contiguous elements, with an optional output
/// quantization. One warp per row and share: the lanes sum the squares in f64 in the order shared
/// with the CPU (`qcc_ir::lane_sum`, so the norm is bit-identical), then write their share of the
/// row's 32-element chunks (few rows are split over grid y, see [`ROW_SPLIT`]).
/// Parameters: out, x, gamma, [beta], [per-channel step]; rows, seq (extent of the second-to-last
/// axis, for prefix positions); [scalar step].
#[allow(clippy::too_many_arguments)]
pub fn rms_norm(
    out: (u32, DType),
    x: (u32, DType),
    gamma: (u32, DType),
    beta: Option<(u32, DType)>,
    k: u64,
    epsilon: f32,
    rows: DimExpr,
    seq: DimExpr,
    quant: Option<&Quant>,
) -> Option<Kernel> {
    let (out_ty, x_ty, g_ty) = (storage_type(out.1)?, storage_type(x.1)?, storage_type(gamma.1)?);
    let b_ty = match beta {
        Some((_, dt)) => Some(storage_type(dt)?),
        None => None,
    };
    let mut params =
        vec![format!("%out: {}", memref(out_ty)), format!("%x: {}", memref(x_ty)), format!("%gamma: {}", memref(g_ty))];
    let mut args = vec![Arg::Buffer(out.0), Arg::Buffer(x.0), Arg::Buffer(gamma.0)];
    if let (Some((id, _)), Some(ty)) = (beta, b_ty) {
        params.push(format!("%beta: {}", memref(ty)));
        args.push(Arg::Buffer(id));
    }
    if let Some(Quant { step: Step::PerChannel(buffer), .. }) = quant {
        params.push(format!("%step: {}", memref("f32")));
        args.push(Arg::Buffer(*buffer));
    }
    params.push("%rows: i64".into());
    params.push("%seq: i64".into());
    args.push(Arg::I64(rows.clone()));
    args.push(Arg::I64(seq));
    if let Some(Quant { step: Step::Scalar(v), .. }) = quant {
        params.push("%step: f32".into());
        args.push(Arg::F32(*v));
    }
    if let Some(q) = quant {
        q.push_offset_param(&mut params, &mut args);
    }

    let mut b = Body::new();
    let (warp_size, lane, row) = open_warp_row(&mut b);
    let k_i = b.index(k as i64);
    let base = b.binop("muli", &row, &k_i, "index");
    let zero_f64 = b.f64(0.0);
    // The sum of squares in f64 in the order shared with the CPU (`qcc_ir::lane_sum`): lane l sums
    // elements l, l + 32, ... in order, then a butterfly over the 32 lanes (xor 16, 8, 4, 2, 1).
    // Rounds of `unroll` elements per lane load first and add in order (the loads overlap), then a
    // tail of single elements. A decode row's sum is one warp waiting on its loads, so each round
    // issues as many as the registers allow: up to 64 x values per lane (a 4096 row: 2 rounds); the
    // second pass takes PASS2_UNROLL elements of x, gamma, beta and step per lane and round.
    let unroll = [64u64, 32, 16].into_iter().find(|&u| 32 * u <= k).unwrap_or(16);
    let rounds = k / (32 * unroll);
    let square = |b: &mut Body, j: &str| {
        let at = b.binop("addi", &base, j, "index");
        let xv = b.load("%x", x_ty, &at);
        let xf = b.widen_to_f32(&xv, x_ty);
        let xd = b.v(&format!("arith.extf {xf} : f32 to f64"));
        b.binop("mulf", &xd, &xd, "f64")
    };
    let mut partial = zero_f64.clone();
    if rounds > 0 {
        let end = b.index((rounds * 32 * unroll) as i64);
        let stride = b.index((32 * unroll) as i64);
        let (j, acc) = (format!("%j{}", b.next), format!("%acc{}", b.next));
        b.next += 1;
        partial =
            b.v(&format!("scf.for {j} = {lane} to {end} step {stride} iter_args({acc} = {zero_f64}) -> (f64) {{"));
        b.indent += 1;
        let squares: Vec<String> = (0..unroll)
            .map(|u| {
                let off = b.index((32 * u) as i64);
                let ju = b.binop("addi", &j, &off, "index");
                square(&mut b, &ju)
            })
            .collect();
        let mut next = acc.clone();
        for sq in &squares {
            next = b.binop("addf", &next, sq, "f64");
        }
        b.line(&format!("scf.yield {next} : f64"));
        b.close("");
    }
    let tail_offset = b.index((rounds * 32 * unroll) as i64);
    let tail_start = b.binop("addi", &lane, &tail_offset, "index");
    let (j, acc) = (format!("%j{}", b.next), format!("%acc{}", b.next));
    b.next += 1;
    let partial =
        b.v(&format!("scf.for {j} = {tail_start} to {k_i} step {warp_size} iter_args({acc} = {partial}) -> (f64) {{"));
    b.indent += 1;
    let sq = square(&mut b, &j);
    let next = b.binop("addf", &acc, &sq, "f64");
    b.line(&format!("scf.yield {next} : f64"));
    b.close("");
    let sum = emit_lane_butterfly_f64(&mut b, &partial);
    let n = b.f64(k as f64);
    let var = b.binop("divf", &sum, &n, "f64");
    // The CPU widens the f32 attribute: (epsilon as f64).
    let eps = b.f64(epsilon as f64);
    let ve = b.binop("addf", &var, &eps, "f64");
    let root = b.intrinsic("llvm.sqrt.f64", &ve, "f64");
    let one_f64 = b.f64(1.0);
    let inv = b.binop("divf", &one_f64, &root, "f64");
    let seq_i = b.arg_index("%seq");
    let pos = b.binop("remui", &row, &seq_i, "index");
    // The outputs in the same rounds: every load of a round before its stores (the compiler cannot
    // move loads above stores to another buffer), then the tail one element at a time.
    let load = |b: &mut Body, j: &str| {
        let at = b.binop("addi", &base, j, "index");
        let xv = b.load("%x", x_ty, &at);
        let g = b.load("%gamma", g_ty, j);
        let bv = b_ty.map(|ty| b.load("%beta", ty, j));
        (xv, g, bv)
    };
    let finish = |b: &mut Body, j: &str, (xv, g, bv): (String, String, Option<String>)| {
        let xf = b.widen_to_f32(&xv, x_ty);
        let xd = b.v(&format!("arith.extf {xf} : f32 to f64"));
        let nd = b.binop("mulf", &xd, &inv, "f64");
        let y = b.v(&format!("arith.truncf {nd} : f64 to f32"));
        let g = b.widen_to_f32(&g, g_ty);
        let mut y = b.binop("mulf", &y, &g, "f32");
        if let (Some(bv), Some(ty)) = (bv, b_ty) {
            let bv = b.widen_to_f32(&bv, ty);
            y = b.binop("addf", &y, &bv, "f32");
        }
        let stored = match quant {
            Some(q) => emit_quant(b, &y, j, &pos, q, "%step", out_ty),
            None => b.narrow_from_f32(&y, out_ty),
        };
        let at_out = b.binop("addi", &base, j, "index");
        b.store(&stored, "%out", out_ty, &at_out);
    };
    // Each row's outputs are split over the grid's y blocks (ROW_SPLIT / (rows + 1), rounded up: 8 for
    // a decode row, 1 from 15 rows on): block y takes the 32-element chunks c = y, y + split, ..., so
    // a decode row is written by 8 warps instead of one (each repeats the sum above, a few L2 reads).
    let split = b.v("gpu.grid_dim y");
    let share = b.v("gpu.block_id y");
    let chunk = b.binop("muli", &share, &warp_size, "index");
    let first_j = b.binop("addi", &lane, &chunk, "index");
    let step = b.binop("muli", &split, &warp_size, "index");
    let unroll = PASS2_UNROLL.min((k / 32).max(1));
    let unroll_i = b.index(unroll as i64);
    let stride = b.binop("muli", &step, &unroll_i, "index");
    let chunks = b.index((k / 32) as i64);
    let per_round = b.binop("muli", &split, &unroll_i, "index");
    let rounds = b.binop("divui", &chunks, &per_round, "index");
    let covered = b.binop("muli", &rounds, &stride, "index");
    let end = b.binop("addi", &first_j, &covered, "index");
    let j = format!("%j{}", b.next);
    b.next += 1;
    b.open(&format!("scf.for {j} = {first_j} to {end} step {stride}"));
    let at: Vec<String> = (0..unroll)
        .map(|u| {
            let u_i = b.index(u as i64);
            let off = b.binop("muli", &step, &u_i, "index");
            b.binop("addi", &j, &off, "index")
        })
        .collect();
    let loaded: Vec<_> = at.iter().map(|ju| load(&mut b, ju)).collect();
    for (ju, l) in at.iter().zip(loaded) {
        finish(&mut b, ju, l);
    }
    b.close("");
    let j = format!("%j{}", b.next);
    b.next += 1;
    b.open(&format!("scf.for {j} = {end} to {k_i} step {step}"));
    let l = load(&mut b, &j);
    finish(&mut b, &j, l);
    b.close("");
    b.close("");

    let mut name = format!("rms_norm_{}_{}_k{k}", x.1, out.1);
    if let Some(q) = quant {
        name = format!("{name}_{}{}", q.key(), q.prefix_key());
    }
    if beta.is_some() {
        name.push_str("_beta");
    }
    Some(Kernel {
        base: name,
        text: function(&params, &b.text),
        args,
        grid: [
            super::shapes::ceil_div(&rows, ROWS_PER_BLOCK as i64),
            DimExpr::ceil_div(DimExpr::Const(ROW_SPLIT), DimExpr::add(rows, DimExpr::Const(1))),
            DimExpr::Const(1),
        ],
        block: [32 * ROWS_PER_BLOCK, 1, 1],
    })
}

/// `softmax` over rows of `k` contiguous elements (the last axis), one warp per row, as the CPU
/// computes it: m = max (NaN ignored; 0 when not finite), e = exp(x - m) in f32, the sum of e in f64,
/// y = e * f32(1 / sum). Every lane takes the max and the sum over the whole row sequentially, then
/// writes its strided share. Parameters: out, x; rows, k.
pub fn softmax_rows(out: (u32, DType), x: (u32, DType), rows: DimExpr, k: DimExpr) -> Option<Kernel> {
    let (out_ty, x_ty) = (storage_type(out.1)?, storage_type(x.1)?);
    let params =
        [format!("%out: {}", memref(out_ty)), format!("%x: {}", memref(x_ty)), "%rows: i64".into(), "%k: i64".into()];
    let args = vec![Arg::Buffer(out.0), Arg::Buffer(x.0), Arg::I64(rows.clone()), Arg::I64(k)];
    let mut b = Body::new();
    let (warp_size, lane, row) = open_warp_row(&mut b);
    let k_i = b.arg_index("%k");
    let base = b.binop("muli", &row, &k_i, "index");
    let zero = b.index(0);
    let one = b.index(1);
    let neg_inf = b.f32(f32::NEG_INFINITY);
    let load_f32 = |b: &mut Body, j: &str| {
        let at = b.binop("addi", &base, j, "index");
        let v = b.load("%x", x_ty, &at);
        b.widen_to_f32(&v, x_ty)
    };
    let (j, m) = (format!("%j{}", b.next), format!("%m{}", b.next));
    b.next += 1;
    let max = b.v(&format!("scf.for {j} = {zero} to {k_i} step {one} iter_args({m} = {neg_inf}) -> (f32) {{"));
    b.indent += 1;
    let v = load_f32(&mut b, &j);
    // `v > m ? v : m` ignores NaN like the CPU's fold.
    let greater = b.v(&format!("arith.cmpf ogt, {v}, {m} : f32"));
    let next = b.v(&format!("arith.select {greater}, {v}, {m} : f32"));
    b.line(&format!("scf.yield {next} : f32"));
    b.close("");
    let inf = b.f32(f32::INFINITY);
    let below = b.v(&format!("arith.cmpf olt, {max}, {inf} : f32"));
    let above = b.v(&format!("arith.cmpf ogt, {max}, {neg_inf} : f32"));
    let finite = b.binop("andi", &below, &above, "i1");
    let zero_f = b.f32(0.0);
    let max = b.v(&format!("arith.select {finite}, {max}, {zero_f} : f32"));
    let zero_f64 = b.f64(0.0);
    let (j, acc) = (format!("%j{}", b.next), format!("%acc{}", b.next));
    b.next += 1;
    let sum = b.v(&format!("scf.for {j} = {zero} to {k_i} step {one} iter_args({acc} = {zero_f64}) -> (f64) {{"));
    b.indent += 1;
    let v = load_f32(&mut b, &j);
    let d = b.binop("subf", &v, &max, "f32");
    let e = emit_exp(&mut b, &d);
    let ed = b.v(&format!("arith.extf {e} : f32 to f64"));
    let next = b.binop("addf", &acc, &ed, "f64");
    b.line(&format!("scf.yield {next} : f64"));
    b.close("");
    let one_f64 = b.f64(1.0);
    let inv = b.binop("divf", &one_f64, &sum, "f64");
    let inv = b.v(&format!("arith.truncf {inv} : f64 to f32"));
    let j = format!("%j{}", b.next);
    b.next += 1;
    b.open(&format!("scf.for {j} = {lane} to {k_i} step {warp_size}"));
    let v = load_f32(&mut b, &j);
    let d = b.binop("subf", &v, &max, "f32");
    let e = emit_exp(&mut b, &d);
    let y = b.binop("mulf", &e, &inv, "f32");
    let y = b.narrow_from_f32(&y, out_ty);
    let at = b.binop("addi", &base, &j, "index");
    b.store(&y, "%out", out_ty, &at);
    b.close("");
    b.close("");
    Some(Kernel {
        base: format!("softmax_{}_{}", x.1, out.1),
        text: function(&params, &b.text),
        args,
        grid: [super::shapes::ceil_div(&rows, ROWS_PER_BLOCK as i64), DimExpr::Const(1), DimExpr::Const(1)],
        block: [32 * ROWS_PER_BLOCK, 1, 1],
    })
}

/// Embedding lookup `out[r, c] = table[ids[r], c]` (gather on axis 0 of a [V, D] table with i64
/// ids). Negative ids count from the end as in ONNX; ids outside [-V, V) give zeros (the CPU
/// executor reports an error instead). Parameters: out, table, ids; total, d, v.
pub fn gather_rows(out: u32, table: (u32, DType), ids: (u32, DType), rows: DimExpr, d: u64, v: u64) -> Option<Kernel> {
    let ty = storage_type(table.1)?;
    if ids.1 != DType::I64 {
        return None;
    }
    let total = super::shapes::mul(&rows, &DimExpr::Const(d as i64));
    let params = [
        format!("%out: {}", memref(ty)),
        format!("%table: {}", memref(ty)),
        format!("%ids: {}", memref("i64")),
        "%total: i64".into(),
        "%d: i64".into(),
        "%v: i64".into(),
    ];
    let args = vec![
        Arg::Buffer(out),
        Arg::Buffer(table.0),
        Arg::Buffer(ids.0),
        Arg::I64(total.clone()),
        Arg::I64(DimExpr::Const(d as i64)),
        Arg::I64(DimExpr::Const(v as i64)),
    ];
    let mut b = Body::new();
    let i = b.global_index();
    let n = b.arg_index("%total");
    let inside = b.v(&format!("arith.cmpi ult, {i}, {n} : index"));
    b.open(&format!("scf.if {inside}"));
    let d_i = b.arg_index("%d");
    let row = b.binop("divui", &i, &d_i, "index");
    let col = b.binop("remui", &i, &d_i, "index");
    let id = b.load("%ids", "i64", &row);
    let zero = b.v("arith.constant 0 : i64");
    let negative = b.v(&format!("arith.cmpi slt, {id}, {zero} : i64"));
    let wrapped = b.binop("addi", &id, "%v", "i64");
    let id = b.v(&format!("arith.select {negative}, {wrapped}, {id} : i64"));
    let ge0 = b.v(&format!("arith.cmpi sge, {id}, {zero} : i64"));
    let ltv = b.v(&format!("arith.cmpi slt, {id}, %v : i64"));
    let valid = b.binop("andi", &ge0, &ltv, "i1");
    let value = b.v(&format!("scf.if {valid} -> ({ty}) {{"));
    b.indent += 1;
    let idx = b.v(&format!("arith.index_cast {id} : i64 to index"));
    let start = b.binop("muli", &idx, &d_i, "index");
    let at = b.binop("addi", &start, &col, "index");
    let x = b.load("%table", ty, &at);
    b.line(&format!("scf.yield {x} : {ty}"));
    b.indent -= 1;
    b.line("} else {");
    b.indent += 1;
    let zero_value = if ty.starts_with('f') || ty == "bf16" {
        b.v(&format!("arith.constant 0.0 : {ty}"))
    } else {
        b.v(&format!("arith.constant 0 : {ty}"))
    };
    b.line(&format!("scf.yield {zero_value} : {ty}"));
    b.close("");
    b.store(&value, "%out", ty, &i);
    b.close("");
    Some(Kernel {
        base: format!("gather_rows_{}", table.1),
        text: function(&params, &b.text),
        args,
        grid: [super::shapes::ceil_div(&total, POINTWISE_BLOCK as i64), DimExpr::Const(1), DimExpr::Const(1)],
        block: [POINTWISE_BLOCK, 1, 1],
    })
}

fn function(params: &[String], body: &str) -> String {
    format!("    gpu.func @{NAME_PLACEHOLDER}({}) kernel {{\n{body}      gpu.return\n    }}", params.join(", "))
}

/// A `gpu.module` of named kernels inside a container module, with each function's location naming
/// the graph node (and op) it was first generated for.
pub fn module_text(module: &str, functions: &[(String, String, String)]) -> String {
    let mut text = format!("module attributes {{gpu.container_module}} {{\n  gpu.module @{module} {{\n");
    for (name, func, location) in functions {
        let func = func.replacen(&format!("@{NAME_PLACEHOLDER}("), &format!("@{name}("), 1);
        let _ = writeln!(text, "{func} loc({})", mlir_string(location));
    }
    text.push_str("  }\n}\n");
    text
}

/// An MLIR string literal: quotes, backslashes and control characters escaped as `\XX`.
pub fn mlir_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for byte in s.bytes() {
        if byte == b'"' || byte == b'\\' || !(0x20..0x7f).contains(&byte) {
            let _ = write!(out, "\\{byte:02X}");
        } else {
            out.push(byte as char);
        }
    }
    out.push('"');
    out
}
