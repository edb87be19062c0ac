//! The replication protocol as sans-IO state machines: they read and write the local replica
//! (synchronous storage calls) and take the peer's messages, and return the messages to send. No
//! sockets, no tasks, no clock of their own: the IO shell ([`super::Replicator`]) or a test moves
//! the messages, over QUIC or over the in-memory transport ([`super::transport`]).
//!
//! - **Deltas.** [`receive_pushes`] applies a batch of pushed deltas and erasures and returns the
//!   acknowledgements (after one sync, so an `Ack` means durable). [`apply_pushes`] and
//!   [`synced`] are its two halves, for a shell whose sync is shared with other writers.
//! - **Anti-entropy.** One round between an [`Initiator`] and a [`Responder`]: destroyed subjects
//!   first (so nothing erased is revived), then namespace roots, the bucket digests of the
//!   namespaces that differ, and per group of differing buckets the (key, version) summaries,
//!   then only the entries that differ travel, both ways. Summaries and entries go in chunks of
//!   at most [`Limits::chunk_bytes`] (plus one entry), so a namespace of any size converges in
//!   frames far below the frame limit.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;

use serde::{Deserialize, Serialize};
use swarm_storage::{ApplyOutcome, Delta, Storage, Version};

use super::{RefusalHook, ReplStats};
use crate::Error;

/// Messages on a delta stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Push {
    /// Apply; acknowledge once durable when `ack`.
    Delta { seq: u64, ack: bool, delta: Delta },
    /// These subjects were erased.
    Erase { subjects: Vec<String> },
    /// Reply: `seq` is durable here.
    Ack { seq: u64 },
    /// Reply: `seq` was refused here (`code`).
    Refused { seq: u64, code: String },
}

/// A key's summary: (key, version, expires_at).
pub type Summary = (String, Version, Option<u64>);

/// Messages of an anti-entropy round (initiator A, responder B).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Ae {
    /// A→B: A's destroyed subjects and namespace (name, root, count).
    Hello {
        destroyed: Vec<String>,
        namespaces: Vec<(String, u64, u64)>,
    },
    /// B→A: B's destroyed subjects and the namespaces that differ.
    HelloReply {
        destroyed: Vec<String>,
        differ: Vec<String>,
    },
    /// A→B: A's bucket digests of `ns`.
    Buckets { ns: String, buckets: Vec<u64> },
    /// B→A: the buckets of `ns` that differ.
    BucketDiff { ns: String, differ: Vec<u16> },
    /// A→B: A's summaries of `buckets` of `ns`, in chunks; `last` on the group's final chunk.
    Summaries {
        ns: String,
        buckets: Vec<u16>,
        items: Vec<Summary>,
        last: bool,
    },
    /// B→A: entries A lacks (or has older) and keys B wants, in chunks; `last` ends the group.
    Exchange {
        ns: String,
        deltas: Vec<Delta>,
        want: Vec<String>,
        last: bool,
    },
    /// A→B: the entries B asked for, in chunks; `last` ends the group.
    Deltas {
        ns: String,
        deltas: Vec<Delta>,
        last: bool,
    },
    /// A→B: end of round.
    Done,
}

/// Sizes of a round.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Bytes of summaries or entries per message (one entry may go over it).
    pub chunk_bytes: usize,
    /// Differing buckets compared per group (the responder holds one group's summaries).
    pub group_buckets: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            chunk_bytes: 1024 * 1024,
            group_buckets: 64,
        }
    }
}

/// What this node's side of the protocol needs: its replica, counters, and whom to tell about
/// refused changes.
#[derive(Clone)]
pub struct Local {
    pub storage: Storage,
    pub stats: std::sync::Arc<ReplStats>,
    pub on_refused: RefusalHook,
}

impl std::fmt::Debug for Local {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Local").finish_non_exhaustive()
    }
}

