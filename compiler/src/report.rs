//! `qcc compile --report report.json` and `qcc report report.json`: per-layer quantization diagnostics
//! for users whose accuracy dropped (which layers lose the most, what the clipping chose, where the
//! outlier channels were before and after the transforms).

use anyhow::{bail, Context, Result};
use qcc_ir::Graph;
use qcc_passes::report::{LayerReport, Outliers, QuantReport, REPORT_VERSION};
use qcc_passes::{PassContext, PassManager, Registry, StatsRequest};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::path::Path;

/// Outliers of every linear's input on the graph as imported (structural passes only, so linears
/// exist), keyed by the linear's output name. Position 0 (the attention sink) is left out, as the
/// quantized pipelines keep it in 16 bits.
pub fn outliers_before(graph: &Graph, ctx_template: &PassContext) -> Result<HashMap<String, Outliers>> {
    let mut g = graph.clone();
    let pipeline = Registry::standard().parse_pipeline(qcc_passes::pipelines::STRUCTURAL)?;
    let mut ctx = ctx_template.fork_calibration();
    PassManager::new(pipeline).run_with_context(&mut g, &mut ctx, &mut [])?;
    let groups = qcc_passes::quantize::linear_groups(&g, "")?;
    let request = StatsRequest { values: groups.iter().map(|(x, _)| *x).collect(), ..Default::default() };
    let stats = ctx.activation_stats(&g, &request)?;
    let mut out = HashMap::new();
    for ((_, sites), st) in groups.iter().zip(stats) {
        let o = Outliers::from_absmax(&st.absmax_excluding_first);
        for site in sites {
            out.insert(g.value_name(qcc_ir::Value::new(site.node, 0)).to_string(), o.clone());
        }
    }
    Ok(out)
}

/// Completes the report the passes filled and writes it as JSON (temporary file + rename).
pub fn write(
    path: &Path,
    mut report: QuantReport,
    model: &Path,
    pipeline: &str,
    before: &HashMap<String, Outliers>,
) -> Result<()> {
    report.version = REPORT_VERSION;
    report.model = model.display().to_string();
    report.pipeline = pipeline.to_string();
    for layer in &mut report.layers {
        layer.outliers_before = before.get(&layer.name).cloned();
    }
    let json = serde_json::to_string_pretty(&report)?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, json).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

pub fn load(path: &Path) -> Result<QuantReport> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let report: QuantReport =
        serde_json::from_str(&text).with_context(|| format!("{}: not a qcc quantization report", path.display()))?;
    if report.version != REPORT_VERSION {
        bail!("{}: report version {} (this qcc reads version {REPORT_VERSION})", path.display(), report.version);
    }
    Ok(report)
}

fn db(v: Option<f64>) -> String {
    match v {
        Some(x) if x.is_infinite() => "exact".into(),
        Some(x) => format!("{x:.1}"),
        None => "-".into(),
    }
}

fn top(o: &Outliers) -> String {
    let chans: Vec<String> = o.top.iter().take(3).map(|(c, v)| format!("{c}:{v:.3}")).collect();
    format!("{} (x{:.0})", chans.join(" "), o.max_over_median)
}

fn row(l: &LayerReport) -> String {
    format!(
        "{:<44} {:>5}x{:<5} w{}a{:<2} {:>6} {:>6} {:>8} {:>5.2}/{:<5.2} {:>5.2}/{:<5.2}",
        l.name,
        l.out_channels,
        l.in_channels,
        l.weight_bits,
        l.act_bits,
        db(Some(l.weight_sqnr_db)),
        db(l.act_sqnr_db),
        l.output_rel_error.map(|e| format!("{:.4}", e)).unwrap_or_else(|| "-".into()),
        l.act_clip_mean,
        l.act_clip_min,
        l.weight_clip_mean,
        l.weight_clip_min,
    )
}

/// The readable table `qcc report` prints: every layer in graph order, then the worst by output error
/// with their outlier channels before and after the transforms.
pub fn render(report: &QuantReport, worst: usize) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "model:    {}\npipeline: {}\n", report.model, report.pipeline);
    let _ = writeln!(
        s,
        "{:<44} {:>11} {:<6} {:>6} {:>6} {:>8} {:>11} {:>11}",
        "layer", "shape", "bits", "W dB", "X dB", "out err", "act clip", "w clip"
    );
    let _ = writeln!(
        s,
        "{:<44} {:>11} {:<6} {:>6} {:>6} {:>8} {:>11} {:>11}",
        "", "", "", "", "", "", "mean/min", "mean/min"
    );
    for l in &report.layers {
        let _ = writeln!(s, "{}", row(l));
    }
    let mut ranked: Vec<&LayerReport> = report.layers.iter().filter(|l| l.output_rel_error.is_some()).collect();
    ranked.sort_by(|a, b| b.output_rel_error.partial_cmp(&a.output_rel_error).unwrap_or(std::cmp::Ordering::Equal));
    if !ranked.is_empty() {
        let _ = writeln!(
            s,
            "\nworst {} layers by output error (top input channels as channel:absmax, x = max/median):",
            worst.min(ranked.len())
        );
        for l in ranked.iter().take(worst) {
            let before = l.outliers_before.as_ref().map(top).unwrap_or_else(|| "-".into());
            let _ = writeln!(
                s,
                "  {:<44} err {:.4}  before: {}  after: {}",
                l.name,
                l.output_rel_error.unwrap_or(0.0),
                before,
                top(&l.outliers_after)
            );
        }
        let mean = ranked.iter().filter_map(|l| l.output_rel_error).sum::<f64>() / ranked.len() as f64;
        let _ = writeln!(s, "\nmean output error over {} layers: {mean:.4}", ranked.len());
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(name: &str, err: f64) -> LayerReport {
        LayerReport {
            name: name.into(),
            out_channels: 4,
            in_channels: 8,
            weight_bits: 4,
            act_bits: 4,
            weight_sqnr_db: 18.0,
            act_sqnr_db: Some(15.0),
            output_rel_error: Some(err),
            outliers_after: Outliers::from_absmax(&[1.0, 9.0, 2.0]),
            ..Default::default()
        }
    }

    #[test]
    fn report_round_trips_and_ranks_the_worst_layer_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.json");
        let report = QuantReport { layers: vec![layer("a", 0.1), layer("b", 0.4)], ..Default::default() };
        let before = HashMap::from([("b".to_string(), Outliers::from_absmax(&[100.0, 1.0, 1.0]))]);
        write(&path, report, Path::new("m.onnx"), "quantize", &before).unwrap();
        let back = load(&path).unwrap();
        assert_eq!(back.layers[1].outliers_before.as_ref().unwrap().top[0], (0, 100.0));
        let text = render(&back, 1);
        let worst = text.lines().skip_while(|l| !l.starts_with("worst")).nth(1).unwrap();
        assert!(worst.contains(" b ") || worst.trim_start().starts_with("b "), "{text}");
        assert!(worst.contains("0:100.000"), "{worst}");
    }

    #[test]
    fn wrong_version_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.json");
        std::fs::write(&path, r#"{"version":99,"model":"m","pipeline":"p","layers":[]}"#).unwrap();
        let e = load(&path).unwrap_err().to_string();
        assert!(e.contains("version 99"), "{e}");
    }
}
