//! `runs list` and `runs show`: run history as text, with a loss-curve summary.

use std::fmt::Write;

use ddpm_registry::{CheckpointScore, MetricPoint, Registry, Run, RunStatus, RunWorld};

use crate::{
    cli::CheckpointsCommand,
    error::{Result, TrainerError},
    quality::PROBE_TRUSTED,
};

/// Points of the loss curve `runs show` prints.
const CURVE_POINTS: usize = 12;
const SPARK: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];

pub async fn list(registry: &Registry, status: Option<RunStatus>, limit: i64) -> Result<String> {
    let runs = registry.list_runs(status, limit.max(1), 0).await?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:>5}  {:<11}  {:>17}  {:>8}  {:>10}  {:<19}  dataset",
        "id", "status", "step", "attempts", "last loss", "created"
    );
    for run in &runs {
        let last_loss = registry
            .metric_summary(run.id)
            .await?
            .map(|s| format!("{:.4}", s.last_loss))
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "{:>5}  {:<11}  {:>17}  {:>8}  {:>10}  {:<19}  {}",
            run.id,
            run.status.as_str(),
            format!("{}/{}", run.current_step, run.total_steps),
            run.attempts,
            last_loss,
            run.created_at.format("%Y-%m-%d %H:%M:%S"),
            dataset_path(run),
        );
    }
    if runs.is_empty() {
        let _ = writeln!(out, "(no runs)");
    }
    Ok(out)
}

fn dataset_path(run: &Run) -> String {
    run.dataset
        .get("path")
        .and_then(|p| p.as_str())
        .unwrap_or("-")
        .to_string()
}

pub async fn show(registry: &Registry, id: i64) -> Result<String> {
    let run = registry.get_run(id).await?.ok_or(TrainerError::Run {
        id,
        message: "no such run".into(),
    })?;
    let mut out = String::new();
    let _ = writeln!(out, "run {}: {}", run.id, run.status);
    let _ = writeln!(
        out,
        "  step        {}/{}",
        run.current_step, run.total_steps
    );
    let _ = writeln!(
        out,
        "  attempts    {} ({} after a crash)",
        run.attempts, run.crashes
    );
    let _ = writeln!(out, "  host        {}", run.host.as_deref().unwrap_or("-"));
    let _ = writeln!(out, "  world       {}", world_text(run.world.as_ref()));
    if let Some(key) = &run.launch_key {
        let _ = writeln!(out, "  launch key  {key}");
    }
    let _ = writeln!(out, "  created     {}", run.created_at);
    let time = |t: Option<chrono::DateTime<chrono::Utc>>| {
        t.map(|t| t.to_string()).unwrap_or_else(|| "-".into())
    };
    let _ = writeln!(out, "  started     {}", time(run.started_at));
    let _ = writeln!(out, "  finished    {}", time(run.finished_at));
    let _ = writeln!(out, "  heartbeat   {}", time(run.heartbeat_at));
    if run.retry_at.is_some() {
        let _ = writeln!(out, "  retry at    {}", time(run.retry_at));
    }
    if run.cancel_requested_at.is_some() {
        let _ = writeln!(
            out,
            "  cancelling  asked {}; its worker stops it at its next heartbeat",
            time(run.cancel_requested_at)
        );
    }
    if let Some(e) = &run.error {
        let _ = writeln!(out, "  error       {e}");
    }
    let d = &run.dataset;
    let _ = writeln!(
        out,
        "  dataset     {} ({} images, classes {}, {} skipped)",
        dataset_path(&run),
        d.get("image_count").and_then(|v| v.as_u64()).unwrap_or(0),
        d.get("class_names")
            .map(|v| v.to_string())
            .unwrap_or_else(|| "[]".into()),
        d.get("skipped_count").and_then(|v| v.as_u64()).unwrap_or(0),
    );

    match registry.metric_summary(id).await? {
        Some(s) => {
            let _ = writeln!(out, "\nloss");
            let _ = writeln!(
                out,
                "  {} rows, steps {}..{}; first {:.4}, last {:.4}, min {}, mean of last {} rows {}",
                s.count,
                s.first_step,
                s.last_step,
                s.first_loss,
                s.last_loss,
                fmt_opt(s.min_loss),
                s.tail_count,
                fmt_opt(s.tail_mean_loss)
            );
            let points = registry.metrics(id, None, None, CURVE_POINTS).await?;
            let _ = writeln!(out, "  curve {}", sparkline(&points));
            let _ = writeln!(out, "  {BY_T_LEGEND}");
            for p in &points {
                let _ = writeln!(out, "  {}", metric_line(p));
            }
        }
        None => {
            let _ = writeln!(out, "\nloss\n  (no metrics yet)");
        }
    }

    let checkpoints = registry.list_checkpoints(id).await?;
    let _ = writeln!(out, "\ncheckpoints");
    if checkpoints.is_empty() {
        let _ = writeln!(out, "  (none)");
    }
    for c in &checkpoints {
        let _ = writeln!(
            out,
            "  {:>5}  step {:>8}  {:<5}  {:>10} B  {}",
            c.id,
            c.step,
            c.kind.as_str(),
            c.size_bytes,
            c.path
        );
    }
    write_scores(&mut out, &registry.scores(id).await?);
    let _ = writeln!(out, "\nconfig");
    let config = serde_json::to_string_pretty(&run.config).unwrap_or_default();
    for line in config.lines() {
        let _ = writeln!(out, "  {line}");
    }
    Ok(out)
}

