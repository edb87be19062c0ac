//! One simulated node: a disk that outlives its processes, and the process running on it now.
//!
//! A process ([`Proc`]) is what a `swarm node` holds in memory: its store opened on the disk, the
//! replication shell around the sans-IO protocol (pushes waiting for a `w=2` acknowledgement,
//! anti-entropy rounds as initiator or responder, the catch-up before it serves) and its task
//! shell (`tasks`). A crash drops the process and whatever the disk had not synced; a restart
//! opens a new one on the same disk.
//!
//! The shell follows `swarm_actors::replication`'s: a write is durable here first, then pushed
//! to every peer gossip calls live (alive or suspect); with `w=2` the first peer's `Ack` answers
//! it, no answer within [`W2_TIMEOUT_US`] fails it. Every [`AE_EVERY_US`] a node runs a round
//! with a random live peer, and at once with a peer that comes back (the smaller name starts).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use rand::RngExt;
use swarm_actors::replication::protocol::{
    Ae, Initiator, Limits, Local, Push, Responder, receive_pushes,
};
use swarm_actors::{RefusalHook, ReplStats};
use swarm_storage::{Delta, MemoryType, PutRequest, SecretKey, Storage, StorageOptions, Version};

use super::disk::Disk;
use super::history::Write;
use super::net::{Class, Envelope, Msg};
use super::tasks::{SubmitAck, TaskShell};
use super::world::Ctx;

/// How long a `w=2` write waits for a peer's acknowledgement.
pub(crate) const W2_TIMEOUT_US: u64 = 2_000_000;
/// Anti-entropy period of each node.
pub(crate) const AE_EVERY_US: u64 = 5_000_000;
/// A round whose peer says nothing for this long is given up.
const ROUND_IDLE_US: u64 = 10_000_000;
/// Catch-up before serving: alone this long, it serves as it is; it serves anyway after the limit.
const CATCH_UP_ALONE_US: u64 = 2_000_000;
const CATCH_UP_LIMIT_US: u64 = 10_000_000;
/// How long a leaving process tries to complete a round with a peer before it goes anyway.
pub(crate) const HAND_OFF_LIMIT_US: u64 = 5_000_000;

/// Node `i`'s name, as gossip and the stores know it.
pub(crate) fn name(i: u32) -> String {
    format!("n{i}")
}

/// The node a name belongs to.
pub(crate) fn index(name: &str) -> Option<u32> {
    name.strip_prefix('n')?.parse().ok()
}

/// The production sizes of a round. (Smaller chunks would split a round's entries into
/// messages in the order of the protocol's hash maps, which is not the same from run to run.)
fn limits() -> Limits {
    Limits::default()
}

/// Every namespace the workload uses, with a record of this node's in each, from the first
/// boot: an anti-entropy responder then never lacks two namespaces its initiator has, whose
/// order the protocol takes from a hash map (so a round would not go the same way twice).
fn mark_namespaces(storage: &Storage, node: &str, now_ms: u64) -> Result<(), String> {
    let namespaces = [
        super::faults::NOTES.0,
        super::faults::PEOPLE.0,
        swarm_actors::tasks::model::TASKS_NAMESPACE,
    ];
    for ns in namespaces {
        let req = PutRequest {
            value_json: "{}".into(),
            ..PutRequest::default()
        };
        storage
            .memory
            .put(ns, &format!("_sim_{node}"), req, now_ms)
            .map_err(|e| format!("{node} cannot mark {ns}: {e}"))?;
    }
    storage
        .sync()
        .map_err(|e| format!("{node} cannot sync: {e}"))
}

/// A node: its disk, and its process when one runs.
#[derive(Debug)]
pub(crate) struct Node {
    pub(crate) id: u32,
    pub(crate) disk: Arc<Disk>,
    master: [u8; 32],
    boots: u64,
    pub(crate) proc: Option<Proc>,
}

impl Node {
    pub(crate) fn new(id: u32, master: [u8; 32]) -> Self {
        Self {
            id,
            disk: Arc::new(Disk::default()),
            master,
            boots: 0,
            proc: None,
        }
    }

