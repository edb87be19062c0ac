//! The report: `report.json` with every figure, a summary for a person on stdout, and the
//! timeline (faults as bands against throughput, errors and latency per node, second by second)
//! drawn as SVG with plotters.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use plotters::prelude::*;
use serde::Serialize;

use crate::Error;
use crate::check::Check;
use crate::history::{Op, OpKind};
use crate::scenario::Planned;

/// Everything a run measured and decided.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub scenario: String,
    pub seed: u64,
    pub nodes: u32,
    /// Faults the run set aside (they need root), with the reason.
    pub skipped_faults: Vec<String>,
    pub faults: Vec<Planned>,
    pub duration_s: f64,
    pub operations: u64,
    pub acknowledged: u64,
    /// Per kind: (sent, acknowledged).
    pub by_kind: BTreeMap<String, (u64, u64)>,
    /// Acknowledged writes missing after the heal (keys × nodes); must be 0.
    pub lost: u64,
    pub tasks_accepted: u64,
    pub tasks_completed: u64,
    pub tasks_lost: u64,
    pub stages_recorded_twice: u64,
    /// Twins of one objective both run inside a partition (fenced, counted).
    pub twins_in_partition: u32,
    /// Stage results recorded by an owner that was then superseded (cut off, adopted), whose
    /// result did not stand.
    pub superseded_results_fenced: u64,
    /// From the heal until every node saw every other alive; `None`: not within the bound.
    pub membership_converged_s: Option<f64>,
    /// From the heal until every node held the same keys at the same versions.
    pub replicas_converged_s: Option<f64>,
    /// The share of requests to live nodes during faults the gateways answered.
    pub gateway_success: f64,
    /// A node seen `down` by another while no fault could explain it.
    pub false_member_deaths: u64,
    pub checks: Vec<Check>,
    pub ok: bool,
}

impl Report {
    /// Write `report.json` and `timeline.svg` into `out`, and `history.jsonl`.
    pub fn write(&self, out: &Path, ops: &[Op]) -> Result<(), Error> {
        let json = serde_json::to_vec_pretty(self).unwrap_or_default();
        let w = |name: &str, bytes: &[u8]| {
            let p = out.join(name);
            std::fs::write(&p, bytes).map_err(|e| Error::io(format!("write {}", p.display()), e))
        };
        w("report.json", &json)?;
        let mut lines = String::new();
        for op in ops {
            lines.push_str(&serde_json::to_string(op).unwrap_or_default());
            lines.push('\n');
        }
        w("history.jsonl", lines.as_bytes())?;
        timeline(
            &out.join("timeline.svg"),
            &self.scenario,
            self.seed,
            self.nodes,
            ops,
            &self.faults,
        )
    }

    /// The summary for a person: the figures, then each check.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let secs =
            |x: Option<f64>| x.map_or("not within the bound".to_string(), |v| format!("{v:.1} s"));
        let _ = writeln!(
            s,
            "scenario {} · seed {} · {} nodes · {:.0} s",
            self.scenario, self.seed, self.nodes, self.duration_s
        );
        for f in &self.skipped_faults {
            let _ = writeln!(s, "  skipped: {f}");
        }
        let _ = writeln!(s, "  faults: {}", self.faults.len());
        let _ = writeln!(
            s,
            "  operations: {} sent, {} acknowledged, {} lost",
            self.operations, self.acknowledged, self.lost
        );
        for (kind, (sent, acked)) in &self.by_kind {
            let _ = writeln!(s, "    {kind:<14} {sent:>6} sent {acked:>6} acknowledged");
        }
        let _ = writeln!(
            s,
            "  tasks: {} accepted, {} completed, {} lost, {} stages recorded twice; fenced: {} twins in a partition, {} superseded results",
            self.tasks_accepted,
            self.tasks_completed,
            self.tasks_lost,
            self.stages_recorded_twice,
            self.twins_in_partition,
            self.superseded_results_fenced
        );
        let _ = writeln!(
            s,
            "  after the heal: membership converged in {}, replicas in {}",
            secs(self.membership_converged_s),
            secs(self.replicas_converged_s)
        );
        let _ = writeln!(
            s,
            "  gateway success on live nodes during faults: {:.2}%; false member deaths: {}",
            self.gateway_success * 100.0,
            self.false_member_deaths
        );
        for c in &self.checks {
            let _ = writeln!(
                s,
                "  [{}] {}: {}",
                if c.ok { "ok" } else { "FAILED" },
                c.name,
                c.summary
            );
            for v in &c.violations {
                let _ = writeln!(s, "      {v}");
            }
        }
        let _ = writeln!(s, "{}", if self.ok { "PASSED" } else { "FAILED" });
        s
    }
}

