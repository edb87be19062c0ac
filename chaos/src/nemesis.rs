//! The nemesis: applies a planned fault and undoes it. Processes get signals; the network gets
//! iptables rules on the nodes' 127.0.0.x addresses (UDP only, so node-to-node QUIC is cut and
//! the clients still reach every gateway); delay and reordering go through each node's transport
//! fault wrapper (`SWARM_NET_FAULTS`, a file the node rereads).
//!
//! Every rule lives in one chain of our own, jumped to from `INPUT`; removing the jump and the
//! chain removes everything. That happens when the run heals, when the [`Nemesis`] is dropped
//! (also while a panic unwinds), and on Ctrl-C, whose handler also kills the node processes.

use std::process::Command;
use std::sync::Mutex;

use crate::Error;
use crate::cluster::{Cluster, node_ip};
use crate::scenario::{FaultKind, Planned};

/// Node processes the Ctrl-C handler must not leave behind.
static PIDS: Mutex<Vec<u32>> = Mutex::new(Vec::new());
/// The chain the Ctrl-C handler must remove, once one exists.
static CHAIN: Mutex<Option<String>> = Mutex::new(None);

pub(crate) fn track_pid(pid: u32) {
    if let Ok(mut p) = PIDS.lock() {
        p.push(pid);
    }
}

pub(crate) fn untrack_pid(pid: u32) {
    if let Ok(mut p) = PIDS.lock() {
        p.retain(|&x| x != pid);
    }
}

