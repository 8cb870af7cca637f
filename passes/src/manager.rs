//! The pass manager: runs a pipeline, verifies the IR after every pass, wraps any failure with the pass's
//! name and position, and calls instrumentation hooks around each pass application.
//!
//! Inspection features are instrumentations (as in MLIR's `PassInstrumentation`) so the CLI composes
//! them freely: [`PassStats`] (`--pass-stats`), [`PrintIr`] (`--print-ir-before/after/after-all/
//! after-change`), [`DumpDir`] (`--dump-dir`), [`StopAfter`] (`--stop-after`) and [`Bisect`]
//! (`--bisect=N`, plus a global rewrite budget for bisecting inside one pass). Printing takes a
//! `Fn(&Graph) -> String` from the caller, so this crate does not depend on the text printer.

use crate::pass::{PassContext, PassError, PassOutcome};
use crate::registry::Pipeline;
use crate::verify::{verify, VerifyError};
use qcc_ir::Graph;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Identifies one pass application.
#[derive(Clone, Copy, Debug)]
pub struct PassRun<'a> {
    /// Position in the pipeline, from 0.
    pub index: usize,
    /// Number of entries in the pipeline.
    pub total: usize,
    pub name: &'a str,
    /// The entry as written in the pipeline, with its options.
    pub text: &'a str,
}

/// What happened in one pass application, as instrumentations see it afterwards.
#[derive(Clone, Debug)]
pub struct PassReport {
    pub outcome: PassOutcome,
    /// Wall time of the pass itself (not the verifier or instrumentation).
    pub wall: Duration,
    pub nodes_before: usize,
    pub nodes_after: usize,
    /// Remarks the pass recorded with `PassContext::note`.
    pub notes: Vec<String>,
}

/// Whether the pipeline goes on after a hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

#[derive(Debug, thiserror::Error)]
pub enum InstrumentationError {
    #[error("cannot write {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Other(String),
}

/// Hooks called around every pass application. All methods default to doing nothing.
pub trait Instrumentation {
    /// Called once with the input graph before the first pass.
    fn start(&mut self, _graph: &Graph) -> Result<(), InstrumentationError> {
        Ok(())
    }

    /// Called before a pass runs; returning `Flow::Stop` ends the pipeline without running it. The
    /// context is mutable so an instrumentation can set the rewrite budget.
    fn before_pass(
        &mut self,
        _run: &PassRun,
        _graph: &Graph,
        _ctx: &mut PassContext,
    ) -> Result<Flow, InstrumentationError> {
        Ok(Flow::Continue)
    }

    /// Called after a pass ran and the verifier accepted its output; `Flow::Stop` ends the pipeline.
    fn after_pass(
        &mut self,
        _run: &PassRun,
        _graph: &Graph,
        _report: &PassReport,
    ) -> Result<Flow, InstrumentationError> {
        Ok(Flow::Continue)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("the input graph is invalid: {0}")]
    InvalidInput(VerifyError),
    #[error("pass #{index} '{pass}' failed: {source}")]
    Pass { pass: String, index: usize, source: PassError },
    #[error("IR is invalid after pass #{index} '{pass}': {source}")]
    Verify { pass: String, index: usize, source: VerifyError },
    #[error("instrumentation failed at pass #{index} '{pass}': {source}")]
    Instrumentation { pass: String, index: usize, source: InstrumentationError },
}

/// What a pipeline run did.
#[derive(Clone, Debug, Default)]
pub struct RunSummary {
    /// Pass applications that ran, with their reports, in order.
    pub applied: Vec<(String, PassReport)>,
    /// Why the run ended before the last pass, if it did.
    pub stopped_early: Option<String>,
}

pub struct PassManager {
    pipeline: Pipeline,
    verify_each: bool,
}

impl PassManager {
    pub fn new(pipeline: Pipeline) -> PassManager {
        PassManager { pipeline, verify_each: true }
    }

    /// Turns the verifier after each pass off (it still runs on the input). Only for measuring passes.
    pub fn without_verifier(mut self) -> PassManager {
        self.verify_each = false;
        self
    }

    pub fn pipeline(&self) -> &Pipeline {
        &self.pipeline
    }

    /// Runs the pipeline on `graph` with the given instrumentations (called in order).
    pub fn run(
        &self,
        graph: &mut Graph,
        instrumentations: &mut [&mut dyn Instrumentation],
    ) -> Result<RunSummary, ManagerError> {
        self.run_with_context(graph, &mut PassContext::new(), instrumentations)
    }