impl Local {
    /// Apply one delta; the refusal code when refused.
    pub fn apply(&self, peer: &str, delta: &Delta, now: u64) -> Result<(), String> {
        let s = &self.stats;
        match self.storage.memory.apply_delta(delta, now) {
            Ok(ApplyOutcome::Applied) => {
                s.deltas_applied.fetch_add(1, Ordering::Relaxed);
                let lag = now.saturating_sub(delta.version.hlc.wall_ms());
                s.lag_ms_sum.fetch_add(lag, Ordering::Relaxed);
                s.lag_ms_max.fetch_max(lag, Ordering::Relaxed);
                Ok(())
            }
            Ok(ApplyOutcome::Stale) => {
                s.deltas_stale.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                let detail = format!("{}/{}: {e}", delta.namespace, delta.key);
                self.refused(peer, e.kind(), &detail);
                Err(e.kind().to_string())
            }
        }
    }

    /// Count, log and report a refused change.
    pub fn refused(&self, peer: &str, code: &str, detail: &str) {
        let s = &self.stats;
        s.deltas_refused.fetch_add(1, Ordering::Relaxed);
        *super::lock(&s.refused_by_code)
            .entry(code.to_string())
            .or_default() += 1;
        tracing::warn!(%peer, code, detail, "replicated change refused");
        (self.on_refused)(peer, code, detail);
    }

    /// Apply entries of a round (refusals are reported, not fatal), then sync once.
    fn apply_all(&self, peer: &str, deltas: &[Delta], now: u64) -> Result<(), Error> {
        if deltas.is_empty() {
            return Ok(());
        }
        for d in deltas {
            let _ = self.apply(peer, d, now);
        }
        Ok(self.storage.sync()?)
    }

    fn merge_destroyed(&self, subjects: &[String], now: u64) -> Result<(), Error> {
        if subjects.is_empty() {
            return Ok(());
        }
        let n = self.storage.memory.merge_destroyed(subjects, now)?;
        if n > 0 {
            tracing::info!(subjects = n, "erasures from a peer applied");
        }
        Ok(())
    }
}

/// Apply a batch of pushes from `peer`; returns the replies to send (after one sync, so every
/// `Ack` is durable; if the sync fails they become refusals).
pub fn receive_pushes(local: &Local, peer: &str, batch: Vec<Push>, now: u64) -> Vec<Push> {
    let replies = apply_pushes(local, peer, batch, now);
    if replies.is_empty() {
        return replies;
    }
    synced(replies, local.storage.sync().map_err(|e| e.to_string()))
}

/// The store's part of [`receive_pushes`]: apply the batch and return the replies it owes,
/// which may go out only once a sync after this call succeeded ([`synced`]).
pub fn apply_pushes(local: &Local, peer: &str, batch: Vec<Push>, now: u64) -> Vec<Push> {
    let mut replies = Vec::new();
    for p in batch {
        match p {
            Push::Delta { seq, ack, delta } => match local.apply(peer, &delta, now) {
                Ok(()) if ack => replies.push(Push::Ack { seq }),
                Err(code) if ack => replies.push(Push::Refused { seq, code }),
                _ => {}
            },
            Push::Erase { subjects } => {
                if let Err(e) = local.storage.memory.merge_destroyed(&subjects, now) {
                    tracing::warn!(%peer, error = %e, "erasure from peer not applied");
                }
            }
            Push::Ack { .. } | Push::Refused { .. } => {}
        }
    }
    replies
}

/// The replies of [`apply_pushes`] after the sync that followed it: unchanged when it
/// succeeded, every `Ack` a refusal (`storage`) when it failed.
pub fn synced(replies: Vec<Push>, sync: Result<(), String>) -> Vec<Push> {
    let Err(e) = sync else {
        return replies;
    };
    tracing::error!(error = %e, "sync after replicated writes failed");
    replies
        .into_iter()
        .map(|r| match r {
            Push::Ack { seq } => Push::Refused {
                seq,
                code: "storage".into(),
            },
            other => other,
        })
        .collect()
}

