//! Programmatic dependent launch (Hopper): a kernel launched with the programmatic-serialization
//! attribute may start while the kernel before it on the stream still runs, and waits for it inside
//! (`griddepcontrol.wait`). A decode step is ~25 short dependent kernels, each paying its launch and
//! ramp after the previous one drained; with PDL that latency overlaps the previous kernel.
//!
//! Every kernel the runtime loads gets, at the top of each entry (after the body's declarations):
//! `griddepcontrol.wait` (returns once the kernel before it on the stream has completed and its
//! memory is visible; immediately when the launch carries no programmatic dependency), then
//! `griddepcontrol.launch_dependents` (lets the next kernel launch early, to wait in turn). So a
//! patched kernel touches no memory before its predecessor finished, whether it was launched with
//! PDL or not, and the order of every read and write stays that of the stream. Only patched kernels
//! are launched with the attribute ([`launch`], [`Launcher`]); cuBLAS's kernels and memory copies
//! keep ordinary stream order around them. Runs of more than [`MAX_SEQ`] new tokens launch without
//! it ([`wanted`]); `QCC_PDL=0` turns it off altogether (no patch, ordinary launches).

use std::ffi::c_void;
use std::marker::PhantomData;
use std::sync::OnceLock;

use cudarc::driver::sys;
use cudarc::driver::{CudaFunction, CudaStream, DeviceRepr, LaunchConfig};

/// Whether kernels are patched and launched with PDL (`QCC_PDL=0` turns it off).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("QCC_PDL").is_none_or(|v| v != "0"))
}

/// Runs of at most this many new tokens (symbol `seq`) launch with PDL. On an H200 it made decode
/// steps of the 30-layer SmolLM2 11% faster and 128-token prefills 4% faster, but 2048-token
/// prefills (few, long kernels) 2-3% slower (docs/gpu-results.md, 2026-12-04).
pub const MAX_SEQ: i64 = 512;

/// Whether a run with these symbol values launches with PDL ([`enabled`] and `seq <= MAX_SEQ`).
pub fn wanted(values: &crate::artifact::SymbolValues) -> bool {
    enabled() && values.get("seq").is_none_or(|&s| s <= MAX_SEQ)
}

const PROLOGUE: &str = "\tgriddepcontrol.wait;\n\tgriddepcontrol.launch_dependents;\n";

/// `ptx` with the PDL prologue at the top of every `.entry` body (see the module header), or `None`
/// when an entry's body cannot be found or the PTX targets something older than sm_90 / PTX 7.8.
pub fn patch_entries(ptx: &str) -> Option<String> {
    let version = ptx.lines().find_map(|l| l.trim().strip_prefix(".version "))?;
    let (major, minor) = version.trim().split_once('.')?;
    let (major, minor): (u32, u32) = (major.parse().ok()?, minor.parse().ok()?);
    let target = ptx.lines().find_map(|l| l.trim().strip_prefix(".target "))?;
    let arch: u32 = target.trim().strip_prefix("sm_")?.trim_end_matches(|c: char| !c.is_ascii_digit()).parse().ok()?;
    if (major, minor) < (7, 8) || arch < 90 {
        return None;
    }
    let mut out = String::with_capacity(ptx.len() + 4096);
    let mut lines = ptx.lines().peekable();
    let mut entries = 0usize;
    while let Some(line) = lines.next() {
        out.push_str(line);
        out.push('\n');
        let t = line.trim_start();
        let is_entry = t.starts_with(".entry ") || t.contains(" .entry ");
        if !is_entry || t.starts_with("//") {
            continue;
        }
        // The header (parameters, performance directives) up to the body's opening brace.
        loop {
            let l = lines.next()?;
            out.push_str(l);
            out.push('\n');
            if l.trim() == "{" {
                break;
            }
        }
        // The body's leading declarations stay first.
        while let Some(l) = lines.peek() {
            let t = l.trim();
            let declaration = t.is_empty()
                || t.starts_with("//")
                || [".reg ", ".local ", ".shared ", ".const "].iter().any(|d| t.starts_with(d));
            if !declaration {
                break;
            }
            out.push_str(l);
            out.push('\n');
            lines.next();
        }
        out.push_str(PROLOGUE);
        entries += 1;
    }
    (entries > 0).then_some(out)
}

/// [`patch_entries`] when PDL is on and the PTX takes it; else the PTX unchanged. The flag says
/// whether the kernels of this PTX may be launched with [`launch`].
pub fn prepare(ptx: String) -> (String, bool) {
    if !enabled() {
        return (ptx, false);
    }
    match patch_entries(&ptx) {
        Some(patched) => (patched, true),
        None => (ptx, false),
    }
}

