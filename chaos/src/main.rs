//! `swarm-chaos`: the fault runner (real node processes, workload, nemesis, invariant checker)
//! arrives with the replication issue. Until then it says so and exits non-zero.

fn main() -> std::process::ExitCode {
    eprintln!("swarm-chaos: no scenarios yet (they need the cluster and replication issues)");
    std::process::ExitCode::from(2)
}