/// What a step of a round produced.
#[derive(Debug, Default)]
pub struct Step {
    /// Messages to send to the peer, in order.
    pub send: Vec<Ae>,
    /// The round is over (this side sends nothing more after `send`).
    pub done: bool,
}

fn unexpected(peer: &str, what: &str, got: &Ae) -> Error {
    Error::Frame {
        peer: peer.to_string(),
        message: format!(
            "expected {what} in an anti-entropy round, got {}",
            name(got)
        ),
    }
}

fn name(m: &Ae) -> &'static str {
    match m {
        Ae::Hello { .. } => "Hello",
        Ae::HelloReply { .. } => "HelloReply",
        Ae::Buckets { .. } => "Buckets",
        Ae::BucketDiff { .. } => "BucketDiff",
        Ae::Summaries { .. } => "Summaries",
        Ae::Exchange { .. } => "Exchange",
        Ae::Deltas { .. } => "Deltas",
        Ae::Done => "Done",
    }
}

/// Rough encoded size of an entry, for chunking (postcard is compact; this errs high).
fn delta_size(d: &Delta) -> usize {
    let value = d.value.as_ref().map_or(0, |v| {
        v.value_json.len()
            + v.subject.as_ref().map_or(0, String::len)
            + v.tags.iter().map(|t| t.len() + 2).sum::<usize>()
            + 8
    });
    d.namespace.len() + d.key.len() + d.version.origin.len() + value + 48
}

fn summary_size(s: &Summary) -> usize {
    s.0.len() + s.1.origin.len() + 40
}

/// Split `items` into runs of at most `budget` bytes (by `size`), each at least one item; an
/// empty input is one empty run, so a group always sends its closing message.
fn chunks<T>(items: Vec<T>, budget: usize, size: impl Fn(&T) -> usize) -> Vec<Vec<T>> {
    let mut out = vec![Vec::new()];
    let mut used = 0;
    for item in items {
        let n = size(&item);
        if let Some(cur) = out.last_mut()
            && !cur.is_empty()
            && used + n > budget
        {
            out.push(Vec::new());
            used = 0;
        }
        used += n;
        if let Some(cur) = out.last_mut() {
            cur.push(item);
        }
    }
    out
}

/// Either side of a round, as the IO shell drives it: messages in, steps out, until finished.
pub trait Side: Send + 'static {
    fn on_message(&mut self, local: &Local, msg: Ae, now: u64) -> Result<Step, Error>;
    fn is_finished(&self) -> bool;
}

impl Side for Initiator {
    fn on_message(&mut self, local: &Local, msg: Ae, now: u64) -> Result<Step, Error> {
        Initiator::on_message(self, local, msg, now)
    }

    fn is_finished(&self) -> bool {
        Initiator::is_finished(self)
    }
}

impl Side for Responder {
    fn on_message(&mut self, local: &Local, msg: Ae, now: u64) -> Result<Step, Error> {
        Responder::on_message(self, local, msg, now)
    }

    fn is_finished(&self) -> bool {
        Responder::is_finished(self)
    }
}

#[derive(Debug)]
enum AState {
    HelloSent,
    BucketsSent {
        ns: String,
    },
    /// Summaries of a group sent; exchange chunks arriving.
    Exchanging {
        ns: String,
        want: Vec<String>,
    },
    Finished,
}

/// The side that starts a round.
#[derive(Debug)]
pub struct Initiator {
    peer: String,
    limits: Limits,
    state: AState,
    namespaces: VecDeque<String>,
    groups: VecDeque<Vec<u16>>,
    /// Entries that travelled, both ways.
    pub entries: u64,
}