/// `checkpoints promote|rollback|promotions`, as text.
pub async fn checkpoints_command(
    registry: &Registry,
    command: &CheckpointsCommand,
) -> Result<String> {
    let who = |by: &Option<String>| {
        by.clone().unwrap_or_else(|| {
            let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
            let host = hostname::get()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_else(|_| "unknown-host".into());
            format!("{user}@{host}")
        })
    };
    let mut out = String::new();
    match command {
        CheckpointsCommand::Promote { id, reason, by } => {
            let p = registry.promote_checkpoint(*id, &who(by), reason).await?;
            let _ = writeln!(
                out,
                "checkpoint {} (run {}, step {}) promoted by {}: {}",
                p.checkpoint_id, p.run_id, p.step, p.promoted_by, p.reason
            );
        }
        CheckpointsCommand::Rollback { by } => match registry.rollback_promotion(&who(by)).await? {
            Some(p) => {
                let _ = writeln!(
                    out,
                    "rolled back: checkpoint {} (run {}, step {}) is promoted again ({} by {})",
                    p.checkpoint_id, p.run_id, p.step, p.reason, p.promoted_by
                );
            }
            None => {
                let _ = writeln!(out, "rolled back: nothing is promoted now");
            }
        },
        CheckpointsCommand::Promotions { limit } => {
            let list = registry.promotions((*limit).max(1)).await?;
            if list.is_empty() {
                let _ = writeln!(out, "(no promotions)");
            }
            for p in list {
                let state = match (&p.revoked_at, &p.revoked_by) {
                    (Some(at), by) => format!(
                        "revoked {} by {}",
                        at.format("%Y-%m-%d %H:%M:%S"),
                        by.as_deref().unwrap_or("-")
                    ),
                    (None, _) => "in force unless a newer one is".into(),
                };
                let _ = writeln!(
                    out,
                    "{:>5}  checkpoint {:>5}  run {:>4} step {:>8}  {}  by {}: {}  [{state}]",
                    p.id,
                    p.checkpoint_id,
                    p.run_id,
                    p.step,
                    p.created_at.format("%Y-%m-%d %H:%M:%S"),
                    p.promoted_by,
                    p.reason
                );
            }
        }
    }
    Ok(out)
}

/// The `scores` section: one line per scored EMA checkpoint (also those retention has
/// deleted since), with a warning when the probe that judged them was weak.
fn write_scores(out: &mut String, scores: &[CheckpointScore]) {
    let _ = writeln!(out, "\nscores");
    if scores.is_empty() {
        let _ = writeln!(out, "  (none: not scored, or no checkpoint yet)");
        return;
    }
    let _ = writeln!(out, "  {SCORES_LEGEND}");
    for s in scores {
        let v = &s.values;
        let _ = writeln!(
            out,
            "  step {:>8}  ckpt {:>5}  acc {}  fd {} (floor {})  kid {} ± {}  diversity {}  {:.1} s",
            s.step,
            s.checkpoint_id,
            fmt_opt(v.class_accuracy),
            fmt_opt(v.fd),
            fmt_opt(v.fd_floor),
            fmt_opt(v.kid),
            fmt_opt(v.kid_std),
            fmt_opt(v.diversity),
            v.seconds,
        );
    }
    if let Some(last) = scores.last() {
        let accuracy = last.values.probe_accuracy;
        let note = match accuracy {
            Some(a) if a >= PROBE_TRUSTED => "",
            _ => "  (too weak to judge with: these scores are unreliable)",
        };
        let _ = writeln!(
            out,
            "  probe: held-out accuracy {} on {} real images; {} samples per class, {}{note}",
            fmt_opt(accuracy),
            last.values.holdout_images,
            last.values.samples_per_class,
            last.values.settings,
        );
    }
}

const SCORES_LEGEND: &str = "acc: samples the probe assigns to the class asked for; fd: Fréchet \
     distance to held-out images in probe features (floor: real training images); kid ± \
     std over subsets; diversity: within-class spread relative to real images";

/// The header over the per-row lines: what `loss`, `smoothed` and the four
/// `by t:` columns are. A row shows `-` for a quarter that no sample of its
/// window fell in, and for values of rows logged before the trainer recorded
/// them.
const BY_T_LEGEND: &str = "loss: mean over the logging window; smoothed: moving average of the \
     per-step loss; by t: mean loss of the window's samples with timestep t in \
     [0,T/4) [T/4,T/2) [T/2,3T/4) [3T/4,T), least noise first";

