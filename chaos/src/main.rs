//! `swarm-chaos`: run a scenario against real nodes, or run the deterministic simulation.
//!
//! ```text
//! swarm-chaos run --scenario chaos/scenarios/kill-restart.toml [--seed N] [--out DIR] [--nodes N]
//! swarm-chaos sim --seeds N [--first-seed S]
//! ```
//! Exit status: 0 when every check held, 1 when one failed (the output names the operations),
//! 2 when the run could not be made (a bad scenario, a node that would not start).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use swarm_chaos::run::{RunOptions, default_out, prepare, run};
use swarm_chaos::sim;

#[derive(Parser, Debug)]
#[command(
    name = "swarm-chaos",
    version,
    about = "The chaos suite of swarm: real nodes under faults, a checked history, a report; and a deterministic simulation"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Start real nodes, drive the workload, apply the scenario's faults, heal, check, report.
    Run {
        /// The scenario file (`chaos/scenarios/*.toml`).
        #[arg(long)]
        scenario: PathBuf,
        /// The seed of the fault schedule and the workload (default: drawn, and printed first).
        #[arg(long)]
        seed: Option<u64>,
        /// Where the cluster, the history and the report go (default: chaos-out/NAME-SEED).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Nodes, instead of the scenario's.
        #[arg(long)]
        nodes: Option<u32>,
        /// The `swarm` binary (default: next to this one, or SWARM_BIN).
        #[arg(long)]
        swarm: Option<PathBuf>,
        /// When not root: run without the faults that need iptables, saying so (else refused).
        #[arg(long)]
        skip_root_faults: bool,
    },
    /// The sans-IO cores in one simulated cluster, seed after seed; a failure names its seed.
    Sim {
        #[arg(long, default_value_t = 100)]
        seeds: u64,
        #[arg(long, default_value_t = 0)]
        first_seed: u64,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Cmd::Run {
            scenario,
            seed,
            out,
            nodes,
            swarm,
            skip_root_faults,
        } => {
            let seed = seed.unwrap_or_else(rand::random);
            // The seed first: whatever happens next, the run can be replayed.
            println!("seed {seed}");
            let opts = RunOptions {
                out: out.unwrap_or_else(|| default_out(&scenario, seed)),
                scenario,
                seed,
                swarm,
                nodes,
                skip_root_faults,
            };
            let (s, skipped) = match prepare(&opts) {
                Ok(x) => x,
                Err(e) => {
                    eprintln!("swarm-chaos: {e}");
                    return ExitCode::from(2);
                }
            };
            for line in &skipped {
                println!("skipping fault {line}");
            }
            if let Err(e) = swarm_chaos::nemesis::install_interrupt_handler() {
                eprintln!("swarm-chaos: {e}");
            }
            match run(&opts, s, skipped) {
                Ok(report) => {
                    print!("{}", report.summary());
                    println!("report: {}", opts.out.join("report.json").display());
                    println!("timeline: {}", opts.out.join("timeline.svg").display());
                    if report.ok {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    }
                }
                Err(e) => {
                    eprintln!("swarm-chaos: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Cmd::Sim { seeds, first_seed } => {
            let start = Instant::now();
            let opts = sim::SimOptions::default();
            let (mut failed, mut rerun) = (0u64, 0u64);
            for seed in first_seed..first_seed.saturating_add(seeds) {
                match sim::run_seed(seed, &opts) {
                    Ok(o) => rerun += o.stages_rerun,
                    Err(e) => {
                        println!("{e}");
                        failed += 1;
                    }
                }
            }
            let secs = start.elapsed().as_secs_f64();
            println!(
                "{seeds} seeds from {first_seed}: {} clean, {failed} failed, {:.1} s ({:.0} seeds/min); \
                 {rerun} stages ran again after their only result was lost with its node",
                seeds - failed,
                secs,
                seeds as f64 * 60.0 / secs.max(1e-9)
            );
            if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
    }
}
