//! Many [`Gossip`] members in one process, with virtual time, packet loss, delay, killed
//! members and partitions (feature `sim`).
//!
//! Every member runs the same state machine the QUIC service runs; the simulator plays the
//! network (it passes each frame with its true sender name, as mutual TLS would) and the clock.
//! Scenarios are scripted as [`Step`]s; [`Sim`] also exposes the pieces for benchmarks.

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use foca::Timer;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::gossip::{Gossip, GossipSettings, MemberEvent, MemberInfo, NodeId};
use crate::{MemberState, NodeMeta};

/// Network and protocol parameters of a simulation.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub settings: GossipSettings,
    /// Probability that a packet is lost.
    pub loss: f64,
    /// One-way delay, uniform in `[min, max)`.
    pub latency: (Duration, Duration),
    /// New members announce at random times over this window.
    pub join_spread: Duration,
    pub seed: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            settings: GossipSettings::default(),
            loss: 0.0,
            latency: (Duration::from_micros(200), Duration::from_millis(2)),
            join_spread: Duration::from_secs(1),
            seed: 42,
        }
    }
}

/// Counters over the whole run.
#[derive(Debug, Clone, Default)]
pub struct SimStats {
    pub packets: u64,
    pub bytes: u64,
    pub lost: u64,
    pub max_packet: usize,
    /// `down` declared about a member that was alive and reachable.
    pub false_downs: u64,
    pub refused_frames: u64,
    pub events: u64,
}

enum Ev {
    Timer(u32, Timer<NodeId>),
    Packet { to: u32, from: u32, data: Bytes },
    Tick(u32),
    Announce(u32),
}

struct Item {
    at: u64,
    seq: u64,
    ev: Ev,
}

impl PartialEq for Item {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Item {}
impl PartialOrd for Item {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Item {
    fn cmp(&self, o: &Self) -> Ordering {
        (o.at, o.seq).cmp(&(self.at, self.seq))
    }
}

struct SimNode {
    gossip: Gossip,
    alive: bool,
    left: bool,
    /// Partition group: packets only pass between members of the same group.
    group: u8,
}

/// A simulated cluster.
pub struct Sim {
    cfg: SimConfig,
    now: u64,
    seq: u64,
    heap: BinaryHeap<Item>,
    rng: StdRng,
    nodes: Vec<SimNode>,
    by_addr: HashMap<SocketAddr, u32>,
    cut: HashSet<(u32, u32)>,
    /// Who has seen each member go down or leave (current incarnation only).
    gone_seen: Vec<HashSet<u32>>,
    stats: SimStats,
}

impl std::fmt::Debug for Sim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sim")
            .field("now", &self.now())
            .field("members", &self.nodes.len())
            .finish_non_exhaustive()
    }
}

/// Member `i`'s gossip address.
pub fn sim_addr(i: u32) -> SocketAddr {
    let [_, a, b, c] = (i + 1).to_be_bytes();
    SocketAddr::from((Ipv4Addr::new(10, a, b, c), 7946))
}

fn us(d: Duration) -> u64 {
    d.as_micros() as u64
}

impl Sim {
    pub fn new(cfg: SimConfig) -> Self {
        let rng = StdRng::seed_from_u64(cfg.seed);
        Self {
            cfg,
            now: 0,
            seq: 0,
            heap: BinaryHeap::new(),
            rng,
            nodes: Vec::new(),
            by_addr: HashMap::new(),
            cut: HashSet::new(),
            gone_seen: Vec::new(),
            stats: SimStats::default(),
        }
    }

    pub fn now(&self) -> Duration {
        Duration::from_micros(self.now)
    }