    /// Like [`PassManager::run`], with a caller-provided context (e.g. one carrying a calibration set).
    pub fn run_with_context(
        &self,
        graph: &mut Graph,
        ctx: &mut PassContext,
        instrumentations: &mut [&mut dyn Instrumentation],
    ) -> Result<RunSummary, ManagerError> {
        verify(graph).map_err(ManagerError::InvalidInput)?;
        let total = self.pipeline.len();
        let start_err = |source| ManagerError::Instrumentation { pass: "<input>".into(), index: 0, source };
        for inst in instrumentations.iter_mut() {
            inst.start(graph).map_err(start_err)?;
        }
        let mut summary = RunSummary::default();
        for (index, entry) in self.pipeline.entries.iter().enumerate() {
            let text = entry.text();
            let name = entry.name();
            let run = PassRun { index, total, name, text: &text };
            let inst_err = |source| ManagerError::Instrumentation { pass: name.to_string(), index, source };

            let mut flow = Flow::Continue;
            for inst in instrumentations.iter_mut() {
                if inst.before_pass(&run, graph, ctx).map_err(inst_err)? == Flow::Stop {
                    flow = Flow::Stop;
                }
            }
            if flow == Flow::Stop {
                summary.stopped_early = Some(format!("stopped before pass #{index} '{name}'"));
                break;
            }

            let nodes_before = graph.node_count();
            let started = Instant::now();
            let outcome = entry.pass.run(graph, ctx).map_err(|source| ManagerError::Pass {
                pass: name.to_string(),
                index,
                source,
            })?;
            if outcome.changed {
                // Activation statistics of the old graph no longer describe this one.
                ctx.graph_changed();
            }
            let wall = started.elapsed();
            if self.verify_each {
                verify(graph).map_err(|source| ManagerError::Verify { pass: name.to_string(), index, source })?;
            }
            let report =
                PassReport { outcome, wall, nodes_before, nodes_after: graph.node_count(), notes: ctx.take_notes() };

            for inst in instrumentations.iter_mut() {
                if inst.after_pass(&run, graph, &report).map_err(inst_err)? == Flow::Stop {
                    flow = Flow::Stop;
                }
            }
            summary.applied.push((name.to_string(), report));
            if flow == Flow::Stop && index + 1 < total {
                summary.stopped_early = Some(format!("stopped after pass #{index} '{name}'"));
                break;
            }
        }
        Ok(summary)
    }
}

/// Which passes a printing hook applies to.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum PassFilter {
    #[default]
    None,
    All,
    Named(Vec<String>),
}

impl PassFilter {
    pub fn matches(&self, name: &str) -> bool {
        match self {
            PassFilter::None => false,
            PassFilter::All => true,
            PassFilter::Named(names) => names.iter().any(|n| n == name),
        }
    }
}

/// Prints the IR before and/or after selected passes to a sink.
pub struct PrintIr<'a> {
    printer: Box<dyn Fn(&Graph) -> String + 'a>,
    sink: Box<dyn Write + 'a>,
    pub before: PassFilter,
    pub after: PassFilter,
    /// With `after`, print only when the pass reported a change (`--print-ir-after-change`).
    pub only_changed: bool,
}

impl<'a> PrintIr<'a> {
    pub fn new(printer: impl Fn(&Graph) -> String + 'a, sink: impl Write + 'a) -> PrintIr<'a> {
        PrintIr {
            printer: Box::new(printer),
            sink: Box::new(sink),
            before: PassFilter::None,
            after: PassFilter::None,
            only_changed: false,
        }
    }

    fn emit(&mut self, header: &str, graph: &Graph) -> Result<(), InstrumentationError> {
        let text = (self.printer)(graph);
        writeln!(self.sink, "// *** {header} ***\n{text}")
            .map_err(|source| InstrumentationError::Io { path: PathBuf::from("<ir output>"), source })
    }
}

impl Instrumentation for PrintIr<'_> {
    fn before_pass(&mut self, run: &PassRun, graph: &Graph, _: &mut PassContext) -> Result<Flow, InstrumentationError> {
        if self.before.matches(run.name) {
            self.emit(&format!("IR before pass #{} '{}'", run.index, run.text), graph)?;
        }
        Ok(Flow::Continue)
    }

    fn after_pass(&mut self, run: &PassRun, graph: &Graph, report: &PassReport) -> Result<Flow, InstrumentationError> {
        if self.after.matches(run.name) && (!self.only_changed || report.outcome.changed) {
            self.emit(&format!("IR after pass #{} '{}'", run.index, run.text), graph)?;
        }
        Ok(Flow::Continue)
    }
}

