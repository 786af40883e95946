//! The daemon benchmark's charts, drawn as SVG from the figures each run hands back: the cold
//! start against the number of Services, beside `ipvsadm -R` of the same rules; the peak RSS
//! against the number of Services; and the distribution of one change's latency.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use plotters::prelude::*;
use serde_json::Value;

/// A line of a chart: its name, colour and points.
struct Line {
    name: &'static str,
    colour: RGBColor,
    points: Vec<(f64, f64)>,
}

fn seconds(run: &Value, phase: &str, name: &str) -> Option<f64> {
    run[phase]["seconds"][name].as_f64()
}

fn figure(run: &Value, phase: &str, name: &str) -> Option<f64> {
    run[phase]["figures"][name].as_f64()
}

fn services(run: &Value) -> f64 {
    run["services"].as_f64().unwrap_or_default()
}

/// The runs to chart: every `fresh` run, and each `earlier` one of a size (Services,
/// endpoints, nodes) not measured afresh. Returns them, and the sizes kept.
pub(crate) fn merge(earlier: Vec<Value>, fresh: Vec<Value>) -> (Vec<Value>, Vec<f64>) {
    let size =
        |run: &Value| (run["services"].clone(), run["endpoints"].clone(), run["nodes"].clone());
    let mut kept = Vec::new();
    let mut runs = Vec::new();
    for run in earlier {
        if !fresh.iter().any(|f| size(f) == size(&run)) {
            kept.push(services(&run));
            runs.push(run);
        }
    }
    runs.extend(fresh);
    (runs, kept)
}

/// Draws every chart into `dir`; returns the files written.
pub(crate) fn draw(runs: &[Value], dir: &Path) -> Result<Vec<PathBuf>> {
    let mut runs: Vec<&Value> = runs.iter().collect();
    runs.sort_by(|a, b| services(a).total_cmp(&services(b)));
    let per_size =
        |phase: &'static str, name: &'static str, value: fn(&Value, &str, &str) -> Option<f64>| {
            runs.iter().filter_map(|run| Some((services(run), value(run, phase, name)?))).collect()
        };
    let cold = [
        Line {
            name: "kube-ipvs through the API",
            colour: BLUE,
            points: per_size("api", "cold", seconds),
        },
        Line {
            name: "kube-ipvs through --manifests",
            colour: GREEN,
            points: per_size("manifests", "cold", seconds),
        },
        Line {
            name: "ipvsadm -R of the same rules",
            colour: RED,
            points: runs
                .iter()
                .filter_map(|r| Some((services(r), r["baseline"].as_f64()?)))
                .collect(),
        },
    ];
    let rss = [
        Line {
            name: "kube-ipvs through the API",
            colour: BLUE,
            points: per_size("api", "rss", figure),
        },
        Line {
            name: "kube-ipvs through --manifests",
            colour: GREEN,
            points: per_size("manifests", "rss", figure),
        },
    ];
    let mut written = Vec::new();
    let file = dir.join("cold-start.svg");
    against_services(
        &file,
        "Cold start: to every virtual server and destination",
        "seconds",
        &cold,
    )?;
    written.push(file);
    let file = dir.join("rss.svg");
    against_services(&file, "Peak RSS", "MiB", &rss)?;
    written.push(file);

    // The latency distribution at the largest size measured with every phase (the rolling
    // update and the variants run up to the size the targets are set at).
    let complete = |run: &&&Value| run["churn"].is_object();
    let largest = runs
        .iter()
        .rev()
        .find(complete)
        .or(runs.last())
        .ok_or_else(|| anyhow!("no run to chart"))?;
    let samples = |phase: &str, name: &str| -> Vec<f64> {
        largest[phase]["samples"][name]
            .as_array()
            .map(|v| v.iter().filter_map(Value::as_f64).map(|s| s * 1e3).collect())
            .unwrap_or_default()
    };
    let latency = [
        Line {
            name: "daemon-side sync",
            colour: BLUE,
            points: distribution(&samples("api", "daemon_side")),
        },
        Line {
            name: "API write to kernel, shipped configuration",
            colour: RED,
            points: distribution(&samples("api", "end_to_end")),
        },
        Line {
            name: "API write to kernel, minSyncPeriod 1s",
            colour: MAGENTA,
            points: distribution(&samples("min_sync_1s", "end_to_end")),
        },
        Line {
            name: "API write to watch event (the API server alone)",
            colour: BLACK,
            points: distribution(&samples("delivery", "delivery")),
        },
        Line {
            name: "rolling update, API write to kernel",
            colour: GREEN,
            points: distribution(&samples("churn", "latency")),
        },
    ];
    let file = dir.join("latency.svg");
    let title = format!("One endpoint change at {} Services: share done within", services(largest));
    cumulative(&file, &title, &latency)?;
    written.push(file);
    Ok(written)
}

/// The empirical distribution of `samples`: (value, share of samples at most that).
fn distribution(samples: &[f64]) -> Vec<(f64, f64)> {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len() as f64;
    sorted.iter().enumerate().map(|(i, v)| (*v, (i + 1) as f64 / n)).collect()
}

fn draw_err<E: std::fmt::Debug>(err: E) -> anyhow::Error {
    anyhow!("drawing a chart: {err:?}")
}