    /// The store a process opens on this node's disk.
    pub(crate) fn open_storage(&self) -> Result<Storage, String> {
        Storage::with_engine(
            self.disk.clone(),
            SecretKey::from_bytes(self.master),
            StorageOptions::new(name(self.id)),
        )
        .map_err(|e| format!("n{} cannot open its store: {e}", self.id))
    }

    /// Start a process on the disk (the first boot, or a restart); returns its boot number.
    pub(crate) fn boot(&mut self, ctx: &mut Ctx) -> Result<u64, String> {
        let storage = self.open_storage()?;
        self.boots += 1;
        if self.boots == 1 {
            mark_namespaces(&storage, &name(self.id), ctx.now_ms(self.id))?;
        }
        let hook: RefusalHook = Arc::new(|_: &str, _: &str, _: &str| {});
        let local = Local {
            storage,
            stats: Arc::new(ReplStats::default()),
            on_refused: hook,
        };
        let tasks = TaskShell::new(ctx, self.id, self.boots);
        self.proc = Some(Proc {
            id: self.id,
            boot: self.boots,
            local,
            serving: false,
            started_us: ctx.now_us,
            alone_since_us: None,
            catch_up_tries: 0,
            next_seq: 1,
            waiters: BTreeMap::new(),
            rounds: BTreeMap::new(),
            next_ae_us: ctx.now_us + ctx.rng.random_range(0..AE_EVERY_US),
            last_live: BTreeSet::new(),
            synced: false,
            synced_with: BTreeMap::new(),
            leaving_since_us: None,
            tasks,
        });
        Ok(self.boots)
    }

    /// The process dies; the disk loses what it had not synced. Returns the changes lost.
    pub(crate) fn crash(&mut self) -> usize {
        self.proc = None;
        self.disk.crash()
    }

    /// The process stops gracefully (a leave): what it wrote is flushed first.
    pub(crate) fn stop(&mut self) {
        if let Some(p) = &self.proc {
            let _ = p.local.storage.sync();
        }
        self.proc = None;
    }
}

/// What an acknowledgement (or its absence) answers.
#[derive(Debug)]
pub(crate) enum Then {
    /// A client's write: its place in the history.
    Client(usize),
    /// A task write whose submission is answered with it.
    Task(SubmitAck),
}

#[derive(Debug)]
struct Waiter {
    deadline_us: u64,
    then: Then,
}

#[derive(Debug)]
enum Side {
    Initiator(Box<Initiator>),
    Responder(Box<Responder>),
}

/// An anti-entropy round this process takes part in.
#[derive(Debug)]
struct Round {
    peer: u32,
    /// The peer's process, once it has answered (the initiator's first message goes to any).
    peer_boot: Option<u64>,
    side: Side,
    /// When it began here: what it carries is what both sides held then.
    started_us: u64,
    last_us: u64,
    /// The initiator sent its last message (the entries it exchanged): it waits for the
    /// responder to end its side, as the replicator waits for the stream's end.
    ending: Option<u64>,
}

/// The process running on a node now.
pub(crate) struct Proc {
    pub(crate) id: u32,
    pub(crate) boot: u64,
    pub(crate) local: Local,
    /// Taking client operations (after the catch-up).
    pub(crate) serving: bool,
    started_us: u64,
    alone_since_us: Option<u64>,
    catch_up_tries: usize,
    next_seq: u64,
    waiters: BTreeMap<u64, Waiter>,
    rounds: BTreeMap<u64, Round>,
    next_ae_us: u64,
    last_live: BTreeSet<u32>,
    /// An anti-entropy round completed (either side) since start.
    synced: bool,
    /// When the latest round completed with each peer (either side) began.
    synced_with: BTreeMap<u32, u64>,
    /// Leaving gracefully since then: handing off to a peer, its task service stopped.
    pub(crate) leaving_since_us: Option<u64>,
    pub(crate) tasks: TaskShell,
}

impl std::fmt::Debug for Proc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proc")
            .field("id", &self.id)
            .field("boot", &self.boot)
            .finish_non_exhaustive()
    }
}

impl Proc {
    pub(crate) fn storage(&self) -> &Storage {
        &self.local.storage
    }

    fn envelope(&self, to: u32, to_boot: Option<u64>, msg: Msg) -> Envelope {
        Envelope {
            from: self.id,
            from_boot: self.boot,
            to,
            to_boot,
            msg,
        }
    }

