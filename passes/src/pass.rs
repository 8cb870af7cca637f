//! The `Pass` trait, what a pass reports back (`PassOutcome`), the per-run `PassContext` (rewrite budget
//! for bisection, notes for the instrumentation) and pass options parsed from `name{key=value,...}`.
//!
//! Options are declared per pass (`OptionSpec`), so an unknown key is rejected before the pass is built
//! and the error lists the keys the pass accepts; typed accessors report the key, the value and the type
//! they expected.

use qcc_ir::{Graph, GraphError};
use std::collections::BTreeMap;
use std::fmt;

/// A graph-to-graph transformation. Passes are pure functions of their options and the graph.
pub trait Pass {
    /// Kebab-case name, the one used in pipeline strings.
    fn name(&self) -> &'static str;
    /// One line saying what the pass does.
    fn description(&self) -> &'static str;
    /// Transforms the graph in place. A pass that returns an error may have left the graph half-rewritten;
    /// the pass manager reports the error and the caller discards the graph.
    fn run(&self, graph: &mut Graph, ctx: &mut PassContext) -> Result<PassOutcome, PassError>;
}

/// What one pass application did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PassOutcome {
    /// Whether the graph may differ from the input (passes set this only when they applied a rewrite).
    pub changed: bool,
    /// Number of rewrites applied (nodes folded, nodes removed, patterns fused, ...).
    pub rewrites: usize,
}

impl PassOutcome {
    pub fn unchanged() -> PassOutcome {
        PassOutcome { changed: false, rewrites: 0 }
    }

    /// An outcome for `rewrites` applied rewrites (`changed` is true when there was at least one).
    pub fn rewrites(rewrites: usize) -> PassOutcome {
        PassOutcome { changed: rewrites > 0, rewrites }
    }
}

/// State shared by all passes of one pipeline run.
///
/// The rewrite budget implements fine-grained bisection: a pass asks `try_rewrite()` before each
/// individual rewrite and skips it when the budget is spent, so `--bisect-rewrites=N` finds the single
/// rewrite that broke a model.
#[derive(Debug, Default)]
pub struct PassContext {
    rewrite_budget: Option<usize>,
    notes: Vec<String>,
    /// Calibration set, statistics cache and store (see `calibration.rs`).
    calibration: crate::calibration::CalibrationState,
    /// Per-layer quantization diagnostics, filled by `quantize` when enabled (`--report`).
    report: Option<crate::report::QuantReport>,
}

impl PassContext {
    pub fn new() -> PassContext {
        PassContext::default()
    }

    /// Limits the number of rewrites the remaining passes may apply (`None`: unlimited).
    pub fn set_rewrite_budget(&mut self, budget: Option<usize>) {
        self.rewrite_budget = budget;
    }

    pub fn rewrite_budget(&self) -> Option<usize> {
        self.rewrite_budget
    }

    /// Asks for permission to apply one rewrite, consuming one unit of the budget. Passes skip the
    /// rewrite when this returns false.
    pub fn try_rewrite(&mut self) -> bool {
        match &mut self.rewrite_budget {
            None => true,
            Some(0) => false,
            Some(n) => {
                *n -= 1;
                true
            }
        }
    }

    /// Records a remark about the current pass application (shown by `--pass-stats`).
    pub fn note(&mut self, message: impl Into<String>) {
        self.notes.push(message.into());
    }

    /// Takes the notes recorded since the last call (the pass manager calls this after each pass).
    pub fn take_notes(&mut self) -> Vec<String> {
        std::mem::take(&mut self.notes)
    }

    /// Makes `quantize` record per-layer diagnostics (costs one extra pass over sampled rows).
    pub fn enable_report(&mut self) {
        self.report.get_or_insert_with(Default::default);
    }

    pub fn report_mut(&mut self) -> Option<&mut crate::report::QuantReport> {
        self.report.as_mut()
    }

    pub fn take_report(&mut self) -> Option<crate::report::QuantReport> {
        self.report.take()
    }

    pub(crate) fn calibration_state(&self) -> &crate::calibration::CalibrationState {
        &self.calibration
    }

