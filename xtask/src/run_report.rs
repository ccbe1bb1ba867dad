//! A training run at a glance: `<run-dir>/report.png` (loss with its moving average, learning rate,
//! entropy of the mean code and throughput against the step) and `<run-dir>/report.txt` (a short
//! summary, with the accuracies of `<run-dir>/eval.json` when it exists).
//!
//! `metrics.jsonl` is read leniently with swav-train's own schema (`swav_train::metrics`): a line cut
//! short by a crash is skipped and counted, missing and `null` values are left out. The plot is drawn by plotters into a memory bitmap
//! with an embedded font (Noto Sans), so it needs no system fonts nor fontconfig, and is encoded as
//! PNG; both files are written atomically.

use std::path::{Path, PathBuf};
use std::sync::Once;

use anyhow::{bail, Context};
use plotters::prelude::*;
use swav_train::metrics::{self, MetricsFile, StepMetrics};

use swav_eval::frozen::EvalReport;

/// The numbers of `report.txt`.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    pub steps: usize,
    pub first_step: u64,
    pub last_step: u64,
    /// Distinct epochs seen.
    pub epochs: usize,
    pub final_loss: Option<f64>,
    /// The smallest loss and its step.
    pub min_loss: Option<(f64, u64)>,
    pub final_lr: Option<f64>,
    pub mean_images_per_s: Option<f64>,
    pub mean_data_wait: Option<f64>,
    pub final_cluster_entropy: Option<f64>,
    pub final_clusters_used: Option<u64>,
    pub elapsed_s: Option<f64>,
    /// Steps whose loss is missing or not finite.
    pub bad_losses: usize,
    pub skipped_lines: usize,
    pub eval: Option<EvalReport>,
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.filter(|v| v.is_finite()).fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

fn last<T: Copy>(rows: &[StepMetrics], f: impl Fn(&StepMetrics) -> Option<T>) -> Option<T> {
    rows.iter().rev().find_map(f)
}

/// Summarises metrics (and an evaluation, if any).
pub fn summarize(metrics: &MetricsFile, eval: Option<EvalReport>) -> Summary {
    let rows = &metrics.rows;
    let finite = |v: Option<f64>| v.filter(|x| x.is_finite());
    let mut epochs: Vec<u64> = rows.iter().filter_map(|r| r.epoch).collect();
    epochs.sort_unstable();
    epochs.dedup();
    let min_loss = rows.iter().filter_map(|r| finite(r.loss).map(|l| (l, r.step))).fold(
        None,
        |best: Option<(f64, u64)>, (l, s)| match best {
            Some((b, _)) if b <= l => best,
            _ => Some((l, s)),
        },
    );
    Summary {
        steps: rows.len(),
        first_step: rows.first().map_or(0, |r| r.step),
        last_step: rows.last().map_or(0, |r| r.step),
        epochs: epochs.len(),
        final_loss: last(rows, |r| finite(r.loss)),
        min_loss,
        final_lr: last(rows, |r| finite(r.lr)),
        mean_images_per_s: mean(rows.iter().filter_map(|r| r.images_per_s)),
        mean_data_wait: mean(rows.iter().filter_map(|r| r.data_wait)),
        final_cluster_entropy: last(rows, |r| finite(r.cluster_entropy)),
        final_clusters_used: last(rows, |r| r.clusters_used),
        elapsed_s: last(rows, |r| finite(r.elapsed_s)),
        bad_losses: rows.iter().filter(|r| finite(r.loss).is_none()).count(),
        skipped_lines: metrics.skipped_lines,
        eval,
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let opt = |v: Option<f64>, digits: usize| v.map_or("-".to_string(), |x| format!("{x:.digits$}"));
        writeln!(
            f,
            "steps            {} (step {} to {}), {} epoch(s)",
            self.steps, self.first_step, self.last_step, self.epochs
        )?;
        writeln!(
            f,
            "loss             final {}, min {}",
            opt(self.final_loss, 4),
            self.min_loss.map_or("-".into(), |(l, s)| format!("{l:.4} at step {s}"))
        )?;
        writeln!(f, "learning rate    final {}", self.final_lr.map_or("-".into(), |v| format!("{v:.3e}")))?;
        writeln!(f, "throughput       {} images/s (mean over steps)", opt(self.mean_images_per_s, 1))?;
        writeln!(
            f,
            "data wait        {} of step time (mean)",
            self.mean_data_wait.map_or("-".into(), |v| format!("{:.1}%", 100.0 * v))
        )?;
        writeln!(
            f,
            "clusters         entropy {} nats, {} used (last step)",
            opt(self.final_cluster_entropy, 3),
            self.final_clusters_used.map_or("-".into(), |v| v.to_string())
        )?;
        writeln!(f, "elapsed          {}", self.elapsed_s.map_or("-".into(), |s| format!("{s:.1} s")))?;
        if self.bad_losses > 0 {
            writeln!(f, "warning          {} step(s) without a finite loss", self.bad_losses)?;
        }
        if self.skipped_lines > 0 {
            writeln!(f, "warning          {} unreadable line(s) in metrics.jsonl skipped", self.skipped_lines)?;
        }
        if let Some(e) = &self.eval {
            let pct = |v: f64| format!("{:.2}%", 100.0 * v);
            writeln!(
                f,
                "eval             k-NN top-1 {}, linear probe top-1 {} (proxy: cached centre-crop features; {} train / {} test images)",
                pct(e.knn_top1),
                pct(e.linear_top1),
                e.train_images,
                e.test_images
            )?;
            if let Some(b) = &e.baseline {
                writeln!(
                    f,
                    "eval baseline    random init: k-NN top-1 {}, linear probe top-1 {}",
                    pct(b.scores.knn_top1),
                    pct(b.scores.linear_top1)
                )?;
            }
        }
        Ok(())
    }
}