/// Launches `f` with the programmatic-serialization attribute. `params` points at each kernel
/// argument's value, in the kernel's parameter order.
///
/// # Safety
/// As for any kernel launch: the arguments must match the kernel's parameters and the buffers they
/// point to must be large enough. `f` must come from PTX that [`prepare`] patched (flag true).
pub unsafe fn launch(
    stream: &CudaStream,
    f: &CudaFunction,
    cfg: LaunchConfig,
    params: &mut [*mut c_void],
) -> Result<(), cudarc::driver::DriverError> {
    stream.context().bind_to_thread()?;
    let mut value: sys::CUlaunchAttributeValue = std::mem::zeroed();
    value.programmaticStreamSerializationAllowed = 1;
    let mut attr = sys::CUlaunchAttribute {
        id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
        pad: [0; 4],
        value,
    };
    let config = sys::CUlaunchConfig {
        gridDimX: cfg.grid_dim.0,
        gridDimY: cfg.grid_dim.1,
        gridDimZ: cfg.grid_dim.2,
        blockDimX: cfg.block_dim.0,
        blockDimY: cfg.block_dim.1,
        blockDimZ: cfg.block_dim.2,
        sharedMemBytes: cfg.shared_mem_bytes,
        hStream: stream.cu_stream(),
        attrs: &mut attr,
        numAttrs: 1,
    };
    sys::cuLaunchKernelEx(&config, f.cu_function(), params.as_mut_ptr(), std::ptr::null_mut()).result()
}

/// A kernel launch built like cudarc's `launch_builder` (`.arg(&v)` in parameter order, then
/// `launch(cfg)`), with PDL when the kernel was patched (`pdl`).
pub struct Launcher<'a> {
    stream: &'a CudaStream,
    f: &'a CudaFunction,
    pdl: bool,
    params: Vec<*mut c_void>,
    _values: PhantomData<&'a ()>,
}

impl<'a> Launcher<'a> {
    pub fn new(stream: &'a CudaStream, f: &'a CudaFunction, pdl: bool) -> Self {
        Launcher { stream, f, pdl, params: Vec::with_capacity(16), _values: PhantomData }
    }

    /// The next kernel argument (its value is read at the launch).
    pub fn arg<T: DeviceRepr>(&mut self, value: &'a T) -> &mut Self {
        self.params.push(value as *const T as *mut c_void);
        self
    }

    /// Enqueues the kernel.
    ///
    /// # Safety
    /// As for any kernel launch: the arguments must match the kernel's parameters and the buffers
    /// they point to must be large enough.
    pub unsafe fn launch(&mut self, cfg: LaunchConfig) -> Result<(), cudarc::driver::DriverError> {
        if self.pdl {
            return launch(self.stream, self.f, cfg, &mut self.params);
        }
        self.stream.context().bind_to_thread()?;
        cudarc::driver::result::launch_kernel(
            self.f.cu_function(),
            cfg.grid_dim,
            cfg.block_dim,
            cfg.shared_mem_bytes,
            self.stream.cu_stream(),
            &mut self.params,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = ".version 7.8\n.target sm_90\n.address_size 64\n\n\t// .globl\tk\n\
        .visible .entry k(\n\t.param .u64 k_param_0\n)\n.maxntid 128, 1, 1\n{\n\t.reg .pred \t%p<2>;\n\
        \t.reg .b64 \t%rd<3>;\n\n// %bb.0:\n\tld.param.u64 \t%rd1, [k_param_0];\n\tret;\n\n}\n\
        .func helper()\n{\n\tret;\n}\n.visible .entry k2()\n{\n\tret;\n}\n";

    #[test]
    fn every_entry_waits_first_after_its_declarations() {
        let patched = patch_entries(SAMPLE).unwrap();
        assert_eq!(patched.matches("griddepcontrol.wait;").count(), 2, "{patched}");
        assert_eq!(patched.matches("griddepcontrol.launch_dependents;").count(), 2);
        // After the register declarations and the label comment, before the first instruction.
        let wait = patched.find("griddepcontrol.wait").unwrap();
        assert!(patched.find(".reg .b64").unwrap() < wait && wait < patched.find("ld.param.u64").unwrap());
        // The device function is untouched; the second entry's wait precedes its `ret`.
        let helper = patched.find(".func helper").unwrap();
        assert!(!patched[helper..patched.find(".visible .entry k2").unwrap()].contains("griddepcontrol"));
        assert!(patched.rfind("griddepcontrol.launch_dependents").unwrap() < patched.rfind("ret;").unwrap());
    }

    #[test]
    fn decode_steps_and_short_prompts_launch_with_pdl_long_prefills_do_not() {
        if !enabled() {
            return; // QCC_PDL=0 in this environment
        }
        let values = |seq: i64| [("batch".to_string(), 1), ("seq".to_string(), seq)].into_iter().collect();
        assert!(wanted(&values(1)) && wanted(&values(MAX_SEQ)));
        assert!(!wanted(&values(MAX_SEQ + 1)) && !wanted(&values(2048)));
        assert!(wanted(&Default::default()), "a plan without a sequence symbol");
    }

    #[test]
    fn old_targets_and_broken_entries_are_left_alone() {
        assert!(patch_entries(&SAMPLE.replace(".version 7.8", ".version 7.5")).is_none());
        assert!(patch_entries(&SAMPLE.replace("sm_90", "sm_80")).is_none());
        assert!(patch_entries(".version 8.0\n.target sm_90a\n.visible .entry k(\n").is_none());
        assert!(patch_entries(".version 8.0\n.target sm_90a\n").is_none(), "no entry");
        assert!(patch_entries(&SAMPLE.replace("sm_90", "sm_90a")).is_some());
    }
}