    pub fn stats(&self) -> &SimStats {
        &self.stats
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    fn push(&mut self, at: u64, ev: Ev) {
        self.seq += 1;
        self.heap.push(Item {
            at,
            seq: self.seq,
            ev,
        });
    }

    fn make(&self, i: u32, incarnation: u64) -> Gossip {
        let id = NodeId {
            name: format!("n{i}"),
            addr: sim_addr(i),
            incarnation,
        };
        let meta = NodeMeta {
            gateway: format!("10.0.0.{}:8080", i % 250),
            roles: vec!["agents".into()],
            version: "sim".into(),
            ..NodeMeta::default()
        };
        match Gossip::new(
            id,
            meta,
            &self.cfg.settings,
            self.cfg.seed ^ (u64::from(i) << 20),
        ) {
            Ok(g) => g,
            Err(e) => unreachable!("the simulator's metadata fits: {e}"),
        }
    }

    /// Add `n` members; each announces to member 0 at a random time within the join window.
    pub fn add_nodes(&mut self, n: u32) {
        for _ in 0..n {
            let i = self.nodes.len() as u32;
            let mut g = self.make(i, 1);
            if i > 0 {
                g.set_seeds(vec![sim_addr(0)]);
                // `set_seeds` announced at once; the announce is sent when the member "starts".
                let _ = g.take_output();
            }
            self.nodes.push(SimNode {
                gossip: g,
                alive: true,
                left: false,
                group: 0,
            });
            self.gone_seen.push(HashSet::new());
            self.by_addr.insert(sim_addr(i), i);
            let spread = us(self.cfg.join_spread).max(1);
            let at = self.now + self.rng.random_range(0..spread);
            self.push(at, Ev::Announce(i));
            let tick = self.now + self.rng.random_range(0..1_000_000);
            self.push(tick, Ev::Tick(i));
            self.drain(i);
        }
    }

    /// Stop member `i` without a word (a crash).
    pub fn kill(&mut self, i: u32) {
        if let Some(n) = self.nodes.get_mut(i as usize) {
            n.alive = false;
        }
    }

    /// Member `i` leaves gracefully, then stops.
    pub fn leave(&mut self, i: u32) {
        if let Some(n) = self.nodes.get_mut(i as usize) {
            n.gossip.leave();
            n.left = true;
        }
        self.drain(i);
        self.kill(i);
    }

    /// Restart member `i` as a new incarnation that announces to member 0.
    pub fn restart(&mut self, i: u32) {
        let Some(old) = self.nodes.get(i as usize) else {
            return;
        };
        let incarnation = old.gossip.identity().incarnation + 1;
        let mut g = self.make(i, incarnation);
        g.set_seeds(vec![sim_addr(0)]);
        self.nodes[i as usize] = SimNode {
            gossip: g,
            alive: true,
            left: false,
            group: old.group,
        };
        self.gone_seen[i as usize].clear();
        self.drain(i);
        let tick = self.now + 1_000_000;
        self.push(tick, Ev::Tick(i));
    }

    /// Split the members in `side` from everyone else.
    pub fn partition(&mut self, side: &[u32]) {
        for &i in side {
            if let Some(n) = self.nodes.get_mut(i as usize) {
                n.group = 1;
            }
        }
    }

    /// Drop every packet between `a` and `b` (both ways).
    pub fn cut(&mut self, a: u32, b: u32) {
        self.cut.insert((a.min(b), a.max(b)));
    }

    /// Undo every partition and cut.
    pub fn heal(&mut self) {
        for n in &mut self.nodes {
            n.group = 0;
        }
        self.cut.clear();
    }

    fn reachable(&self, a: u32, b: u32) -> bool {
        let (Some(x), Some(y)) = (self.nodes.get(a as usize), self.nodes.get(b as usize)) else {
            return false;
        };
        x.group == y.group && !self.cut.contains(&(a.min(b), a.max(b)))
    }

    fn live(&self) -> impl Iterator<Item = (u32, &SimNode)> {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.alive)
            .map(|(i, n)| (i as u32, n))
    }

    /// Every live member counts every other live member as active.
    pub fn full_view(&self) -> bool {
        self.full_view_fraction() >= 1.0
    }

    /// Share of live members that count every other live member as active.
    pub fn full_view_fraction(&self) -> f64 {
        let live = self.live().count();
        if live == 0 {
            return 1.0;
        }
        let full = self
            .live()
            .filter(|(_, n)| n.gossip.num_members() == live - 1)
            .count();
        full as f64 / live as f64
    }

    /// Every live member has seen member `i` go down or leave.
    pub fn gone_everywhere(&self, i: u32) -> bool {
        let seen = &self.gone_seen[i as usize];
        self.live().all(|(j, _)| j == i || seen.contains(&j))
    }