    // ---- writes and pushes ----

    /// Write `value_json` under `ns`/`key` durably here; the delta to push.
    pub(crate) fn put_local(
        &self,
        ctx: &Ctx,
        ns: &str,
        key: &str,
        value_json: String,
        subject: Option<String>,
    ) -> Result<Delta, String> {
        let req = PutRequest {
            value_json,
            memory_type: MemoryType::Semantic,
            ttl_ms: None,
            subject,
            tags: Vec::new(),
        };
        let store = &self.local.storage;
        let (_, delta) = store
            .memory
            .put_with_delta(ns, key, req, ctx.now_ms(self.id))
            .map_err(|e| e.kind().to_string())?;
        store.sync().map_err(|e| e.kind().to_string())?;
        Ok(delta)
    }

    /// Push `delta` to every live peer; with `ack` they acknowledge it once durable, and the
    /// first reply (or none within [`W2_TIMEOUT_US`]) answers `then`. False when no peer is
    /// alive (the shell's `NoReplica`).
    pub(crate) fn push(
        &mut self,
        ctx: &mut Ctx,
        delta: &Delta,
        ack: bool,
        then: Option<Then>,
    ) -> bool {
        let peers = ctx.live_peers(self.id);
        if peers.is_empty() {
            return false;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        if let Some(then) = then {
            self.waiters.insert(
                seq,
                Waiter {
                    deadline_us: ctx.now_us + W2_TIMEOUT_US,
                    then,
                },
            );
        }
        for p in peers {
            let batch = vec![Push::Delta {
                seq,
                ack,
                delta: delta.clone(),
            }];
            ctx.send(self.envelope(p, None, Msg::Push(batch)), Class::Datagram);
        }
        true
    }

    /// A client's write: durable here, then acknowledged by a peer (or failed).
    pub(crate) fn client_put(
        &mut self,
        ctx: &mut Ctx,
        ns: &str,
        key: &str,
        value: String,
        subject: Option<String>,
    ) {
        let Ok(delta) = self.put_local(ctx, ns, key, value.clone(), subject.clone()) else {
            return; // refused (an erased subject): nothing happened
        };
        let i = ctx.history.writes.len();
        let op = ctx.history.next_op();
        ctx.history.writes.push(Write {
            op,
            node: self.id,
            ns: ns.to_string(),
            key: key.to_string(),
            value: Some(value),
            subject,
            version: delta.version.clone(),
            at_us: ctx.now_us,
            acked: None,
        });
        if !self.push(ctx, &delta, true, Some(Then::Client(i))) {
            ctx.history.writes[i].acked = Some(false);
        }
    }

    /// A client's delete: acknowledged once the tombstone is durable here.
    pub(crate) fn client_delete(&mut self, ctx: &mut Ctx, ns: &str, key: &str) {
        let store = &self.local.storage;
        let Ok(Some(delta)) = store.memory.delete_with_delta(ns, key, ctx.now_ms(self.id)) else {
            return;
        };
        if store.sync().is_err() {
            return;
        }
        let op = ctx.history.next_op();
        ctx.history.writes.push(Write {
            op,
            node: self.id,
            ns: ns.to_string(),
            key: key.to_string(),
            value: None,
            subject: None,
            version: delta.version.clone(),
            at_us: ctx.now_us,
            acked: Some(true),
        });
        self.push(ctx, &delta, false, None);
    }

    /// A client's erasure of `subject`: durable here, then told to every live peer.
    pub(crate) fn client_erase(&mut self, ctx: &mut Ctx, subject: &str) {
        let store = &self.local.storage;
        if store
            .memory
            .erase_subject(subject, ctx.now_ms(self.id))
            .is_err()
            || store.sync().is_err()
        {
            return;
        }
        ctx.history.erasures.push(super::history::Erasure {
            subject: subject.to_string(),
            node: self.id,
            at_us: ctx.now_us,
        });
        for p in ctx.live_peers(self.id) {
            let batch = vec![Push::Erase {
                subjects: vec![subject.to_string()],
            }];
            ctx.send(self.envelope(p, None, Msg::Push(batch)), Class::Datagram);
        }
    }

    fn resolve(&mut self, ctx: &mut Ctx, seq: u64, ok: bool) {
        let Some(w) = self.waiters.remove(&seq) else {
            return;
        };
        match w.then {
            Then::Client(i) => {
                if let Some(wr) = ctx.history.writes.get_mut(i) {
                    wr.acked.get_or_insert(ok);
                }
            }
            Then::Task(ack) => {
                let answer = if ok {
                    Ok((ack.task.clone(), false))
                } else {
                    Err("not_replicated".to_string())
                };
                self.answer(ctx, ack.reply, answer);
            }
        }
    }

    // ---- what arrives ----

    /// A message for this process.
    pub(crate) fn receive(&mut self, ctx: &mut Ctx, env: Envelope) {
        let tasks = matches!(
            env.msg,
            Msg::Submit { .. } | Msg::Submitted { .. } | Msg::RunStage { .. } | Msg::StageResult(_)
        );
        if tasks && self.leaving_since_us.is_some() {
            return; // its task service has stopped
        }
        match env.msg {
            Msg::Push(batch) => self.on_push(ctx, env.from, env.from_boot, batch),
            Msg::Ae {
                round,
                to_responder,
                msg,
            } => self.on_ae(ctx, env.from, env.from_boot, round, to_responder, msg),
            Msg::AeReset { round, .. } => {
                if self.rounds.remove(&round).is_some() {
                    ctx.counts.ae_failed += 1;
                }
            }
            Msg::Submit {
                call,
                rec,
                sent_ms,
                stale_ms,
            } => {
                let reply = super::tasks::Reply::Peer {
                    node: env.from,
                    boot: env.from_boot,
                    call,
                };
                // Read too late (its sender has passed it on): refused.
                let stale = stale_ms.min(super::tasks::FORWARD_STALE_MS);
                if ctx.now_ms(self.id).saturating_sub(sent_ms) > stale {
                    self.answer(ctx, reply, Err("timeout".into()));
                } else {
                    self.submit_here(ctx, *rec, reply);
                }
            }
            Msg::Submitted { call, answer } => self.on_submitted(ctx, call, answer),
            Msg::RunStage { run, stage } => self.host_stage(ctx, run, *stage),
            Msg::StageResult(outcome) => self.on_outcome(ctx, *outcome),
        }
    }

    fn on_push(&mut self, ctx: &mut Ctx, from: u32, from_boot: u64, batch: Vec<Push>) {
        let mut incoming = Vec::new();
        for p in batch {
            match p {
                Push::Ack { seq } => self.resolve(ctx, seq, true),
                Push::Refused { seq, .. } => self.resolve(ctx, seq, false),
                other => incoming.push(other),
            }
        }
        if incoming.is_empty() {
            return;
        }
        let replies = receive_pushes(&self.local, &name(from), incoming, ctx.now_ms(self.id));
        if !replies.is_empty() {
            let env = self.envelope(from, Some(from_boot), Msg::Push(replies));
            ctx.send(env, Class::Datagram);
        }
    }

    // ---- anti-entropy ----

    /// Start a round with `peer` (at most one at a time per peer as initiator).
    pub(crate) fn start_round(&mut self, ctx: &mut Ctx, peer: u32) {
        let busy = self
            .rounds
            .values()
            .any(|r| r.peer == peer && matches!(r.side, Side::Initiator(_)));
        if busy {
            return;
        }
        match Initiator::start(&self.local, &name(peer), limits()) {
            Ok((round, step)) => {
                let id = ctx.next_id();
                self.rounds.insert(
                    id,
                    Round {
                        peer,
                        peer_boot: None,
                        side: Side::Initiator(Box::new(round)),
                        started_us: ctx.now_us,
                        last_us: ctx.now_us,
                        ending: None,
                    },
                );
                self.send_ae(ctx, id, step.send);
            }
            Err(_) => ctx.counts.ae_failed += 1,
        }
    }

    fn send_ae(&mut self, ctx: &mut Ctx, round: u64, msgs: Vec<Ae>) {
        let Some(r) = self.rounds.get(&round) else {
            return;
        };
        let to_responder = matches!(r.side, Side::Initiator(_));
        let (peer, peer_boot) = (r.peer, r.peer_boot);
        for msg in msgs {
            let m = Msg::Ae {
                round,
                to_responder,
                msg,
            };
            ctx.send(self.envelope(peer, peer_boot, m), Class::Stream(round));
        }
    }

    fn on_ae(
        &mut self,
        ctx: &mut Ctx,
        from: u32,
        from_boot: u64,
        round: u64,
        to_responder: bool,
        msg: Ae,
    ) {
        if to_responder && !self.rounds.contains_key(&round) {
            if !matches!(msg, Ae::Hello { .. }) {
                return; // a stream this process never had
            }
            let side = Side::Responder(Box::new(Responder::new(&name(from), limits())));
            self.rounds.insert(
                round,
                Round {
                    peer: from,
                    peer_boot: Some(from_boot),
                    side,
                    started_us: ctx.now_us,
                    last_us: ctx.now_us,
                    ending: None,
                },
            );
        }
        let now_ms = ctx.now_ms(self.id);
        let Some(r) = self.rounds.get_mut(&round) else {
            return;
        };
        if let Some(entries) = r.ending {
            // The responder ended its side: it has applied everything this round sent.
            if !to_responder && matches!(msg, Ae::Done) {
                let started = r.started_us;
                self.rounds.remove(&round);
                self.round_done(from, started);
                ctx.counts.ae_rounds += 1;
                ctx.counts.ae_entries += entries;
                ctx.net.close(round);
            }
            return;
        }
        r.peer_boot.get_or_insert(from_boot);
        r.last_us = ctx.now_us;
        let started = r.started_us;
        let (result, finished, entries) = match &mut r.side {
            Side::Initiator(i) => {
                let s = i.on_message(&self.local, msg, now_ms);
                (s, i.is_finished(), i.entries)
            }
            Side::Responder(x) => {
                let s = x.on_message(&self.local, msg, now_ms);
                (s, x.is_finished(), 0)
            }
        };
        let initiator = !to_responder;
        match result {
            Ok(step) => {
                self.send_ae(ctx, round, step.send);
                if finished && initiator {
                    // Done until the responder ends its side of the stream.
                    if let Some(r) = self.rounds.get_mut(&round) {
                        r.ending = Some(entries);
                    }
                } else if finished {
                    self.rounds.remove(&round);
                    self.round_done(from, started);
                    let end = Msg::Ae {
                        round,
                        to_responder: false,
                        msg: Ae::Done,
                    };
                    ctx.send(
                        self.envelope(from, Some(from_boot), end),
                        Class::Stream(round),
                    );
                }
            }
            Err(_) => {
                ctx.counts.ae_failed += 1;
                self.rounds.remove(&round);
                let env = self.envelope(
                    from,
                    Some(from_boot),
                    Msg::Ae {
                        round,
                        to_responder: !to_responder,
                        msg: Ae::Done,
                    },
                );
                let resets = ctx.net.break_stream(ctx.now_us, &env, round);
                ctx.deliver_all(resets);
            }
        }
    }

    /// A round with `peer` that began at `started` completed (either side).
    fn round_done(&mut self, peer: u32, started: u64) {
        self.synced = true;
        let t = self.synced_with.entry(peer).or_insert(started);
        *t = (*t).max(started);
    }

    // ---- time ----

    /// Housekeeping every tick: expired waits and rounds, anti-entropy, the catch-up, tasks.
    pub(crate) fn tick(&mut self, ctx: &mut Ctx, look: bool) {
        let now = ctx.now_us;
        let expired: Vec<u64> = self
            .waiters
            .iter()
            .filter(|(_, w)| w.deadline_us <= now)
            .map(|(s, _)| *s)
            .collect();
        for seq in expired {
            self.resolve(ctx, seq, false);
        }
        let idle: Vec<u64> = self
            .rounds
            .iter()
            .filter(|(_, r)| now.saturating_sub(r.last_us) >= ROUND_IDLE_US)
            .map(|(id, _)| *id)
            .collect();
        for id in idle {
            self.rounds.remove(&id);
            ctx.net.close(id);
            ctx.counts.ae_failed += 1;
        }
        let live: BTreeSet<u32> = ctx.live_peers(self.id).into_iter().collect();
        // A peer that comes back: repair at once (the smaller name starts).
        let back: Vec<u32> = live.difference(&self.last_live).copied().collect();
        for p in back {
            if name(self.id) < name(p) {
                self.start_round(ctx, p);
            }
        }
        self.last_live = live.clone();
        if live.is_empty() {
            self.alone_since_us.get_or_insert(now);
        } else {
            self.alone_since_us = None;
        }
        if now >= self.next_ae_us {
            self.next_ae_us = now + AE_EVERY_US;
            let peers: Vec<u32> = live.iter().copied().collect();
            if !peers.is_empty() {
                let p = peers[ctx.rng.random_range(0..peers.len())];
                self.start_round(ctx, p);
            }
        }
        if self.leaving_since_us.is_some() {
            self.round_with_next(ctx, &live);
            return;
        }
        if !self.serving {
            self.catch_up(ctx, &live);
        }
        self.task_tick(ctx, look);
    }

    /// A graceful leave begins: no more client operations, the task service stops (nothing
    /// held, nothing run), and rounds with live peers start, so that a write no peer
    /// acknowledged goes with a peer rather than with this process (the node's hand-off).
    pub(crate) fn begin_leave(&mut self, ctx: &mut Ctx) {
        self.serving = false;
        self.leaving_since_us = Some(ctx.now_us);
        self.tasks = TaskShell::new(ctx, self.id, self.boot);
        let live: BTreeSet<u32> = ctx.live_peers(self.id).into_iter().collect();
        self.round_with_next(ctx, &live);
    }

    /// Whether a round with a peer (either side) that began after the leave has completed.
    pub(crate) fn handed_off(&self) -> bool {
        self.leaving_since_us
            .is_some_and(|since| self.synced_with.values().any(|t| *t >= since))
    }

    /// Before serving: a completed round with a peer, or alone long enough, or the limit.
    fn catch_up(&mut self, ctx: &mut Ctx, live: &BTreeSet<u32>) {
        let now = ctx.now_us;
        if self.synced || now.saturating_sub(self.started_us) >= CATCH_UP_LIMIT_US {
            self.serving = true;
            return;
        }
        if live.is_empty() {
            if self.alone_for(now) >= CATCH_UP_ALONE_US {
                self.serving = true;
            }
            return;
        }
        self.round_with_next(ctx, live);
    }

    /// A round with the next live peer in turn, unless one this process started still runs.
    fn round_with_next(&mut self, ctx: &mut Ctx, live: &BTreeSet<u32>) {
        let initiating = self
            .rounds
            .values()
            .any(|r| matches!(r.side, Side::Initiator(_)));
        if initiating || live.is_empty() {
            return;
        }
        let peers: Vec<u32> = live.iter().copied().collect();
        let p = peers[self.catch_up_tries % peers.len()];
        self.catch_up_tries += 1;
        self.start_round(ctx, p);
    }

    /// Whether a round with each of `peers` that began at `since` or later has completed;
    /// starts one with each peer that has none (and none running).
    pub(crate) fn synced_since(&mut self, ctx: &mut Ctx, peers: &[u32], since: u64) -> bool {
        let behind: Vec<u32> = peers
            .iter()
            .copied()
            .filter(|p| self.synced_with.get(p).is_none_or(|t| *t < since))
            .collect();
        for p in &behind {
            self.start_round(ctx, *p);
        }
        behind.is_empty()
    }

    /// How long this process has run.
    pub(crate) fn uptime(&self, now: u64) -> u64 {
        now.saturating_sub(self.started_us)
    }

    /// How long gossip has shown this process no live peer (0 when it shows one).
    pub(crate) fn alone_for(&self, now: u64) -> u64 {
        self.alone_since_us.map_or(0, |t| now.saturating_sub(t))
    }

    /// Replace the store by a fresh one on the same disk (after the disk was changed under it).
    pub(crate) fn reopen(&mut self, storage: Storage) {
        self.local.storage = storage;
        self.tasks.forget_records();
    }

    /// The version stored for `ns`/`key` (tombstones included).
    pub(crate) fn version(&self, ns: &str, key: &str) -> Option<Version> {
        self.local
            .storage
            .memory
            .record(ns, key)
            .ok()
            .flatten()
            .map(|r| r.version)
    }
}