impl Initiator {
    /// Start a round with `peer`: the `Hello` to send.
    pub fn start(local: &Local, peer: &str, limits: Limits) -> Result<(Self, Step), Error> {
        let store = &local.storage.memory;
        let destroyed = store.destroyed_subjects()?;
        let mut namespaces = Vec::new();
        for n in store.namespaces()? {
            let d = store.digest(&n)?;
            namespaces.push((n, d.root, d.count));
        }
        let me = Self {
            peer: peer.to_string(),
            limits,
            state: AState::HelloSent,
            namespaces: VecDeque::new(),
            groups: VecDeque::new(),
            entries: 0,
        };
        let step = Step {
            send: vec![Ae::Hello {
                destroyed,
                namespaces,
            }],
            done: false,
        };
        Ok((me, step))
    }

    pub fn is_finished(&self) -> bool {
        matches!(self.state, AState::Finished)
    }

    /// Take the responder's next message.
    pub fn on_message(&mut self, local: &Local, msg: Ae, now: u64) -> Result<Step, Error> {
        let state = std::mem::replace(&mut self.state, AState::Finished);
        let mut step = Step::default();
        match (state, msg) {
            (AState::HelloSent, Ae::HelloReply { destroyed, differ }) => {
                local.merge_destroyed(&destroyed, now)?;
                self.namespaces = differ.into();
                self.next_namespace(local, &mut step)?;
            }
            (AState::BucketsSent { ns }, Ae::BucketDiff { ns: n2, differ }) if n2 == ns => {
                self.groups = differ
                    .chunks(self.limits.group_buckets.max(1))
                    .map(<[u16]>::to_vec)
                    .collect();
                self.next_group(local, ns, &mut step)?;
            }
            (
                AState::Exchanging { ns, mut want },
                Ae::Exchange {
                    ns: n2,
                    deltas,
                    want: w,
                    last,
                },
            ) if n2 == ns => {
                self.entries += (deltas.len() + w.len()) as u64;
                local.apply_all(&self.peer, &deltas, now)?;
                want.extend(w);
                if !last {
                    self.state = AState::Exchanging { ns, want };
                    return Ok(step);
                }
                let store = &local.storage.memory;
                let mut out = Vec::with_capacity(want.len());
                for k in want {
                    if let Some(d) = store.delta(&ns, &k)? {
                        out.push(d);
                    }
                }
                let parts = chunks(out, self.limits.chunk_bytes, delta_size);
                let n = parts.len();
                for (i, deltas) in parts.into_iter().enumerate() {
                    step.send.push(Ae::Deltas {
                        ns: ns.clone(),
                        deltas,
                        last: i + 1 == n,
                    });
                }
                self.next_group(local, ns, &mut step)?;
            }
            (AState::HelloSent, m) => return Err(unexpected(&self.peer, "HelloReply", &m)),
            (AState::BucketsSent { .. }, m) => {
                return Err(unexpected(&self.peer, "BucketDiff", &m));
            }
            (AState::Exchanging { .. }, m) => {
                return Err(unexpected(&self.peer, "Exchange", &m));
            }
            (AState::Finished, m) => return Err(unexpected(&self.peer, "nothing", &m)),
        }
        step.done = self.is_finished();
        Ok(step)
    }

    /// Summaries of the next group of `ns`, or on to the next namespace.
    fn next_group(&mut self, local: &Local, ns: String, step: &mut Step) -> Result<(), Error> {
        let Some(group) = self.groups.pop_front() else {
            return self.next_namespace(local, step);
        };
        let items = local.storage.memory.bucket_summaries(&ns, &group)?;
        let parts = chunks(items, self.limits.chunk_bytes, summary_size);
        let n = parts.len();
        for (i, items) in parts.into_iter().enumerate() {
            step.send.push(Ae::Summaries {
                ns: ns.clone(),
                buckets: group.clone(),
                items,
                last: i + 1 == n,
            });
        }
        self.state = AState::Exchanging {
            ns,
            want: Vec::new(),
        };
        Ok(())
    }