    /// Member `observer`'s view.
    pub fn view(&self, observer: u32) -> Vec<MemberInfo> {
        self.nodes
            .get(observer as usize)
            .map(|n| n.gossip.members())
            .unwrap_or_default()
    }

    /// The state `observer` gives member `i` (`None`: never heard of it).
    pub fn state_seen(&self, observer: u32, i: u32) -> Option<MemberState> {
        let name = format!("n{i}");
        self.view(observer)
            .into_iter()
            .find(|m| m.name == name)
            .map(|m| m.state)
    }

    /// Run until virtual time `now + d`.
    pub fn run_for(&mut self, d: Duration) {
        let end = self.now + us(d);
        self.run_to(end);
    }

    /// Run until `pred` holds (checked every 100 ms of virtual time) or `max` has passed;
    /// returns how long it took.
    pub fn run_until(
        &mut self,
        max: Duration,
        mut pred: impl FnMut(&Sim) -> bool,
    ) -> Option<Duration> {
        let start = self.now;
        let end = start + us(max);
        loop {
            if pred(self) {
                return Some(Duration::from_micros(self.now - start));
            }
            if self.now >= end {
                return None;
            }
            let next = (self.now + 100_000).min(end);
            self.run_to(next);
        }
    }

    fn run_to(&mut self, end: u64) {
        while let Some(item) = self.heap.peek() {
            if item.at > end {
                break;
            }
            let Some(Item { at, ev, .. }) = self.heap.pop() else {
                break;
            };
            self.now = at;
            self.stats.events += 1;
            self.step(ev);
        }
        self.now = self.now.max(end);
    }

    fn step(&mut self, ev: Ev) {
        let i = match &ev {
            Ev::Timer(i, _) | Ev::Tick(i) | Ev::Announce(i) => *i,
            Ev::Packet { to, .. } => *to,
        };
        let Some(node) = self.nodes.get_mut(i as usize) else {
            return;
        };
        if !node.alive {
            return;
        }
        match ev {
            Ev::Timer(_, t) => node.gossip.handle_timer(t),
            Ev::Tick(_) => {
                node.gossip.tick();
                let at = self.now + 1_000_000;
                self.push(at, Ev::Tick(i));
            }
            Ev::Announce(_) => node.gossip.announce_to_seeds(),
            Ev::Packet { from, data, .. } => {
                let from_name = format!("n{from}");
                if node.gossip.handle_frame(&from_name, &data).is_err() {
                    self.stats.refused_frames += 1;
                }
            }
        }
        self.drain(i);
    }

    /// Route member `i`'s output into the network and its timers into the queue.
    fn drain(&mut self, i: u32) {
        let Some(node) = self.nodes.get_mut(i as usize) else {
            return;
        };
        let out = node.gossip.take_output();
        let timers = node.gossip.take_timers();
        let events = node.gossip.take_events();
        for (to, data) in out {
            self.stats.packets += 1;
            self.stats.bytes += data.len() as u64;
            self.stats.max_packet = self.stats.max_packet.max(data.len());
            let Some(&j) = self.by_addr.get(&to.addr) else {
                continue;
            };
            if !self.reachable(i, j) || self.rng.random::<f64>() < self.cfg.loss {
                self.stats.lost += 1;
                continue;
            }
            let (lo, hi) = (
                us(self.cfg.latency.0),
                us(self.cfg.latency.1).max(us(self.cfg.latency.0) + 1),
            );
            let at = self.now + self.rng.random_range(lo..hi);
            self.push(
                at,
                Ev::Packet {
                    to: j,
                    from: i,
                    data,
                },
            );
        }
        for (after, t) in timers {
            let at = self.now + us(after);
            self.push(at, Ev::Timer(i, t));
        }
        for ev in events {
            let gone = match ev {
                MemberEvent::Down(id) | MemberEvent::Left(id) => id,
                _ => continue,
            };
            let Some(&j) = self.by_addr.get(&gone.addr) else {
                continue;
            };
            let victim = &self.nodes[j as usize];
            if victim.gossip.identity().incarnation != gone.incarnation {
                continue;
            }
            if victim.alive && self.reachable(i, j) {
                self.stats.false_downs += 1;
                if std::env::var_os("SIM_TRACE").is_some() {
                    eprintln!(
                        "t={:.2}s n{i} declared n{j} (inc {}) down",
                        self.now as f64 / 1e6,
                        gone.incarnation
                    );
                }
            }
            self.gone_seen[j as usize].insert(i);
        }
    }
}