/// On Ctrl-C (SIGINT, SIGTERM): remove our iptables chain, kill the nodes, exit 130.
pub fn install_interrupt_handler() -> Result<(), Error> {
    ctrlc::set_handler(|| {
        eprintln!("swarm-chaos: interrupted; removing the network rules and stopping the nodes");
        if let Ok(chain) = CHAIN.lock()
            && let Some(c) = chain.as_deref()
        {
            remove_chain(c);
        }
        if let Ok(pids) = PIDS.lock() {
            for pid in pids.iter() {
                let _ = Command::new("kill")
                    .args(["-CONT", &pid.to_string()])
                    .status();
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
        std::process::exit(130);
    })
    .map_err(|e| Error::Cluster(format!("install the Ctrl-C handler: {e}")))
}

/// Whether this process may change iptables rules.
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Applies and undoes faults; owns the iptables chain while it lives.
#[derive(Debug)]
pub struct Nemesis {
    chain: Option<String>,
    nodes: u32,
}

impl Nemesis {
    /// `root_faults`: whether the scenario has faults that need iptables; then the chain is made
    /// now (and a leftover of an interrupted run with the same ports removed first).
    pub fn new(nodes: u32, port: u16, root_faults: bool) -> Result<Self, Error> {
        let mut n = Self { chain: None, nodes };
        if root_faults {
            let chain = format!("SWARM-CHAOS-{port}");
            remove_chain(&chain);
            iptables(&["-N", &chain])?;
            if let Ok(mut c) = CHAIN.lock() {
                *c = Some(chain.clone());
            }
            n.chain = Some(chain.clone());
            iptables(&["-I", "INPUT", "-j", &chain])?;
        }
        Ok(n)
    }

    /// Start a fault.
    pub fn apply(&mut self, cluster: &mut Cluster, f: &Planned) -> Result<(), Error> {
        let target = f.nodes.first().copied().unwrap_or(1);
        match f.kind {
            FaultKind::Kill | FaultKind::RollingRestart => cluster.kill(target),
            FaultKind::Pause => cluster.pause(target, true),
            FaultKind::Leave => cluster.leave(target),
            FaultKind::PartitionHalves | FaultKind::PartitionIsolate => {
                let side = &f.nodes;
                let other: Vec<u32> = (1..=self.nodes).filter(|k| !side.contains(k)).collect();
                self.cut(side, &other, true)
            }
            FaultKind::PartitionOneWay => {
                let other: Vec<u32> = (1..=self.nodes).filter(|&k| k != target).collect();
                self.cut(&[target], &other, false)
            }
            FaultKind::PartitionBridge => {
                let bridge = f.bridge.unwrap_or(target);
                let other: Vec<u32> = (1..=self.nodes)
                    .filter(|k| *k != bridge && !f.nodes.contains(k))
                    .collect();
                self.cut(&f.nodes, &other, true)
            }
            FaultKind::Loss => {
                let chain = self.chain()?;
                let p = format!("{:.4}", f.rate);
                for k in 1..=self.nodes {
                    let ip = node_ip(k);
                    iptables(&[
                        "-A",
                        &chain,
                        "-p",
                        "udp",
                        "-s",
                        &ip,
                        "-m",
                        "statistic",
                        "--mode",
                        "random",
                        "--probability",
                        &p,
                        "-j",
                        "DROP",
                    ])?;
                }
                Ok(())
            }
            FaultKind::Delay => write_faults(
                cluster,
                target,
                &format!("delay_ms={} jitter_ms={}", f.delay_ms, f.jitter_ms),
            ),
            FaultKind::Reorder => write_faults(
                cluster,
                target,
                &format!("delay_ms=5 jitter_ms=20 reorder={:.4}", f.rate),
            ),
        }
    }

    /// Undo a fault: restart, resume, rejoin, heal.
    pub fn undo(&mut self, cluster: &mut Cluster, f: &Planned) -> Result<(), Error> {
        let target = f.nodes.first().copied().unwrap_or(1);
        match f.kind {
            FaultKind::Kill | FaultKind::RollingRestart | FaultKind::Leave => {
                if cluster.is_running(target) {
                    Ok(())
                } else {
                    cluster.start(target)
                }
            }
            FaultKind::Pause => cluster.pause(target, false),
            FaultKind::PartitionHalves
            | FaultKind::PartitionIsolate
            | FaultKind::PartitionOneWay
            | FaultKind::PartitionBridge
            | FaultKind::Loss => {
                let chain = self.chain()?;
                iptables(&["-F", &chain])
            }
            FaultKind::Delay | FaultKind::Reorder => write_faults(cluster, target, ""),
        }
    }

    /// Drop UDP from `a` to `b` (and back when `both`).
    fn cut(&self, a: &[u32], b: &[u32], both: bool) -> Result<(), Error> {
        let chain = self.chain()?;
        for &x in a {
            for &y in b {
                let (ix, iy) = (node_ip(x), node_ip(y));
                iptables(&[
                    "-A", &chain, "-p", "udp", "-s", &ix, "-d", &iy, "-j", "DROP",
                ])?;
                if both {
                    iptables(&[
                        "-A", &chain, "-p", "udp", "-s", &iy, "-d", &ix, "-j", "DROP",
                    ])?;
                }
            }
        }
        Ok(())
    }

    fn chain(&self) -> Result<String, Error> {
        self.chain.clone().ok_or_else(|| {
            Error::Network("a network fault without the iptables chain (not root?)".into())
        })
    }

    /// Remove every rule this run added.
    pub fn heal_all(&mut self, cluster: &Cluster) {
        if let Some(c) = self.chain.as_deref() {
            let _ = iptables(&["-F", c]);
        }
        for node in &cluster.nodes {
            let _ = std::fs::write(&node.faults_file, "");
        }
    }
}

impl Drop for Nemesis {
    fn drop(&mut self) {
        if let Some(c) = self.chain.take() {
            remove_chain(&c);
            if let Ok(mut g) = CHAIN.lock() {
                *g = None;
            }
        }
    }
}

fn write_faults(cluster: &Cluster, k: u32, line: &str) -> Result<(), Error> {
    let file = &cluster.node(k).faults_file;
    std::fs::write(file, line).map_err(|e| Error::io(format!("write {}", file.display()), e))
}

fn iptables(args: &[&str]) -> Result<(), Error> {
    let out = Command::new("iptables")
        .args(args)
        .output()
        .map_err(|e| Error::Network(format!("run iptables (installed? root?): {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(Error::Network(format!(
            "iptables {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Remove the jump to `chain` (every copy), its rules and the chain; quiet when absent.
fn remove_chain(chain: &str) {
    for _ in 0..8 {
        if iptables(&["-D", "INPUT", "-j", chain]).is_err() {
            break;
        }
    }
    let _ = iptables(&["-F", chain]);
    let _ = iptables(&["-X", chain]);
}

/// Whether any rule of ours is left in the running kernel (the tests' check of the cleanup).
pub fn chain_exists(port: u16) -> bool {
    iptables(&["-L", &format!("SWARM-CHAOS-{port}"), "-n"]).is_ok()
}
