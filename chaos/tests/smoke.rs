//! The smoke scenario end to end, as an operator runs it: `swarm-chaos run` starts three real
//! `swarm node` processes (the `swarm` binary `cargo test --workspace` builds next to this one),
//! drives the workload, kills, pauses, isolates (as root) and delays, heals and checks. And a run
//! interrupted with Ctrl-C leaves no iptables rule and no node behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use swarm_chaos::nemesis::{chain_exists, is_root};

/// One run at a time: each starts a cluster on this machine's two cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn chaos() -> Command {
    Command::new(env!("CARGO_BIN_EXE_swarm-chaos"))
}

fn scenario(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scenarios")
        .join(name)
}

#[test]
fn the_smoke_scenario_passes_every_check() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // Kept after the test (in target/), so that a failed run's cluster and logs can be read.
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("chaos-smoke");
    let _ = std::fs::remove_dir_all(&out);
    let run = chaos()
        .args(["run", "--seed", "42", "--skip-root-faults", "--scenario"])
        .arg(scenario("smoke.toml"))
        .arg("--out")
        .arg(&out)
        .output()
        .expect("run swarm-chaos");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.starts_with("seed 42\n"),
        "the seed comes first: {stdout}"
    );
    if !is_root() {
        assert!(
            stdout.contains("skipping fault partition_isolate"),
            "{stdout}"
        );
    }
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("report.json")).expect("report.json"))
            .expect("json");
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["lost"], 0);
    assert!(
        report["acknowledged"].as_u64().unwrap_or(0) > 100,
        "{report}"
    );
    assert!(
        report["tasks_completed"].as_u64().unwrap_or(0) > 5,
        "{report}"
    );
    for kind in [
        "write",
        "read",
        "delete",
        "subject_write",
        "erase",
        "task",
        "chat",
    ] {
        assert!(
            report["by_kind"][kind][1].as_u64().unwrap_or(0) > 0,
            "no acknowledged {kind}: {report}"
        );
    }
    let svg = std::fs::read_to_string(out.join("timeline.svg")).expect("timeline.svg");
    assert!(svg.starts_with("<svg") && svg.contains("node-3"));
    assert!(!chain_exists(18_480), "an iptables rule outlived the run");
}

#[test]
fn an_interrupted_run_removes_its_rules_and_stops_its_nodes() {
    if !is_root() {
        eprintln!("not root: the network faults cannot be tried here");
        return;
    }
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let out = tempfile::tempdir().expect("tempdir");
    let file = out.path().join("cut.toml");
    std::fs::write(
        &file,
        "name = \"cut\"\nnodes = 2\nwarmup = \"1s\"\nduration = \"60s\"\nhttp_port = 18580\n\
         gossip_port = 18581\n[workload]\nclients = 1\nrate = 2.0\n\
         [[faults]]\nkind = \"partition_halves\"\nat = \"0s\"\nfor = \"50s\"\n",
    )
    .expect("write scenario");
    let mut child = chaos()
        .args(["run", "--seed", "1", "--scenario"])
        .arg(&file)
        .arg("--out")
        .arg(out.path().join("run"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(90);
    while !chain_exists(18_580) {
        assert!(Instant::now() < deadline, "the partition never started");
        assert!(
            child.try_wait().expect("wait").is_none(),
            "the run ended early"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    let pid = child.id().to_string();
    Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .expect("kill");
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(130));
    assert!(
        !chain_exists(18_580),
        "the rules outlived the interrupted run"
    );
    // Its nodes are gone: nothing answers on their gateways.
    let nodes = Command::new("pgrep")
        .args(["-f", &out.path().join("run").display().to_string()])
        .output()
        .expect("pgrep");
    assert!(
        String::from_utf8_lossy(&nodes.stdout).trim().is_empty(),
        "node processes left: {}",
        String::from_utf8_lossy(&nodes.stdout)
    );
}