/// One step of a scripted scenario.
#[derive(Debug, Clone)]
pub enum Step {
    /// Add members (they announce to member 0).
    Add(u32),
    Wait(Duration),
    Kill(u32),
    Leave(u32),
    Restart(u32),
    /// Cut these members off from the rest.
    Partition(Vec<u32>),
    /// Drop packets between two members.
    Cut(u32, u32),
    Heal,
    /// Every live member sees every other as active, within the time given.
    ExpectFullView(Duration),
    /// Every live member (but `member`) gives `member` this state, within the time given.
    ExpectState(u32, MemberState, Duration),
    /// Member `observer` gives `member` this state, within the time given.
    ExpectSeenBy {
        observer: u32,
        member: u32,
        state: MemberState,
        within: Duration,
    },
    /// No live, reachable member was declared down so far.
    ExpectNoFalseDown,
}

/// Run `steps`; on success, one line per step with the virtual time it completed at.
pub fn run_script(cfg: SimConfig, steps: &[Step]) -> Result<Vec<String>, String> {
    let mut sim = Sim::new(cfg);
    let mut log = Vec::new();
    for (k, step) in steps.iter().enumerate() {
        let took = match step {
            Step::Add(n) => {
                sim.add_nodes(*n);
                None
            }
            Step::Wait(d) => {
                sim.run_for(*d);
                None
            }
            Step::Kill(i) => {
                sim.kill(*i);
                None
            }
            Step::Leave(i) => {
                sim.leave(*i);
                None
            }
            Step::Restart(i) => {
                sim.restart(*i);
                None
            }
            Step::Partition(side) => {
                sim.partition(side);
                None
            }
            Step::Cut(a, b) => {
                sim.cut(*a, *b);
                None
            }
            Step::Heal => {
                sim.heal();
                None
            }
            Step::ExpectFullView(within) => {
                Some(sim.run_until(*within, |s| s.full_view()).ok_or_else(|| {
                    format!(
                        "step {k} {step:?}: only {:.1}% have the full view",
                        sim.full_view_fraction() * 100.0
                    )
                })?)
            }
            Step::ExpectState(member, state, within) => {
                let ids: Vec<u32> = sim.live().map(|(i, _)| i).filter(|i| i != member).collect();
                Some(
                    sim.run_until(*within, |s| {
                        ids.iter().all(|&o| {
                            !s.nodes[o as usize].alive || s.state_seen(o, *member) == Some(*state)
                        })
                    })
                    .ok_or_else(|| {
                        let seen: Vec<_> = ids
                            .iter()
                            .map(|&o| (o, sim.state_seen(o, *member)))
                            .filter(|(_, s)| *s != Some(*state))
                            .take(5)
                            .collect();
                        format!("step {k} {step:?}: not everywhere yet, e.g. {seen:?}")
                    })?,
                )
            }
            Step::ExpectSeenBy {
                observer,
                member,
                state,
                within,
            } => Some(
                sim.run_until(*within, |s| {
                    s.state_seen(*observer, *member) == Some(*state)
                })
                .ok_or_else(|| {
                    format!(
                        "step {k} {step:?}: n{observer} sees n{member} as {:?}",
                        sim.state_seen(*observer, *member)
                    )
                })?,
            ),
            Step::ExpectNoFalseDown => {
                if sim.stats().false_downs > 0 {
                    return Err(format!(
                        "step {k}: {} false down declarations",
                        sim.stats().false_downs
                    ));
                }
                None
            }
        };
        log.push(match took {
            Some(d) => format!(
                "t={:>7.2}s {step:?} after {:.2}s",
                sim.now().as_secs_f64(),
                d.as_secs_f64()
            ),
            None => format!("t={:>7.2}s {step:?}", sim.now().as_secs_f64()),
        });
    }
    Ok(log)
}
