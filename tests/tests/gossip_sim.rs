//! Scripted gossip scenarios in the simulator: the same state machine the QUIC service runs, with
//! virtual time, loss and partitions.

use std::time::Duration;

use swarm_membership::GossipSettings;
use swarm_membership::MemberState::{Alive, Down, Left};
use swarm_membership::sim::{Sim, SimConfig, Step, run_script};

fn s(secs: u64) -> Duration {
    Duration::from_secs(secs)
}

fn cfg(n: u32, loss: f64, seed: u64) -> SimConfig {
    SimConfig {
        settings: GossipSettings {
            cluster_size: n,
            ..GossipSettings::default()
        },
        loss,
        seed,
        ..SimConfig::default()
    }
}

fn run(cfg: SimConfig, steps: &[Step]) {
    match run_script(cfg, steps) {
        Ok(log) => {
            for l in log {
                println!("{l}");
            }
        }
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn join_crash_restart_and_leave() {
    run(
        cfg(8, 0.0, 1),
        &[
            Step::Add(8),
            Step::ExpectFullView(s(30)),
            Step::Kill(3),
            Step::ExpectState(3, Down, s(20)),
            Step::ExpectNoFalseDown,
            Step::Restart(3),
            Step::ExpectState(3, Alive, s(20)),
            Step::ExpectFullView(s(30)),
            // A graceful leave is `left`, not `down`, and it is seen quickly.
            Step::Leave(5),
            Step::ExpectState(5, Left, s(3)),
            Step::Wait(s(30)),
            Step::ExpectState(5, Left, s(1)),
            Step::ExpectNoFalseDown,
        ],
    );
}

#[test]
fn partition_then_heal_converges() {
    run(
        cfg(6, 0.0, 2),
        &[
            Step::Add(6),
            Step::ExpectFullView(s(30)),
            Step::Partition(vec![3, 4, 5]),
            Step::ExpectSeenBy {
                observer: 0,
                member: 4,
                state: Down,
                within: s(30),
            },
            Step::ExpectSeenBy {
                observer: 4,
                member: 0,
                state: Down,
                within: s(30),
            },
            Step::Heal,
            Step::ExpectFullView(s(120)),
            Step::ExpectState(4, Alive, s(30)),
        ],
    );
}

#[test]
fn a_cut_link_alone_does_not_declare_anyone_down() {
    // Indirect probes route around a single broken link.
    run(
        cfg(6, 0.0, 3),
        &[
            Step::Add(6),
            Step::ExpectFullView(s(30)),
            Step::Cut(1, 2),
            Step::Wait(s(120)),
            Step::ExpectNoFalseDown,
            Step::ExpectFullView(s(1)),
        ],
    );
}

#[test]
fn ten_percent_loss_converges_without_false_downs() {
    run(
        cfg(30, 0.1, 4),
        &[
            Step::Add(30),
            Step::ExpectFullView(s(60)),
            Step::Wait(s(300)),
            Step::ExpectNoFalseDown,
            Step::Kill(7),
            Step::ExpectState(7, Down, s(30)),
        ],
    );
}

#[test]
fn every_member_learns_every_members_metadata() {
    let mut sim = Sim::new(cfg(20, 0.05, 5));
    sim.add_nodes(20);
    let all_meta = |s: &Sim| {
        (0..20).all(|o| {
            let v = s.view(o);
            v.len() == 20
                && v.iter()
                    .all(|m| m.meta.as_ref().is_some_and(|m| m.version == "sim"))
        })
    };
    let took = sim.run_until(s(60), all_meta);
    assert!(took.is_some(), "metadata everywhere: {:?}", sim.view(0));
}