/// One row of `--pass-stats`.
#[derive(Clone, Debug)]
pub struct PassStat {
    pub index: usize,
    pub name: String,
    pub report: PassReport,
}

/// Records wall time, node counts and rewrites of every pass application.
#[derive(Debug, Default)]
pub struct PassStats {
    pub rows: Vec<PassStat>,
}

impl PassStats {
    pub fn new() -> PassStats {
        PassStats::default()
    }

    /// A fixed-width table, one row per pass application plus a total.
    pub fn render(&self) -> String {
        let width = self.rows.iter().map(|r| r.name.len()).max().unwrap_or(4).max(4);
        let mut out = format!(
            "{:>3}  {:width$}  {:>10}  {:>8}  {:>8}  {:>8}  changed\n",
            "#", "pass", "ms", "nodes", "->", "rewrites"
        );
        let mut total = Duration::ZERO;
        for r in &self.rows {
            total += r.report.wall;
            out.push_str(&format!(
                "{:>3}  {:width$}  {:>10.3}  {:>8}  {:>8}  {:>8}  {}\n",
                r.index,
                r.name,
                r.report.wall.as_secs_f64() * 1e3,
                r.report.nodes_before,
                r.report.nodes_after,
                r.report.outcome.rewrites,
                if r.report.outcome.changed { "yes" } else { "no" },
            ));
            for note in &r.report.notes {
                out.push_str(&format!("     {:width$}  note: {note}\n", ""));
            }
        }
        out.push_str(&format!("     {:width$}  {:>10.3}\n", "total", total.as_secs_f64() * 1e3));
        out
    }
}

impl Instrumentation for PassStats {
    fn after_pass(&mut self, run: &PassRun, _: &Graph, report: &PassReport) -> Result<Flow, InstrumentationError> {
        self.rows.push(PassStat { index: run.index, name: run.name.to_string(), report: report.clone() });
        Ok(Flow::Continue)
    }
}

/// Writes `00-input.qir` and then one `NN-<pass>.qir` per pass application into a directory.
pub struct DumpDir<'a> {
    dir: PathBuf,
    printer: Box<dyn Fn(&Graph) -> String + 'a>,
    pub written: Vec<PathBuf>,
}

impl<'a> DumpDir<'a> {
    pub fn new(dir: impl AsRef<Path>, printer: impl Fn(&Graph) -> String + 'a) -> DumpDir<'a> {
        DumpDir { dir: dir.as_ref().to_path_buf(), printer: Box::new(printer), written: Vec::new() }
    }

    fn write(&mut self, file: String, graph: &Graph) -> Result<(), InstrumentationError> {
        let path = self.dir.join(file);
        std::fs::write(&path, (self.printer)(graph))
            .map_err(|source| InstrumentationError::Io { path: path.clone(), source })?;
        self.written.push(path);
        Ok(())
    }
}

impl Instrumentation for DumpDir<'_> {
    fn start(&mut self, graph: &Graph) -> Result<(), InstrumentationError> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|source| InstrumentationError::Io { path: self.dir.clone(), source })?;
        self.write("00-input.qir".to_string(), graph)
    }

    fn after_pass(&mut self, run: &PassRun, graph: &Graph, _: &PassReport) -> Result<Flow, InstrumentationError> {
        self.write(format!("{:02}-{}.qir", run.index + 1, run.name), graph)?;
        Ok(Flow::Continue)
    }
}

/// Stops the pipeline after the first application of the named pass.
#[derive(Debug)]
pub struct StopAfter {
    pub pass: String,
}

impl StopAfter {
    /// Fails when the pipeline never runs `pass`, so a typo does not silently run everything.
    pub fn new(pass: &str, pipeline: &Pipeline) -> Result<StopAfter, InstrumentationError> {
        if pipeline.entries.iter().any(|e| e.name() == pass) {
            Ok(StopAfter { pass: pass.to_string() })
        } else {
            Err(InstrumentationError::Other(format!(
                "--stop-after={pass}: the pipeline '{pipeline}' does not run '{pass}'"
            )))
        }
    }
}

impl Instrumentation for StopAfter {
    fn after_pass(&mut self, run: &PassRun, _: &Graph, _: &PassReport) -> Result<Flow, InstrumentationError> {
        Ok(if run.name == self.pass { Flow::Stop } else { Flow::Continue })
    }
}

/// Runs only the first `applications` pass applications and/or only the first `rewrites` individual
/// rewrites (counted over the whole pipeline by passes that ask `PassContext::try_rewrite`).
#[derive(Debug, Default)]
pub struct Bisect {
    pub applications: Option<usize>,
    pub rewrites: Option<usize>,
}