    fn next_namespace(&mut self, local: &Local, step: &mut Step) -> Result<(), Error> {
        match self.namespaces.pop_front() {
            Some(ns) => {
                let buckets = local.storage.memory.digest(&ns)?.buckets;
                step.send.push(Ae::Buckets {
                    ns: ns.clone(),
                    buckets,
                });
                self.state = AState::BucketsSent { ns };
            }
            None => {
                step.send.push(Ae::Done);
                self.state = AState::Finished;
            }
        }
        Ok(())
    }
}

#[derive(Debug)]
enum BState {
    AwaitHello,
    /// Between groups: `Buckets`, `Summaries` or `Done` next.
    Ready,
    /// Summaries of a group arriving.
    Summaries {
        ns: String,
        buckets: Vec<u16>,
        items: Vec<Summary>,
    },
    /// Exchange sent; the initiator's entries arriving.
    AwaitDeltas {
        ns: String,
    },
    Finished,
}

/// The side that answers a round.
#[derive(Debug)]
pub struct Responder {
    peer: String,
    limits: Limits,
    state: BState,
    /// Namespaces this round may touch (those found to differ): a peer cannot make this node
    /// walk namespaces outside them.
    differ: HashSet<String>,
    /// Summaries held for the current group (bounded by the peer's group, counted to refuse a
    /// peer that never ends one).
    held_bytes: usize,
}

impl Responder {
    pub fn new(peer: &str, limits: Limits) -> Self {
        Self {
            peer: peer.to_string(),
            limits,
            state: BState::AwaitHello,
            differ: HashSet::new(),
            held_bytes: 0,
        }
    }

    pub fn is_finished(&self) -> bool {
        matches!(self.state, BState::Finished)
    }

    /// Take the initiator's next message.
    pub fn on_message(&mut self, local: &Local, msg: Ae, now: u64) -> Result<Step, Error> {
        let state = std::mem::replace(&mut self.state, BState::Finished);
        let mut step = Step::default();
        let store = &local.storage.memory;
        match (state, msg) {
            (
                BState::AwaitHello,
                Ae::Hello {
                    destroyed,
                    namespaces,
                },
            ) => {
                local.merge_destroyed(&destroyed, now)?;
                let mine = store.destroyed_subjects()?;
                let theirs: HashMap<String, (u64, u64)> = namespaces
                    .into_iter()
                    .map(|(n, root, count)| (n, (root, count)))
                    .collect();
                let mut differ = Vec::new();
                let mut local_ns = HashSet::new();
                for n in store.namespaces()? {
                    let d = store.digest(&n)?;
                    if theirs.get(&n) != Some(&(d.root, d.count)) {
                        differ.push(n.clone());
                    }
                    local_ns.insert(n);
                }
                differ.extend(theirs.into_keys().filter(|n| !local_ns.contains(n)));
                self.differ = differ.iter().cloned().collect();
                step.send.push(Ae::HelloReply {
                    destroyed: mine,
                    differ,
                });
                self.state = BState::Ready;
            }
            (BState::Ready, Ae::Buckets { ns, buckets }) if self.differ.contains(&ns) => {
                let mine = store.digest(&ns)?.buckets;
                let differ = (0..mine.len().max(buckets.len()))
                    .filter(|&i| mine.get(i) != buckets.get(i))
                    .filter_map(|i| u16::try_from(i).ok())
                    .collect();
                step.send.push(Ae::BucketDiff { ns, differ });
                self.state = BState::Ready;
            }
            (
                BState::Ready,
                Ae::Summaries {
                    ns,
                    buckets,
                    items,
                    last,
                },
            ) if self.differ.contains(&ns) => {
                self.held_bytes = 0;
                self.summaries(local, ns, buckets, items, last, &mut step)?;
            }
            (
                BState::Summaries {
                    ns,
                    buckets,
                    items: mut held,
                },
                Ae::Summaries {
                    ns: n2,
                    buckets: b2,
                    items,
                    last,
                },
            ) if n2 == ns && b2 == buckets => {
                held.extend(items);
                self.summaries(local, ns, buckets, held, last, &mut step)?;
            }
            (
                BState::AwaitDeltas { ns },
                Ae::Deltas {
                    ns: n2,
                    deltas,
                    last,
                },
            ) if n2 == ns => {
                local.apply_all(&self.peer, &deltas, now)?;
                self.state = if last {
                    BState::Ready
                } else {
                    BState::AwaitDeltas { ns }
                };
            }
            (BState::Ready, Ae::Done) => {
                step.done = true;
                self.state = BState::Finished;
            }
            (BState::AwaitHello, m) => return Err(unexpected(&self.peer, "Hello", &m)),
            (BState::Ready, m) => {
                return Err(unexpected(
                    &self.peer,
                    "Buckets, Summaries or Done of a differing namespace",
                    &m,
                ));
            }
            (BState::Summaries { .. }, m) => {
                return Err(unexpected(&self.peer, "more Summaries", &m));
            }
            (BState::AwaitDeltas { .. }, m) => {
                return Err(unexpected(&self.peer, "Deltas", &m));
            }
            (BState::Finished, m) => return Err(unexpected(&self.peer, "nothing", &m)),
        }
        Ok(step)
    }