    pub(crate) fn calibration_state_mut(&mut self) -> &mut crate::calibration::CalibrationState {
        &mut self.calibration
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PassError {
    #[error("pass '{pass}' has no option '{key}'; valid options: {valid}")]
    UnknownOption { pass: String, key: String, valid: String },
    #[error("pass '{pass}': option '{key}' = '{value}' is not {expected}")]
    BadOptionValue { pass: String, key: String, value: String, expected: &'static str },
    #[error("node '{node}' ({op}): {message}")]
    Node { node: String, op: &'static str, message: String },
    #[error(transparent)]
    Graph(#[from] GraphError),
    #[error("{0}")]
    Other(String),
}

impl PassError {
    pub fn node(node: &str, op: qcc_ir::OpKind, message: impl Into<String>) -> PassError {
        PassError::Node { node: node.to_string(), op: op.name(), message: message.into() }
    }
}

/// The type of an option's value, used to validate defaults and to document the option.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OptionKind {
    Bool,
    Int,
    Float,
    Str,
}

impl OptionKind {
    fn expected(self) -> &'static str {
        match self {
            OptionKind::Bool => "a boolean (true/false)",
            OptionKind::Int => "a non-negative integer",
            OptionKind::Float => "a number",
            OptionKind::Str => "a string",
        }
    }
}

/// One option a pass accepts.
#[derive(Clone, Copy, Debug)]
pub struct OptionSpec {
    pub key: &'static str,
    pub kind: OptionKind,
    /// The default, written as it would appear in a pipeline string.
    pub default: &'static str,
    pub help: &'static str,
}

/// Options of one pipeline entry, validated against the pass's `OptionSpec`s. Keys not given take the
/// declared default.
#[derive(Clone, Debug)]
pub struct PassOptions {
    pass: String,
    specs: &'static [OptionSpec],
    values: BTreeMap<String, String>,
}

impl PassOptions {
    /// Validates `values` (as written by the user) against `specs`.
    pub fn new(
        pass: &str,
        specs: &'static [OptionSpec],
        values: BTreeMap<String, String>,
    ) -> Result<PassOptions, PassError> {
        let options = PassOptions { pass: pass.to_string(), specs, values };
        for key in options.values.keys() {
            let Some(spec) = specs.iter().find(|s| s.key == key) else {
                let valid = if specs.is_empty() {
                    "none".to_string()
                } else {
                    specs.iter().map(|s| s.key).collect::<Vec<_>>().join(", ")
                };
                return Err(PassError::UnknownOption { pass: pass.to_string(), key: key.clone(), valid });
            };
            // Checking the type here makes a bad value fail at pipeline-parse time, not mid-run.
            options.check(spec)?;
        }
        Ok(options)
    }

    /// Options with every key at its default.
    pub fn defaults(pass: &str, specs: &'static [OptionSpec]) -> PassOptions {
        PassOptions { pass: pass.to_string(), specs, values: BTreeMap::new() }
    }

    /// The explicitly given options, in key order (for printing the pipeline back).
    pub fn explicit(&self) -> &BTreeMap<String, String> {
        &self.values
    }

    fn check(&self, spec: &OptionSpec) -> Result<(), PassError> {
        match spec.kind {
            OptionKind::Bool => self.bool(spec.key).map(drop),
            OptionKind::Int => self.usize(spec.key).map(drop),
            OptionKind::Float => self.f64(spec.key).map(drop),
            OptionKind::Str => Ok(()),
        }
    }

    fn raw(&self, key: &str) -> Result<&str, PassError> {
        if let Some(v) = self.values.get(key) {
            return Ok(v);
        }
        match self.specs.iter().find(|s| s.key == key) {
            Some(spec) => Ok(spec.default),
            None => Err(PassError::UnknownOption {
                pass: self.pass.clone(),
                key: key.to_string(),
                valid: self.specs.iter().map(|s| s.key).collect::<Vec<_>>().join(", "),
            }),
        }
    }

    fn bad(&self, key: &str, value: &str, kind: OptionKind) -> PassError {
        PassError::BadOptionValue {
            pass: self.pass.clone(),
            key: key.to_string(),
            value: value.to_string(),
            expected: kind.expected(),
        }
    }

    pub fn bool(&self, key: &str) -> Result<bool, PassError> {
        let raw = self.raw(key)?;
        match raw {
            "true" | "1" => Ok(true),
            "false" | "0" => Ok(false),
            _ => Err(self.bad(key, raw, OptionKind::Bool)),
        }
    }

    pub fn usize(&self, key: &str) -> Result<usize, PassError> {
        let raw = self.raw(key)?;
        raw.parse().map_err(|_| self.bad(key, raw, OptionKind::Int))
    }

    pub fn f64(&self, key: &str) -> Result<f64, PassError> {
        let raw = self.raw(key)?;
        raw.parse::<f64>().ok().filter(|v| v.is_finite()).ok_or_else(|| self.bad(key, raw, OptionKind::Float))
    }

    pub fn str(&self, key: &str) -> Result<&str, PassError> {
        self.raw(key)
    }
}

impl fmt::Display for PassOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.values.is_empty() {
            return Ok(());
        }
        f.write_str("{")?;
        for (i, (k, v)) in self.values.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{k}={v}")?;
        }
        f.write_str("}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPECS: &[OptionSpec] = &[
        OptionSpec { key: "alpha", kind: OptionKind::Float, default: "0.5", help: "migration strength" },
        OptionSpec { key: "limit", kind: OptionKind::Int, default: "10", help: "max" },
        OptionSpec { key: "fast", kind: OptionKind::Bool, default: "false", help: "" },
    ];

    fn opts(pairs: &[(&str, &str)]) -> Result<PassOptions, PassError> {
        PassOptions::new("smooth", SPECS, pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    #[test]
    fn typed_accessors_and_defaults() {
        let o = opts(&[("alpha", "0.25"), ("fast", "true")]).unwrap();
        assert_eq!(o.f64("alpha").unwrap(), 0.25);
        assert_eq!(o.usize("limit").unwrap(), 10);
        assert!(o.bool("fast").unwrap());
        assert_eq!(o.to_string(), "{alpha=0.25,fast=true}");
    }

    #[test]
    fn unknown_key_lists_valid_keys() {
        let err = opts(&[("beta", "1")]).unwrap_err().to_string();
        assert!(err.contains("'beta'") && err.contains("alpha, limit, fast"), "{err}");
    }

    #[test]
    fn bad_values_are_rejected_at_parse_time() {
        let err = opts(&[("limit", "-3")]).unwrap_err().to_string();
        assert!(err.contains("'limit' = '-3'") && err.contains("non-negative integer"), "{err}");
        assert!(opts(&[("alpha", "nan")]).is_err());
        assert!(opts(&[("fast", "yes")]).is_err());
    }

    #[test]
    fn rewrite_budget_counts_down() {
        let mut ctx = PassContext::new();
        assert!(ctx.try_rewrite());
        ctx.set_rewrite_budget(Some(2));
        assert!(ctx.try_rewrite() && ctx.try_rewrite());
        assert!(!ctx.try_rewrite());
        assert_eq!(ctx.rewrite_budget(), Some(0));
    }
}