/// Where [`write_report`] wrote.
#[derive(Clone, Debug)]
pub struct ReportFiles {
    pub png: PathBuf,
    pub txt: PathBuf,
    pub summary: Summary,
}

/// Reads `<run_dir>/metrics.jsonl` (and `eval.json` if present), writes `report.png` and `report.txt`
/// into the run folder.
pub fn write_report(run_dir: &Path) -> anyhow::Result<ReportFiles> {
    write_report_to(run_dir, &run_dir.join("eval.json"), run_dir)
}

/// Reads the metrics of `run_dir` and the evaluation at `eval_path` (when it exists), writes
/// `report.png` and `report.txt` into `out_dir`.
pub fn write_report_to(run_dir: &Path, eval_path: &Path, out_dir: &Path) -> anyhow::Result<ReportFiles> {
    let metrics_path = run_dir.join("metrics.jsonl");
    if !metrics_path.is_file() {
        bail!("{}: no metrics.jsonl: is this the run directory of `cargo xtask train`?", run_dir.display());
    }
    let metrics = metrics::read(&metrics_path)?;
    if metrics.rows.is_empty() {
        bail!("{}: no readable step in it yet", metrics_path.display());
    }
    let eval = if eval_path.is_file() { Some(EvalReport::read(eval_path)?) } else { None };
    let summary = summarize(&metrics, eval);
    let png = out_dir.join("report.png");
    swav_core::fs::atomic_write(&png, &plot_png(&metrics.rows)?)?;
    let txt = out_dir.join("report.txt");
    let text = format!("run {}\n{summary}", run_dir.display());
    swav_core::fs::atomic_write(&txt, text.as_bytes())?;
    Ok(ReportFiles { png, txt, summary })
}

const FONT: &str = "sans-serif";
static FONT_ONCE: Once = Once::new();

/// Plotters draws text with fonts registered by name: register the embedded one once.
fn register_font() {
    FONT_ONCE.call_once(|| {
        // The font is compiled in and known to parse; a failure would only lose the text.
        let _ = plotters::style::register_font(FONT, FontStyle::Normal, ttf_noto_sans::REGULAR);
    });
}

/// The largest magnitude a plotted value may have.
const PLOT_LIMIT: f64 = 1e15;

/// Width and height of the report image.
pub const PNG_SIZE: (u32, u32) = (1200, 800);

/// The 2x2 panel figure (loss, lr, entropy of the mean code, images/s against the step) as PNG
/// bytes. The moving average of the loss spans 1/50 of the steps (drawn from 100 steps on).
pub fn plot_png(rows: &[StepMetrics]) -> anyhow::Result<Vec<u8>> {
    register_font();
    let (w, h) = PNG_SIZE;
    let mut buf = vec![255u8; (w * h * 3) as usize];
    draw(&mut buf, rows).map_err(|e| anyhow::anyhow!("drawing the report: {e}"))?;
    let img = image::RgbImage::from_raw(w, h, buf).expect("the buffer has w * h * 3 bytes");
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).context("encoding the report PNG")?;
    Ok(out.into_inner())
}