fn upper(lines: &[Line], axis: fn(&(f64, f64)) -> f64) -> f64 {
    let max = lines.iter().flat_map(|l| &l.points).map(axis).fold(0.0, f64::max);
    if max > 0.0 { max * 1.1 } else { 1.0 }
}

/// Lines against the number of Services.
fn against_services(file: &Path, title: &str, unit: &str, lines: &[Line]) -> Result<()> {
    let root = SVGBackend::new(file, (720, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..upper(lines, |p| p.0), 0.0..upper(lines, |p| p.1))
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_desc("Services (10 endpoints each)")
        .y_desc(unit)
        .draw()
        .map_err(draw_err)?;
    for line in lines.iter().filter(|l| !l.points.is_empty()) {
        let colour = line.colour;
        chart
            .draw_series(LineSeries::new(line.points.clone(), colour.stroke_width(2)))
            .map_err(draw_err)?
            .label(line.name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
            });
        chart
            .draw_series(line.points.iter().map(|p| Circle::new(*p, 4, colour.filled())))
            .map_err(draw_err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(draw_err)?;
    root.present().map_err(draw_err).with_context(|| file.display().to_string())
}

/// Cumulative distributions, on a logarithmic time axis.
fn cumulative(file: &Path, title: &str, lines: &[Line]) -> Result<()> {
    let root = SVGBackend::new(file, (720, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_err)?;
    let low = lines
        .iter()
        .flat_map(|l| &l.points)
        .map(|p| p.0)
        .filter(|v| *v > 0.0)
        .fold(f64::INFINITY, f64::min);
    let low = if low.is_finite() { low / 1.5 } else { 0.1 };
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((low..upper(lines, |p| p.0)).log_scale(), 0.0..1.0)
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_desc("milliseconds")
        .y_desc("share of changes")
        .draw()
        .map_err(draw_err)?;
    for line in lines.iter().filter(|l| !l.points.is_empty()) {
        let colour = line.colour;
        let points = line.points.iter().map(|(x, y)| (x.max(low), *y));
        chart
            .draw_series(LineSeries::new(points, colour.stroke_width(2)))
            .map_err(draw_err)?
            .label(line.name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(draw_err)?;
    root.present().map_err(draw_err).with_context(|| file.display().to_string())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// A run as the guest writes it, with made-up figures.
    fn run(services: usize, cold: f64, baseline: f64, rss: f64) -> Value {
        let phase = |cold: f64| {
            json!({"seconds": {"cold": cold}, "figures": {"rss": rss},
                   "samples": {"daemon_side": [0.001, 0.002], "end_to_end": [0.005, 0.9],
                               "delivery": [0.001, 0.003], "latency": [0.004, 0.02]}})
        };
        json!({"services": services, "baseline": baseline, "api": phase(cold),
               "manifests": phase(cold / 2.0), "min_sync_1s": phase(cold), "churn": phase(cold),
               "delivery": phase(cold)})
    }

    #[test]
    fn a_fresh_run_replaces_the_earlier_one_of_its_size_and_keeps_the_others() {
        let run = |services: u64, cold: f64| json!({"services": services, "endpoints": 10, "nodes": 100, "api": {"seconds": {"cold": cold}}});
        let earlier = vec![run(1_000, 7.0), run(10_000, 26.0)];
        let (runs, kept) = merge(earlier, vec![run(10_000, 20.0), run(50_000, 130.0)]);
        assert_eq!(kept, [1_000.0]);
        let cold: Vec<(f64, f64)> =
            runs.iter().map(|r| (services(r), seconds(r, "api", "cold").unwrap())).collect();
        assert_eq!(cold, [(1_000.0, 7.0), (10_000.0, 20.0), (50_000.0, 130.0)]);
    }

    #[test]
    fn every_chart_is_drawn_with_its_lines_named() {
        let dir = std::env::temp_dir().join(format!("charts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // The largest size runs without the variants and the rolling update.
        let mut largest = run(50_000, 80.0, 110.0, 190.0);
        for phase in ["min_sync_1s", "churn"] {
            largest[phase] = Value::Null;
        }
        let runs = [run(1_000, 4.0, 2.2, 24.0), largest, run(10_000, 14.5, 21.3, 63.0)];
        let written = draw(&runs, &dir).unwrap();
        let names: Vec<String> =
            written.iter().map(|f| f.file_name().unwrap().to_string_lossy().into()).collect();
        assert_eq!(names, ["cold-start.svg", "rss.svg", "latency.svg"]);
        let cold = std::fs::read_to_string(dir.join("cold-start.svg")).unwrap();
        for label in ["kube-ipvs through the API", "ipvsadm -R of the same rules", "50000"] {
            assert!(cold.contains(label), "{label} missing from the cold-start chart");
        }
        let latency = std::fs::read_to_string(dir.join("latency.svg")).unwrap();
        assert!(latency.contains("minSyncPeriod 1s") && latency.contains("10000 Services"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_distribution_ends_at_every_sample() {
        let points = distribution(&[3.0, 1.0, 2.0, 4.0]);
        assert_eq!(points, [(1.0, 0.25), (2.0, 0.5), (3.0, 0.75), (4.0, 1.0)]);
    }
}