/// Count the ops of each kind: (sent, acknowledged).
pub fn by_kind(ops: &[Op]) -> BTreeMap<String, (u64, u64)> {
    let mut m: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    for op in ops {
        let name = serde_json::to_value(op.kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let e = m.entry(name).or_default();
        e.0 += 1;
        if op.acked() {
            e.1 += 1;
        }
    }
    m
}

/// Per node and second: (acknowledged ops, failed ops, p99 latency ms).
fn per_second(ops: &[Op], nodes: u32, seconds: usize) -> Vec<Vec<(u32, u32, f64)>> {
    let mut lat: Vec<Vec<Vec<u64>>> = vec![vec![Vec::new(); seconds]; nodes as usize];
    let mut out = vec![vec![(0u32, 0u32, 0.0f64); seconds]; nodes as usize];
    for op in ops.iter().filter(|o| o.kind != OpKind::Erase) {
        let sec = (op.start_ms / 1000) as usize;
        let n = op.node.saturating_sub(1) as usize;
        if sec >= seconds || n >= nodes as usize {
            continue;
        }
        if op.acked() {
            out[n][sec].0 += 1;
        } else if !op.served() {
            out[n][sec].1 += 1;
        }
        lat[n][sec].push(op.end_ms - op.start_ms);
    }
    for (n, secs) in lat.iter_mut().enumerate() {
        for (s, l) in secs.iter_mut().enumerate() {
            if !l.is_empty() {
                l.sort_unstable();
                let i = ((l.len() as f64 * 0.99).ceil() as usize).clamp(1, l.len()) - 1;
                out[n][s].2 = l[i] as f64;
            }
        }
    }
    out
}

/// Three panels over the run's seconds: acknowledged ops/s, failed ops/s and p99 latency,
/// one line per node, with every fault as a shaded band.
pub fn timeline(
    path: &Path,
    scenario: &str,
    seed: u64,
    nodes: u32,
    ops: &[Op],
    faults: &[Planned],
) -> Result<(), Error> {
    let end_ms = ops.iter().map(|o| o.end_ms).max().unwrap_or(1000);
    let seconds = (end_ms / 1000 + 1) as usize;
    let data = per_second(ops, nodes, seconds);
    let draw = || -> Result<(), Box<dyn std::error::Error>> {
        let root = SVGBackend::new(path, (1100, 820)).into_drawing_area();
        root.fill(&WHITE)?;
        let root = root.titled(
            &format!("swarm-chaos {scenario}, seed {seed}: faults (bands) against each node"),
            ("sans-serif", 18),
        )?;
        let panels = root.split_evenly((3, 1));
        let titles = [
            "acknowledged ops/s",
            "failed ops/s (5xx, no answer)",
            "p99 latency (ms)",
        ];
        for (p, (area, title)) in panels.iter().zip(titles).enumerate() {
            let value = |t: &(u32, u32, f64)| match p {
                0 => t.0 as f64,
                1 => t.1 as f64,
                _ => t.2,
            };
            let top = data
                .iter()
                .flat_map(|n| n.iter().map(value))
                .fold(1.0f64, f64::max)
                * 1.1;
            let mut chart = ChartBuilder::on(area)
                .margin(8)
                .x_label_area_size(28)
                .y_label_area_size(52)
                .caption(title, ("sans-serif", 14))
                .build_cartesian_2d(0f64..seconds as f64, 0f64..top)?;
            chart.configure_mesh().x_desc("seconds").draw()?;
            for f in faults {
                let (a, b) = (f.start.as_secs_f64(), f.end.as_secs_f64());
                let color = if f.kind.is_partition() { BLUE } else { RED };
                chart.draw_series(std::iter::once(Rectangle::new(
                    [(a, 0.0), (b, top)],
                    color.mix(0.12).filled(),
                )))?;
                if p == 0 {
                    let label = format!("{} {:?}", f.kind.name(), f.nodes);
                    chart.draw_series(std::iter::once(Text::new(
                        label,
                        (a, top * 0.97),
                        ("sans-serif", 11),
                    )))?;
                }
            }
            for (n, series) in data.iter().enumerate() {
                let color = Palette99::pick(n).to_rgba();
                chart
                    .draw_series(LineSeries::new(
                        series
                            .iter()
                            .enumerate()
                            .map(|(s, t)| (s as f64 + 0.5, value(t))),
                        color.stroke_width(2),
                    ))?
                    .label(format!("node-{}", n + 1))
                    .legend(move |(x, y)| {
                        PathElement::new([(x, y), (x + 16, y)], color.stroke_width(2))
                    });
            }
            if p == 0 {
                chart
                    .configure_series_labels()
                    .background_style(WHITE.mix(0.8))
                    .border_style(BLACK)
                    .draw()?;
            }
        }
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| Error::Cluster(format!("draw {}: {e}", path.display())))
}