impl Bisect {
    pub fn applications(n: usize) -> Bisect {
        Bisect { applications: Some(n), rewrites: None }
    }

    pub fn rewrites(n: usize) -> Bisect {
        Bisect { applications: None, rewrites: Some(n) }
    }
}

impl Instrumentation for Bisect {
    fn before_pass(&mut self, run: &PassRun, _: &Graph, ctx: &mut PassContext) -> Result<Flow, InstrumentationError> {
        if run.index == 0 && self.rewrites.is_some() {
            ctx.set_rewrite_budget(self.rewrites);
        }
        Ok(match self.applications {
            Some(n) if run.index >= n => Flow::Stop,
            _ => Flow::Continue,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pass::{Pass, PassOptions};
    use crate::registry::{PassEntry, Registry};
    use qcc_ir::{DType, Op, OpKind, Tensor, TensorType};

    fn ty() -> TensorType {
        TensorType::known(DType::F32, &[2])
    }

    /// x -> neg -> (mul by 1) -> y, plus a dead exp and a foldable constant add.
    fn sample() -> Graph {
        let mut g = Graph::new("sample");
        let x = g.add_input("x", ty()).unwrap();
        let one = g.add_constant("one", Tensor::scalar(1f32)).unwrap();
        let n = g.add_op(Op::new(OpKind::Neg), &[x], ty());
        let m = g.add_op(Op::new(OpKind::Mul), &[n, one], ty());
        let _dead = g.add_op(Op::new(OpKind::Exp), &[x], ty());
        g.add_output("y", m);
        g
    }

    fn printer(g: &Graph) -> String {
        format!("graph {} with {} nodes", g.name, g.node_count())
    }

    fn manager(text: &str) -> PassManager {
        PassManager::new(Registry::standard().parse_pipeline(text).unwrap())
    }

    #[test]
    fn stats_print_after_all_and_after_change() {
        let mut g = sample();
        let mut stats = PassStats::new();
        let mut out = Vec::new();
        let mut changed_only = Vec::new();
        {
            let mut all = PrintIr::new(printer, &mut out);
            all.after = PassFilter::All;
            let mut change = PrintIr::new(printer, &mut changed_only);
            change.after = PassFilter::All;
            change.only_changed = true;
            let pm = manager("eliminate-dead-code,eliminate-dead-code,canonicalize");
            let summary = pm.run(&mut g, &mut [&mut stats, &mut all, &mut change]).unwrap();
            assert_eq!(summary.applied.len(), 3);
            assert!(summary.stopped_early.is_none());
        }
        let out = String::from_utf8(out).unwrap();
        assert_eq!(out.matches("IR after pass").count(), 3, "{out}");
        assert!(out.contains("IR after pass #0 'eliminate-dead-code' ***\ngraph sample with 4 nodes"), "{out}");
        let changed_only = String::from_utf8(changed_only).unwrap();
        // The second DCE finds nothing, so only passes #0 and #2 print.
        assert!(
            changed_only.contains("#0") && !changed_only.contains("#1") && changed_only.contains("#2"),
            "{changed_only}"
        );
        let rows: Vec<(usize, usize, usize)> = stats
            .rows
            .iter()
            .map(|r| (r.report.nodes_before, r.report.nodes_after, r.report.outcome.rewrites))
            .collect();
        assert_eq!(rows[0], (5, 4, 1));
        assert_eq!(rows[1], (4, 4, 0));
        assert_eq!(rows[2].1, 2, "x -> neg remains");
        let table = stats.render();
        assert!(table.contains("canonicalize") && table.contains("note: egg: saturated"), "{table}");
    }

    #[test]
    fn print_before_and_after_named_passes() {
        let mut g = sample();
        let mut out = Vec::new();
        {
            let mut p = PrintIr::new(printer, &mut out);
            p.before = PassFilter::Named(vec!["canonicalize".into()]);
            p.after = PassFilter::Named(vec!["eliminate-dead-code".into()]);
            manager("eliminate-dead-code,canonicalize").run(&mut g, &mut [&mut p]).unwrap();
        }
        let out = String::from_utf8(out).unwrap();
        let headers: Vec<&str> = out.lines().filter(|l| l.starts_with("// ***")).collect();
        assert_eq!(
            headers,
            ["// *** IR after pass #0 'eliminate-dead-code' ***", "// *** IR before pass #1 'canonicalize' ***"]
        );
    }

    #[test]
    fn dump_dir_writes_numbered_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut g = sample();
        let mut dump = DumpDir::new(dir.path().join("ir"), printer);
        manager("fold-constants,eliminate-dead-code").run(&mut g, &mut [&mut dump]).unwrap();
        let names: Vec<String> =
            dump.written.iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["00-input.qir", "01-fold-constants.qir", "02-eliminate-dead-code.qir"]);
        let last = std::fs::read_to_string(&dump.written[2]).unwrap();
        assert_eq!(last, "graph sample with 4 nodes");
    }

    #[test]
    fn stop_after_and_bisect() {
        let pm = manager("fold-constants,eliminate-dead-code,canonicalize");
        let mut g = sample();
        let mut stop = StopAfter::new("eliminate-dead-code", pm.pipeline()).unwrap();
        let summary = pm.run(&mut g, &mut [&mut stop]).unwrap();
        assert_eq!(summary.applied.len(), 2);
        assert_eq!(summary.stopped_early.as_deref(), Some("stopped after pass #1 'eliminate-dead-code'"));
        assert!(StopAfter::new("fuse-attention", pm.pipeline()).is_err());

        let mut g = sample();
        let summary = pm.run(&mut g, &mut [&mut Bisect::applications(1)]).unwrap();
        assert_eq!(summary.applied.len(), 1);
        assert_eq!(g.node_count(), 5, "fold-constants had nothing to fold");
        let summary = pm.run(&mut sample(), &mut [&mut Bisect::applications(0)]).unwrap();
        assert!(summary.applied.is_empty());
    }

    #[test]
    fn bisect_by_rewrites_cuts_inside_a_pass() {
        let mut g = Graph::new("t");
        let x = g.add_input("x", ty()).unwrap();
        let mut dead = Vec::new();
        for _ in 0..3 {
            dead.push(g.add_op(Op::new(OpKind::Exp), &[x], ty()));
        }
        g.add_output("y", x);
        let pm = manager("eliminate-dead-code,eliminate-dead-code");
        let summary = pm.run(&mut g, &mut [&mut Bisect::rewrites(2)]).unwrap();
        let rewrites: Vec<usize> = summary.applied.iter().map(|(_, r)| r.outcome.rewrites).collect();
        assert_eq!(rewrites, [2, 0]);
        assert_eq!(g.node_count(), 2);
    }

    struct BreakGraph;
    impl Pass for BreakGraph {
        fn name(&self) -> &'static str {
            "break-graph"
        }
        fn description(&self) -> &'static str {
            "removes a node that is still read"
        }
        fn run(&self, graph: &mut Graph, _: &mut PassContext) -> Result<PassOutcome, PassError> {
            let victim = graph.node_ids().find(|&n| graph.node(n).op.kind == OpKind::Neg).unwrap();
            // Its reader's first input slot becomes empty: the verifier must catch it.
            graph.remove_node(victim);
            Ok(PassOutcome::rewrites(1))
        }
    }

    struct FailingPass;
    impl Pass for FailingPass {
        fn name(&self) -> &'static str {
            "always-fails"
        }
        fn description(&self) -> &'static str {
            "fails"
        }
        fn run(&self, _: &mut Graph, _: &mut PassContext) -> Result<PassOutcome, PassError> {
            Err(PassError::Other("nothing to see".into()))
        }
    }

    fn test_registry() -> Registry {
        let mut entries = crate::all_pass_entries();
        entries.push(PassEntry {
            name: "break-graph",
            description: "removes a node that is still read",
            options: &[],
            build: |_: &PassOptions| Ok(Box::new(BreakGraph)),
        });
        entries.push(PassEntry {
            name: "always-fails",
            description: "fails",
            options: &[],
            build: |_: &PassOptions| Ok(Box::new(FailingPass)),
        });
        Registry::from_entries(entries)
    }

    #[test]
    fn errors_name_the_pass_and_its_position() {
        let reg = test_registry();
        let pm = PassManager::new(reg.parse_pipeline("eliminate-dead-code,break-graph").unwrap());
        let err = pm.run(&mut sample(), &mut []).unwrap_err().to_string();
        assert!(err.starts_with("IR is invalid after pass #1 'break-graph'"), "{err}");
        assert!(err.contains("required input 0 is absent"), "{err}");
        let pm = PassManager::new(reg.parse_pipeline("always-fails").unwrap());
        let err = pm.run(&mut sample(), &mut []).unwrap_err().to_string();
        assert_eq!(err, "pass #0 'always-fails' failed: nothing to see");
    }
}
