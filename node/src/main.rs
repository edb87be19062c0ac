// mimalloc: the gateway allocates and frees small buffers on every request across all workers
// (and the audit writer large ones); glibc's malloc showed in profiles of the request path.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    no_transparent_huge_pages();
    swarm_node::cli::main()
}

/// Turn transparent huge pages off for this process. mimalloc asks for them on its arenas, and
/// then purges freed memory after a delay: each page touched again is a fault that zeroes 2 MiB.
/// On the task path that zeroing was a quarter of the nodes' CPU (`cargo bench -p swarm-tests
/// --bench tasks`, BENCHMARKS.md). The same as mimalloc's `MIMALLOC_ALLOW_THP=0`, set before the
/// first thread starts, so every thread and arena is covered.
fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    #[allow(unsafe_code)]
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments only and touches no memory of ours.
    unsafe {
        if libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0 {
            // Not fatal: the node runs the same, a little slower.
            eprintln!("could not turn transparent huge pages off; running with them");
        }
    }
}