/// One metric row of `runs show`.
fn metric_line(p: &MetricPoint) -> String {
    let [q1, q2, q3, q4] = p.loss_by_timestep.map(fmt_opt);
    format!(
        "step {:>8}  loss {:.4} (smoothed {})  by t: {q1} {q2} {q3} {q4}  lr {:.2e}  grad {}  {} img/s",
        p.step,
        p.loss,
        fmt_opt(p.loss_smoothed),
        p.learning_rate,
        fmt_opt(p.grad_norm),
        p.images_per_sec
            .map(|v| format!("{v:.0}"))
            .unwrap_or_else(|| "-".into())
    )
}

/// The newest attempt's rank processes, as the console shows them too: `2 ranks (cuda:0,
/// cuda:1)`; `-` before an attempt has recorded them.
fn world_text(world: Option<&RunWorld>) -> String {
    let Some(world) = world else {
        return "-".into();
    };
    let ranks = if world.size == 1 { "rank" } else { "ranks" };
    format!("{} {ranks} ({})", world.size, world.devices.join(", "))
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.4}")).unwrap_or_else(|| "-".into())
}

/// The losses as a one-line bar chart (high = high loss).
pub fn sparkline(points: &[MetricPoint]) -> String {
    let finite: Vec<f64> = points
        .iter()
        .map(|p| p.loss)
        .filter(|l| l.is_finite())
        .collect();
    let (lo, hi) = finite
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    points
        .iter()
        .map(|p| {
            if !p.loss.is_finite() {
                return '·';
            }
            let frac = if hi > lo {
                (p.loss - lo) / (hi - lo)
            } else {
                0.5
            };
            SPARK[((frac * (SPARK.len() - 1) as f64).round() as usize).min(SPARK.len() - 1)]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparkline_falls_with_the_loss() {
        let p = |step, loss| MetricPoint {
            step,
            loss,
            learning_rate: 1e-3,
            grad_norm: None,
            images_per_sec: None,
            recorded_at: chrono::Utc::now(),
            loss_smoothed: None,
            loss_by_timestep: [None; 4],
        };
        let s = sparkline(&[p(1, 1.0), p(2, 0.5), p(3, f64::NAN), p(4, 0.0)]);
        assert_eq!(s, "█▅·▁");
    }

    #[test]
    fn worlds_name_their_ranks_and_devices() {
        let world = |devices: &[&str]| RunWorld {
            size: devices.len() as i64,
            devices: devices.iter().map(|d| d.to_string()).collect(),
        };
        assert_eq!(
            world_text(Some(&world(&["cpu", "cpu"]))),
            "2 ranks (cpu, cpu)"
        );
        assert_eq!(world_text(Some(&world(&["cuda:0"]))), "1 rank (cuda:0)");
        assert_eq!(world_text(None), "-");
    }

    /// `runs show` on a real registry: the world the attempt recorded and the launch key.
    #[tokio::test]
    async fn show_names_the_world_and_the_launch_key() {
        let registry = Registry::connect("sqlite::memory:").await.unwrap();
        let new = ddpm_registry::NewRun {
            config: serde_json::json!({ "preset": "tiny" }),
            dataset: serde_json::json!({ "path": "data/demo", "image_count": 3 }),
            total_steps: 10,
        };
        let (run, _) = registry
            .find_or_create_launched_run(&new, "job-42")
            .await
            .unwrap();
        let before = show(&registry, run.id).await.unwrap();
        assert!(before.contains("\n  world       -\n"), "{before}");
        assert!(before.contains("\n  launch key  job-42\n"), "{before}");

        let claimed = registry.claim_run(run.id, "rank0").await.unwrap().unwrap();
        let world = RunWorld {
            size: 2,
            devices: vec!["cpu".into(), "cpu".into()],
        };
        registry
            .leased(ddpm_registry::Lease::of(&claimed).unwrap())
            .record_world(&world)
            .await
            .unwrap();
        let after = show(&registry, run.id).await.unwrap();
        assert!(
            after.contains("\n  world       2 ranks (cpu, cpu)\n"),
            "{after}"
        );

        let plain = registry.create_run(&new).await.unwrap();
        let plain = show(&registry, plain.id).await.unwrap();
        assert!(!plain.contains("launch key"), "{plain}");
    }

    #[test]
    fn metric_lines_show_the_smoothed_and_per_timestep_losses() {
        let p = MetricPoint {
            step: 1200,
            loss: 0.04123,
            learning_rate: 2e-4,
            grad_norm: Some(0.8),
            images_per_sec: Some(512.4),
            recorded_at: chrono::Utc::now(),
            loss_smoothed: Some(0.042),
            loss_by_timestep: [Some(0.0101), None, Some(0.04552), Some(0.0731)],
        };
        assert_eq!(
            metric_line(&p),
            "step     1200  loss 0.0412 (smoothed 0.0420)  by t: 0.0101 - 0.0455 0.0731  \
             lr 2.00e-4  grad 0.8000  512 img/s"
        );
        // A row logged before the trainer recorded them.
        let old = MetricPoint {
            loss_smoothed: None,
            loss_by_timestep: [None; 4],
            grad_norm: None,
            images_per_sec: None,
            ..p
        };
        assert_eq!(
            metric_line(&old),
            "step     1200  loss 0.0412 (smoothed -)  by t: - - - -  lr 2.00e-4  grad -  - img/s"
        );
    }
}
