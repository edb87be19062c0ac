fn main() -> std::process::ExitCode {
    swarm_node::cli::main()
}
