// mimalloc: the gateway allocates and frees small buffers on every request across all workers
// (and the audit writer large ones); glibc's malloc showed in profiles of the request path.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    swarm_node::cli::main()
}