/// Title, points, colour, whether the y axis starts at 0, whether to add a moving average.
type Series = (&'static str, Vec<(f64, f64)>, RGBColor, bool, bool);

fn draw(buf: &mut [u8], rows: &[StepMetrics]) -> Result<(), Box<dyn std::error::Error>> {
    let root = BitMapBackend::with_buffer(buf, PNG_SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let pick = |f: fn(&StepMetrics) -> Option<f64>| -> Vec<(f64, f64)> {
        // Values beyond any loss, rate or throughput a run has are left out: axes spanning +-1e308
        // would overflow the range arithmetic (and make the tick search spin).
        rows.iter().filter_map(|r| f(r).filter(|v| v.abs() <= PLOT_LIMIT).map(|v| (r.step as f64, v))).collect()
    };
    let panels: [Series; 4] = [
        ("loss (black: moving average)", pick(|r| r.loss), RED, false, true),
        ("learning rate", pick(|r| r.lr), BLUE, true, false),
        ("entropy of the mean code (nats)", pick(|r| r.cluster_entropy), GREEN, false, false),
        ("images / s", pick(|r| r.images_per_s), MAGENTA, false, false),
    ];
    let x_max = rows.iter().map(|r| r.step as f64).fold(1.0, f64::max);
    let x_min = rows.iter().map(|r| r.step as f64).fold(x_max, f64::min);
    let x_range = if x_max > x_min { x_min..x_max } else { x_min..x_min + 1.0 };
    for (area, (title, points, color, from_zero, smoothed)) in root.split_evenly((2, 2)).iter().zip(panels) {
        let (lo, hi) =
            points.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &(_, v)| (lo.min(v), hi.max(v)));
        let (lo, hi) = if points.is_empty() {
            (0.0, 1.0)
        } else {
            let lo = if from_zero { lo.min(0.0) } else { lo };
            let pad = ((hi - lo) * 0.05).max(hi.abs() * 1e-3).max(1e-12);
            (lo - if from_zero && lo == 0.0 { 0.0 } else { pad }, hi + pad)
        };
        let mut chart = ChartBuilder::on(area)
            .caption(title, (FONT, 22))
            .margin(12)
            .x_label_area_size(36)
            .y_label_area_size(70)
            .build_cartesian_2d(x_range.clone(), lo..hi)?;
        chart
            .configure_mesh()
            .x_desc("step")
            .label_style((FONT, 14))
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| format_tick(*v))
            .draw()?;
        if points.is_empty() {
            continue;
        }
        // One pixel wide: plotters joins thicker polylines with mitres, which overshoot as long
        // spikes at the sharp turns of a noisy curve.
        let smooth = smoothed && points.len() >= 100;
        let average = if smooth { moving_average(&points, points.len() / 50) } else { Vec::new() };
        chart.draw_series(LineSeries::new(points, color.stroke_width(1)))?;
        if smooth {
            chart.draw_series(LineSeries::new(average, BLACK.stroke_width(1)))?;
        }
    }
    root.present()?;
    Ok(())
}

/// The mean of each point and the `window - 1` before it.
fn moving_average(points: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    let window = window.max(1);
    let mut sum = 0.0;
    points
        .iter()
        .enumerate()
        .map(|(i, &(x, y))| {
            sum += y;
            if i >= window {
                sum -= points[i - window].1;
            }
            (x, sum / (i + 1).min(window) as f64)
        })
        .collect()
}

