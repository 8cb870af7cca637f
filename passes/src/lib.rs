//! qcc passes: the `Pass` trait, the pass registry and textual pipelines, the pass manager with its
//! instrumentations (verification, statistics, IR printing and dumps, stop-after, bisection), the egg
//! e-graph bridge, and the passes themselves, one per file.
//!
//! ```text
//! let registry = Registry::standard();
//! let pipeline = registry.parse_pipeline("canonicalize,fold-constants,eliminate-dead-code")?;
//! PassManager::new(pipeline).run(&mut graph, &mut [&mut stats])?;
//! ```

pub mod const_eval;
pub mod egraph;
pub mod manager;
pub mod pass;
pub mod pipelines;
pub mod registry;
pub mod verify;

pub mod calibration;
pub mod canonicalize;
pub mod clip;
pub mod convert_precision;
pub mod eliminate_dead_code;
pub mod fold_constants;
pub mod fold_norm_weights;
pub mod fuse_attention;
pub mod fuse_layer_norm;
pub mod fuse_linear;
pub mod fuse_rms_norm;
pub mod fuse_rotary;
pub mod fuse_swiglu;
pub mod gptq;
pub(crate) mod pattern;
pub mod qsm;
pub mod quantize;
pub mod reconstruct_dims;
pub mod report;
pub mod rotate;
pub(crate) mod sites;
pub mod smooth;
pub mod symmetrize;
pub(crate) mod weights;

pub use calibration::{CalibrationSet, ChannelHistogram, ChannelStats, CollectionTiming, StatsRequest, StatsStore};
pub use manager::{
    Bisect, DumpDir, Flow, Instrumentation, InstrumentationError, ManagerError, PassFilter, PassManager, PassReport,
    PassRun, PassStats, PrintIr, RunSummary, StopAfter,
};
pub use pass::{OptionKind, OptionSpec, Pass, PassContext, PassError, PassOptions, PassOutcome};
pub use pipelines::OptLevel;
pub use registry::{PassEntry, Pipeline, PipelineEntry, PipelineError, Registry};

/// Every registered pass, in the order `qcc passes` lists them.
pub(crate) fn all_pass_entries() -> Vec<PassEntry> {
    vec![
        canonicalize::ENTRY,
        fold_constants::ENTRY,
        eliminate_dead_code::ENTRY,
        fuse_rms_norm::ENTRY,
        fuse_layer_norm::ENTRY,
        fuse_linear::ENTRY,
        fuse_swiglu::ENTRY,
        fuse_rotary::ENTRY,
        fuse_attention::ENTRY,
        clip::ENTRY,
        quantize::ENTRY,
        qsm::ENTRY,
        fold_norm_weights::ENTRY,
        rotate::ENTRY,
        smooth::ENTRY,
        reconstruct_dims::ENTRY,
        symmetrize::ENTRY,
        convert_precision::ENTRY,
    ]
}
