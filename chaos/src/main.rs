//! `swarm-chaos`: a placeholder binary. It holds the name and the place of the chaos runner that a
//! later issue writes (real node processes, a workload, a nemesis, an invariant checker, a
//! report); today it runs nothing, says so and exits with status 2, so that a script calling it
//! cannot mistake it for a passing run.

fn main() -> std::process::ExitCode {
    eprintln!("swarm-chaos: placeholder; there are no chaos scenarios in this build");
    std::process::ExitCode::from(2)
}