    /// Hold a group's summaries until its last chunk, then answer it.
    fn summaries(
        &mut self,
        local: &Local,
        ns: String,
        buckets: Vec<u16>,
        theirs: Vec<Summary>,
        last: bool,
        step: &mut Step,
    ) -> Result<(), Error> {
        if !last {
            self.held_bytes += theirs.iter().map(summary_size).sum::<usize>();
            // A group covers at most `group_buckets` of 1024 buckets; a peer that sends more than
            // a whole namespace's worth of summaries for one group is refused.
            if self.held_bytes > 64 * self.limits.chunk_bytes.max(1 << 20) {
                return Err(Error::Frame {
                    peer: self.peer.clone(),
                    message: "anti-entropy group without an end".into(),
                });
            }
            self.state = BState::Summaries {
                ns,
                buckets,
                items: theirs,
            };
            return Ok(());
        }
        let store = &local.storage.memory;
        let mine: HashMap<String, (Version, Option<u64>)> = store
            .bucket_summaries(&ns, &buckets)?
            .into_iter()
            .map(|(k, v, e)| (k, (v, e)))
            .collect();
        let theirs: HashMap<String, (Version, Option<u64>)> =
            theirs.into_iter().map(|(k, v, e)| (k, (v, e))).collect();
        // Every entry whose summary differs travels both ways: merging is idempotent, and the
        // merge (not this comparison) decides who wins.
        let mut deltas = Vec::new();
        for (k, mv) in &mine {
            if theirs.get(k) != Some(mv)
                && let Some(d) = store.delta(&ns, k)?
            {
                deltas.push(d);
            }
        }
        let want: Vec<String> = theirs
            .into_iter()
            .filter(|(k, tv)| mine.get(k) != Some(tv))
            .map(|(k, _)| k)
            .collect();
        let delta_parts = chunks(deltas, self.limits.chunk_bytes, delta_size);
        let mut want_parts = chunks(want, self.limits.chunk_bytes, |k| k.len() + 2).into_iter();
        let n = delta_parts.len().max(want_parts.len());
        let mut delta_parts = delta_parts.into_iter();
        for i in 0..n {
            step.send.push(Ae::Exchange {
                ns: ns.clone(),
                deltas: delta_parts.next().unwrap_or_default(),
                want: want_parts.next().unwrap_or_default(),
                last: i + 1 == n,
            });
        }
        self.state = BState::AwaitDeltas { ns };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_respect_the_budget_and_never_split_an_item() {
        let parts = chunks(vec![3usize, 3, 3, 10, 1], 6, |n| *n);
        assert_eq!(parts, vec![vec![3, 3], vec![3], vec![10], vec![1]]);
        let empty: Vec<Vec<usize>> = chunks(Vec::new(), 6, |n| *n);
        assert_eq!(empty, vec![Vec::<usize>::new()]);
    }
}