fn format_tick(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-2..1e4).contains(&a) {
        format!("{v:.1e}")
    } else {
        format!("{v:.3}").trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics_line(step: u64, loss: &str) -> String {
        format!(
            r#"{{"step": {step}, "epoch": {}, "loss": {loss}, "lr": {}, "images_per_s": {}, "data_wait": 0.25, "cluster_entropy": {}, "clusters_used": {}, "elapsed_s": {}, "future_key": [1, 2]}}"#,
            step / 20,
            0.6 * (1.0 - step as f64 / 100.0),
            100.0 + (step % 7) as f64,
            4.0 + (step as f64 / 50.0),
            20 + step,
            step as f64 * 0.5
        )
    }

    #[test]
    fn report_writes_a_plot_and_a_summary() {
        let dir = tempfile::tempdir().unwrap();
        let mut text = String::new();
        for step in 1..=60u64 {
            let loss = if step == 30 { "null".to_string() } else { format!("{}", 8.0 - step as f64 * 0.05) };
            text += &metrics_line(step, &loss);
            text.push('\n');
        }
        // A line cut short by a crash.
        text += r#"{"step": 61, "epoch": 3, "loss": 4.9"#;
        std::fs::write(dir.path().join("metrics.jsonl"), &text).unwrap();

        let m = metrics::read(&dir.path().join("metrics.jsonl")).unwrap();
        assert_eq!((m.rows.len(), m.skipped_lines), (60, 1));
        assert_eq!(m.rows[29].loss, None);

        let files = write_report(dir.path()).unwrap();
        let s = &files.summary;
        assert_eq!((s.steps, s.first_step, s.last_step, s.epochs), (60, 1, 60, 4));
        assert!((s.final_loss.unwrap() - 5.0).abs() < 1e-9);
        assert_eq!(s.min_loss.unwrap().1, 60);
        assert!((s.mean_data_wait.unwrap() - 0.25).abs() < 1e-12);
        assert_eq!(s.bad_losses, 1);

        let png = std::fs::read(&files.png).unwrap();
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
        let img = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), PNG_SIZE);
        // The loss curve is drawn in red, and there is text and axes in black.
        let red = img.pixels().filter(|p| p[0] > 200 && p[1] < 60 && p[2] < 60).count();
        let dark = img.pixels().filter(|p| p[0] < 60 && p[1] < 60 && p[2] < 60).count();
        assert!(red > 200, "{red} red pixels");
        assert!(dark > 1000, "{dark} dark pixels");

        let txt = std::fs::read_to_string(&files.txt).unwrap();
        assert!(txt.contains("60 (step 1 to 60)"), "{txt}");
        assert!(txt.contains("unreadable line"), "{txt}");
        assert!(!txt.contains("k-NN"), "no eval.json yet: {txt}");
    }

    #[test]
    fn report_needs_metrics() {
        let dir = tempfile::tempdir().unwrap();
        let err = write_report(dir.path()).unwrap_err().to_string();
        assert!(err.contains("metrics.jsonl"), "{err}");
        std::fs::write(dir.path().join("metrics.jsonl"), "garbage\n").unwrap();
        assert!(write_report(dir.path()).is_err());
    }

    #[test]
    fn report_curves_stay_inside_their_panels() {
        // One-step spikes, down in the loss (top panel) and up in the throughput (bottom panel): the
        // sharpest turns a curve can take, where thick polylines overshoot into the neighbouring panel.
        let mut rng = swav_core::rng::SplitMix64::new(17);
        let rows: Vec<StepMetrics> = (0..1250u64)
            .map(|step| StepMetrics {
                step,
                loss: Some(if step % 41 == 20 { 1.0 } else { 9.0 + 0.2 * rng.normal() }),
                images_per_s: Some(if step % 37 == 18 { 1500.0 } else { 500.0 + 20.0 * rng.normal() }),
                ..Default::default()
            })
            .collect();
        let png = plot_png(&rows).unwrap();
        let img = image::load_from_memory(&png).unwrap().to_rgb8();
        let (w, h) = img.dimensions();
        let (mut red, mut magenta) = (0, 0);
        for (x, y, p) in img.enumerate_pixels() {
            let is_red = p[0] > 200 && p[1] < 60 && p[2] < 60;
            let is_magenta = p[0] > 200 && p[1] < 60 && p[2] > 200;
            if is_red {
                red += 1;
                assert!(x < w / 2 && y < h / 2, "loss pixel at ({x}, {y}) outside its panel");
            }
            if is_magenta {
                magenta += 1;
                assert!(x >= w / 2 && y >= h / 2, "throughput pixel at ({x}, {y}) outside its panel");
            }
        }
        assert!(red > 1000 && magenta > 1000, "{red} red, {magenta} magenta pixels");
    }

    #[test]
    fn absurd_values_do_not_hang_the_plot() {
        // One series spanning +-1e308, another with a huge step range: the plot finishes.
        let rows: Vec<StepMetrics> = (0..50u64)
            .map(|step| StepMetrics {
                step: step * 1_000_000_000_000,
                loss: Some(if step % 2 == 0 { 1e308 } else { -1e308 }),
                lr: Some(if step == 3 { f64::MAX } else { 0.1 }),
                images_per_s: Some(1e-300),
                ..Default::default()
            })
            .collect();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(plot_png(&rows).map(|p| p.len())).unwrap());
        let done = rx.recv_timeout(std::time::Duration::from_secs(60)).expect("the plot finishes");
        assert!(done.unwrap() > 0);
    }
}
