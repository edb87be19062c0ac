//! The memory service: one memory operation as a whole, for whoever writes (the gateway's
//! handlers, agents).
//!
//! A change runs in this order, and no caller holds the sequence itself:
//! 1. the store validates it and applies it to the local replica (a blocking task, off the async
//!    workers; a [`Memory::put_many`] of a few small records runs on the async worker);
//! 2. in the same blocking task its audit entry is committed through the node's [`AuditSink`]:
//!    the entry and the write become durable with one sync shared with every other commit of the
//!    writer's batch (group commit), and only then does the operation go on (a
//!    [`Memory::put_many`] hands its entries over and awaits the sync's outcome on the async
//!    side, so no thread sleeps on it);
//! 3. its delta is pushed to the peers; with `w2` the operation waits until one of them has it
//!    durable too;
//! 4. the caller gets the outcome.
//!
//! Audit: every change is committed with outcome `ok` before its operation returns. A refusal
//! (an invalid name, a value too large, an erased subject, a store failure) changes nothing and
//! is submitted with outcome `error`, the status and code coming from the service's
//! [`RefusalCodes`]: the gateway passes the mapping of its HTTP responses, so an entry reads the
//! same whichever layer writes it. A write no peer confirmed stays durable here with its `ok`
//! entry and returns [`Error::NotReplicated`]. A delete that finds nothing is a refusal
//! ([`Error::NotFound`]). So every operation is audited exactly once, here.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use swarm_storage::{
    AuditEvent, AuditSink, Commit, Committed, Delta, MemoryItem, PutRequest, Storage, StorageError,
};
use tokio::sync::oneshot;
use tracing::Instrument;

use crate::{Error, Replicator};

/// Audit status of a change that went through: the log's statuses are the gateway's, and a
/// change is the same change whoever asked for it.
const OK_STATUS: u16 = 200;

/// A [`Memory::put_many`] of at most this many records, of at most [`INLINE_BYTES`] of values
/// together, is written on the async worker that asks: tens of microseconds of encryption and
/// in-memory tree work (sled writes its log on its own threads), less than handing it to a
/// blocking thread and back. Larger changes go to a blocking thread.
const INLINE_WRITES: usize = 4;
const INLINE_BYTES: usize = 16 * 1024;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Who asks for an operation, as its audit entry names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The principal: a subject, an agent id, `system`.
    pub actor: String,
    /// Ties the entry to a request; empty when there is none.
    pub request_id: String,
    /// The permission exercised, e.g. `memory.write`.
    pub action: String,
    /// What it was exercised on, e.g. `memory/ns/key`. The caller keeps it short (the gateway
    /// clips it).
    pub resource: String,
}

impl Caller {
    pub fn new(
        actor: impl Into<String>,
        action: impl Into<String>,
        resource: impl Into<String>,
    ) -> Self {
        Self {
            actor: actor.into(),
            request_id: String::new(),
            action: action.into(),
            resource: resource.into(),
        }
    }

    /// The same caller, tied to request `id`.
    pub fn with_request_id(mut self, id: impl Into<String>) -> Self {
        self.request_id = id.into();
        self
    }
}

/// The status and code a refusal's audit entry records. Without one given, status 0 and
/// [`Error::kind`].
pub type RefusalCodes = fn(&Error) -> (u16, &'static str);

fn kind_codes(e: &Error) -> (u16, &'static str) {
    (0, e.kind())
}

#[derive(Debug, Clone)]
struct Inner {
    node: String,
    storage: Storage,
    replicator: Option<Replicator>,
    audit: Arc<dyn AuditSink>,
    refusal_codes: RefusalCodes,
}

impl Inner {
    /// Audit a refusal (queued: the caller is not held up by it).
    fn refused(&self, caller: &Caller, e: &Error) {
        self.submit(self.refusal(caller, e));
    }

    /// The entry of a refusal.
    fn refusal(&self, caller: &Caller, e: &Error) -> AuditEvent {
        let (status, code) = (self.refusal_codes)(e);
        tracing::debug!(error = %e, code, "memory operation refused");
        self.event(caller, "error", status, Some(code))
    }

    fn submit(&self, event: AuditEvent) {
        if let Err(lost) = self.audit.submit(event) {
            // The sink counts and reports its own losses.
            tracing::debug!(error = %lost, "refusal not audited");
        }
    }

    fn event(&self, caller: &Caller, outcome: &str, status: u16, code: Option<&str>) -> AuditEvent {
        AuditEvent {
            ts_ms: now_ms(),
            node: self.node.clone(),
            request_id: caller.request_id.clone(),
            actor: caller.actor.clone(),
            action: caller.action.clone(),
            resource: caller.resource.clone(),
            outcome: outcome.to_string(),
            status,
            code: code.map(String::from),
        }
    }
}

/// One write of [`Memory::put_many`].
#[derive(Debug, Clone)]
pub struct Put {
    pub caller: Caller,
    pub namespace: String,
    pub key: String,
    pub req: PutRequest,
}

/// The store's part of [`Memory::put_many`]: each put in order until one is refused. Returns
/// what was written, the refusal that stopped it, and the commit of the `ok` entries of those
/// written (`None` when nothing was) for the caller to hand to the audit sink;
/// [`Written::committed`] brings its outcome. The refusal is audited after those entries, and
/// when the commit fails each write is audited as refused with its error: by the commit's
/// callback, so whether or not anyone waits for the outcome.
fn write_in_order(inner: &Arc<Inner>, puts: Vec<Put>) -> (Written, Option<Commit>) {
    let mut written = Vec::with_capacity(puts.len());
    let mut callers = Vec::with_capacity(puts.len());
    let mut refused = None;
    for p in puts {
        match inner
            .storage
            .memory
            .put_with_delta(&p.namespace, &p.key, p.req, now_ms())
        {
            Ok(out) => {
                written.push(out);
                callers.push(p.caller);
            }
            Err(e) => {
                refused = Some((p.caller, Error::from(e)));
                break;
            }
        }
    }
    let last = refused.as_ref().map(|(c, e)| inner.refusal(c, e));
    let refused = refused.map(|(_, e)| e);
    if callers.is_empty() {
        if let Some(event) = last {
            inner.submit(event);
        }
        let written = Written {
            written,
            refused,
            committed: None,
        };
        return (written, None);
    }
    let events = callers
        .iter()
        .map(|c| inner.event(c, "ok", OK_STATUS, None))
        .collect();
    let (tx, rx) = oneshot::channel();
    let i = inner.clone();
    // Runs on the audit writer's thread once the batch is synced: only queues entries.
    let done: Committed = Box::new(move |r| {
        let r = r.map_err(Error::from);
        if let Err(e) = &r {
            for c in &callers {
                i.refused(c, e);
            }
        }
        // Audited after the writes before it, in the order they were asked for.
        if let Some(event) = last {
            i.submit(event);
        }
        let _ = tx.send(r);
    });
    let written = Written {
        written,
        refused,
        committed: Some(rx),
    };
    (written, Some(Commit { events, done }))
}

/// What [`write_in_order`] wrote, the refusal that stopped it, and the outcome of its commit to
/// come (`None` when nothing was written).
struct Written {
    written: Vec<(MemoryItem, Delta)>,
    refused: Option<Error>,
    committed: Option<oneshot::Receiver<Result<(), Error>>>,
}

/// The memory service of one node. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Memory {
    inner: Arc<Inner>,
}

impl Memory {
    /// Over this node's store, pushing to `replicator`'s peers (`None`: this node does not
    /// replicate) and auditing into `audit`; `node` names this node in the audit entries.
    pub fn new(
        node: impl Into<String>,
        storage: Storage,
        replicator: Option<Replicator>,
        audit: Arc<dyn AuditSink>,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                node: node.into(),
                storage,
                replicator,
                audit,
                refusal_codes: kind_codes,
            }),
        }
    }

    /// The same service, recording refusals with `codes` (the gateway's HTTP status and code).
    pub fn with_refusal_codes(self, codes: RefusalCodes) -> Self {
        let mut inner = Arc::unwrap_or_clone(self.inner);
        inner.refusal_codes = codes;
        Self {
            inner: Arc::new(inner),
        }
    }

    /// Audit a refusal decided outside the service (e.g. an agent's read or write the policy
    /// denied): recorded like the service's own refusals, queued.
    pub fn refuse(&self, caller: &Caller, e: &Error) {
        self.inner.refused(caller, e);
    }

    /// The store (reads are local and go to it directly).
    pub fn storage(&self) -> &Storage {
        &self.inner.storage
    }

    /// Write `req` under `namespace`/`key`; returns the stored item once it is durable and
    /// audited here and, with `w2`, on one peer too. [`Error::NotReplicated`]: durable here, but
    /// the push failed or (with `w2`) no peer confirmed it.
    pub async fn put(
        &self,
        caller: Caller,
        namespace: String,
        key: String,
        req: PutRequest,
        w2: bool,
    ) -> Result<MemoryItem, Error> {
        let span = tracing::debug_span!(
            "memory.put",
            namespace = %namespace,
            key = %key,
            actor = %caller.actor,
            request_id = %caller.request_id,
            w2,
        );
        async move {
            let (item, delta) = self
                .change(&caller, move |s| {
                    Ok(s.memory.put_with_delta(&namespace, &key, req, now_ms())?)
                })
                .await?;
            self.replicate(std::slice::from_ref(&delta), w2).await?;
            Ok(item)
        }
        .instrument(span)
        .await
    }

    /// Write `puts` in order as one change: one step on the store, their audit entries
    /// committed with one sync, their deltas pushed together and, with `w2`, each confirmed by
    /// one peer. Returns the items once all are durable. A put the store refuses stops the rest
    /// and its error is returned; those before it stay written, audited and pushed.
    /// [`Error::NotReplicated`] as [`Memory::put`].
    pub async fn put_many(&self, puts: Vec<Put>, w2: bool) -> Result<Vec<MemoryItem>, Error> {
        let span = tracing::debug_span!("memory.put_many", writes = puts.len(), w2);
        async move {
            let inner = self.inner.clone();
            let small = puts.len() <= INLINE_WRITES
                && puts.iter().map(|p| p.req.value_json.len()).sum::<usize>() <= INLINE_BYTES;
            let Written {
                written,
                refused,
                committed,
            } = if small {
                // A few small records (a task's step): written here, which costs less than a
                // blocking thread's wake-up and back. The commit is handed over without
                // blocking, or off the async workers when the writer's queue is full.
                let (written, commit) = write_in_order(&inner, puts);
                if let Some(c) = commit
                    && let Err(c) = inner.audit.try_commit_many_then(c.events, c.done)
                {
                    let i = inner.clone();
                    drop(tokio::task::spawn_blocking(move || {
                        i.audit.commit_many_then(c.events, c.done);
                    }));
                }
                written
            } else {
                let span = tracing::Span::current();
                tokio::task::spawn_blocking(move || {
                    span.in_scope(|| {
                        let (written, commit) = write_in_order(&inner, puts);
                        if let Some(c) = commit {
                            inner.audit.commit_many_then(c.events, c.done);
                        }
                        written
                    })
                })
                .await
                .map_err(|e| {
                    Error::Storage(StorageError::Engine(format!("blocking task failed: {e}")))
                })?
            };
            // The sync the writes wait for is awaited here, so no thread sleeps on it.
            if let Some(c) = committed {
                c.await.map_err(|_| {
                    Error::Storage(StorageError::Engine("the audit commit was dropped".into()))
                })??;
            }
            let (items, deltas): (Vec<MemoryItem>, Vec<Delta>) = written.into_iter().unzip();
            let pushed = if deltas.is_empty() {
                Ok(())
            } else {
                self.replicate(&deltas, w2).await
            };
            // A refusal is the answer even when the push of the writes before it failed too:
            // the caller must not take the refused write for one that only lacks a replica.
            if let Some(e) = refused {
                if let Err(p) = pushed {
                    tracing::debug!(error = %p, "writes before a refused one not replicated");
                }
                return Err(e);
            }
            pushed.map(|()| items)
        }
        .instrument(span)
        .await
    }

    /// Push the deltas of a change to the peers; with `w2`, wait for one to confirm each.
    /// [`Error::NotReplicated`] when that fails, or with `w2` when this node does not replicate.
    async fn replicate(&self, deltas: &[Delta], w2: bool) -> Result<(), Error> {
        match &self.inner.replicator {
            Some(r) => r
                .push_many(deltas, w2)
                .await
                .map_err(|e| Error::NotReplicated(Box::new(e))),
            None if w2 => Err(Error::NotReplicated(Box::new(Error::NoReplicator))),
            None => Ok(()),
        }
    }

    /// Write a record of the node's own (the replicated authentication state in its reserved
    /// namespaces): durable and audited here, then pushed to every live peer without waiting. A
    /// lost push is left to anti-entropy, so it is logged, not returned.
    pub async fn put_record(
        &self,
        caller: Caller,
        namespace: String,
        key: String,
        req: PutRequest,
    ) -> Result<MemoryItem, Error> {
        let span = tracing::debug_span!(
            "memory.put_record",
            namespace = %namespace,
            key = %key,
            actor = %caller.actor,
            request_id = %caller.request_id,
        );
        async move {
            let (item, delta) = self
                .change(&caller, move |s| {
                    Ok(s.memory.put_with_delta(&namespace, &key, req, now_ms())?)
                })
                .await?;
            self.push_best_effort(&delta).await;
            Ok(item)
        }
        .instrument(span)
        .await
    }

    /// Delete `namespace`/`key`: returns once the tombstone is durable and audited here (pushed
    /// to the peers without waiting; anti-entropy carries it if a push is lost).
    /// [`Error::NotFound`] (audited as a refusal) when there is nothing to delete.
    pub async fn delete(
        &self,
        caller: Caller,
        namespace: String,
        key: String,
    ) -> Result<(), Error> {
        let span = tracing::debug_span!(
            "memory.delete",
            namespace = %namespace,
            key = %key,
            actor = %caller.actor,
            request_id = %caller.request_id,
        );
        async move {
            let delta = self
                .change(&caller, move |s| {
                    s.memory
                        .delete_with_delta(&namespace, &key, now_ms())?
                        .ok_or_else(|| Error::NotFound(format!("memory/{namespace}/{key}")))
                })
                .await?;
            self.push_best_effort(&delta).await;
            Ok(())
        }
        .instrument(span)
        .await
    }

    /// Crypto-shred everything of `subject`: its key is destroyed here (durable and audited),
    /// then every live peer is told; one that is down gets it from anti-entropy. Returns whether
    /// the subject had a key here. Erasing again is allowed (and repairs an interrupted erase).
    pub async fn erase_subject(&self, caller: Caller, subject: String) -> Result<bool, Error> {
        let span = tracing::debug_span!(
            "memory.erase_subject",
            actor = %caller.actor,
            request_id = %caller.request_id,
        );
        async move {
            let id = subject.clone();
            let existed = self
                .change(&caller, move |s| {
                    // A change even when the subject had no key here: the erasure is recorded.
                    Ok(s.memory.erase_subject(&id, now_ms())?)
                })
                .await?;
            if let Some(r) = &self.inner.replicator {
                r.push_erasure(vec![subject]);
            }
            Ok(existed)
        }
        .instrument(span)
        .await
    }

    /// Run `write` on the store off the async workers, then commit the caller's `ok` entry in
    /// the same blocking task. An error is audited as a refusal there too, so the operation is
    /// audited exactly once even when its caller stops waiting for it.
    async fn change<T: Send + 'static>(
        &self,
        caller: &Caller,
        write: impl FnOnce(&Storage) -> Result<T, Error> + Send + 'static,
    ) -> Result<T, Error> {
        let inner = self.inner.clone();
        let c = caller.clone();
        let span = tracing::Span::current();
        let joined = tokio::task::spawn_blocking(move || {
            span.in_scope(|| {
                let done = write(&inner.storage).and_then(|out| {
                    inner.audit.commit(inner.event(&c, "ok", OK_STATUS, None))?;
                    Ok(out)
                });
                if let Err(e) = &done {
                    inner.refused(&c, e);
                }
                done
            })
        })
        .await;
        joined.unwrap_or_else(|e| {
            let e = Error::Storage(StorageError::Engine(format!("blocking task failed: {e}")));
            self.inner.refused(caller, &e);
            Err(e)
        })
    }

    /// Push `delta` to every live peer without waiting for any of them.
    async fn push_best_effort(&self, delta: &Delta) {
        if let Some(r) = &self.inner.replicator
            && let Err(e) = r.push(delta, false).await
        {
            tracing::warn!(error = %e, "change not pushed; anti-entropy will carry it");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Duration;

    use swarm_config::{HumanDuration, ReplicationConfig};
    use swarm_storage::{MemEngine, SecretKey, StorageOptions, trees};

    use super::*;
    use crate::{MemNet, RefusalHook};

    /// Records what it is given; a commit also notes how many memory records the store held
    /// (made durable first, like the node's writer), so a test sees the write came before it.
    #[derive(Debug, Default)]
    struct Recorder {
        storage: Mutex<Option<Storage>>,
        events: Mutex<Vec<Seen>>,
    }

    #[derive(Debug, Clone)]
    struct Seen {
        committed: bool,
        records_then: usize,
        event: AuditEvent,
    }

    impl Recorder {
        fn events(&self) -> Vec<Seen> {
            self.events.lock().expect("lock").clone()
        }
    }

    impl AuditSink for Recorder {
        fn submit(&self, event: AuditEvent) -> Result<(), StorageError> {
            self.events.lock().expect("lock").push(Seen {
                committed: false,
                records_then: 0,
                event,
            });
            Ok(())
        }

        fn commit(&self, event: AuditEvent) -> Result<(), StorageError> {
            let records_then = match &*self.storage.lock().expect("lock") {
                Some(s) => {
                    s.sync()?;
                    records(s)
                }
                None => 0,
            };
            self.events.lock().expect("lock").push(Seen {
                committed: true,
                records_then,
                event,
            });
            Ok(())
        }

        fn sync_then(&self, done: Committed) {
            done(match &*self.storage.lock().expect("lock") {
                Some(s) => s.sync(),
                None => Ok(()),
            });
        }
    }

    fn records(s: &Storage) -> usize {
        s.engine
            .scan(trees::MEMORY, b"", None, 10_000)
            .expect("scan")
            .len()
    }

    fn storage(name: &str) -> Storage {
        Storage::with_engine(
            Arc::new(MemEngine::default()),
            SecretKey::generate(),
            StorageOptions::new(name),
        )
        .expect("storage")
    }

    fn service(replicator: Option<Replicator>) -> (Memory, Storage, Arc<Recorder>) {
        let s = storage("n1");
        let rec = Arc::new(Recorder::default());
        *rec.storage.lock().expect("lock") = Some(s.clone());
        let m = Memory::new("n1", s.clone(), replicator, rec.clone());
        (m, s, rec)
    }

    fn alice(resource: &str) -> Caller {
        Caller::new("alice", "memory.write", resource).with_request_id("req-1")
    }

    fn value(json: &str) -> PutRequest {
        PutRequest {
            value_json: json.to_string(),
            ..PutRequest::default()
        }
    }

    #[tokio::test]
    async fn put_is_durable_and_audited_with_the_callers_identity() {
        let (m, s, rec) = service(None);
        let item = m
            .put(
                alice("memory/ns/k"),
                "ns".into(),
                "k".into(),
                value("1"),
                false,
            )
            .await
            .expect("put");
        assert_eq!((item.namespace.as_str(), item.key.as_str()), ("ns", "k"));
        let got = s
            .memory
            .get("ns", "k", now_ms())
            .expect("get")
            .expect("item");
        assert_eq!(got.value_json, "1");
        let seen = rec.events();
        assert_eq!(seen.len(), 1, "{seen:?}");
        let e = &seen[0];
        assert!(e.committed, "a change is committed, not queued");
        assert_eq!(e.records_then, 1, "the write precedes its audit commit");
        assert_eq!(
            (
                e.event.actor.as_str(),
                e.event.request_id.as_str(),
                e.event.action.as_str(),
                e.event.resource.as_str(),
                e.event.outcome.as_str(),
                e.event.status,
                e.event.code.as_deref(),
                e.event.node.as_str(),
            ),
            (
                "alice",
                "req-1",
                "memory.write",
                "memory/ns/k",
                "ok",
                200,
                None,
                "n1"
            )
        );
    }

    #[tokio::test]
    async fn refused_puts_write_nothing_and_audit_the_refusal() {
        let (m, s, rec) = service(None);
        let big = format!("\"{}\"", "x".repeat(2 * 1024 * 1024));
        for (ns, key, req, code) in [
            ("bad ns!", "k", value("1"), "invalid_input"),
            ("ns", "", value("1"), "invalid_input"),
            ("ns", "k", value(&big), "too_large"),
        ] {
            let e = m
                .put(alice("memory/x"), ns.into(), key.into(), req, false)
                .await
                .expect_err("refused");
            assert_eq!(e.kind(), code, "{e}");
            let seen = rec.events();
            let last = &seen.last().expect("audited").event;
            assert!(!seen.last().expect("audited").committed);
            assert_eq!(
                (
                    last.actor.as_str(),
                    last.request_id.as_str(),
                    last.outcome.as_str(),
                    last.status,
                    last.code.as_deref()
                ),
                ("alice", "req-1", "error", 0, Some(code))
            );
        }
        assert_eq!(records(&s), 0, "a refusal writes nothing");
        assert_eq!(rec.events().len(), 3, "one entry per refusal");
        // The gateway records its own status and code.
        let m = m.with_refusal_codes(|e| match e {
            Error::Storage(StorageError::TooLarge { .. }) => (400, "value_too_large"),
            _ => (500, "internal"),
        });
        let e = m
            .put(
                alice("memory/x"),
                "ns".into(),
                "k".into(),
                value(&big),
                false,
            )
            .await
            .expect_err("refused");
        assert_eq!(e.kind(), "too_large");
        let last = rec.events().pop().expect("audited").event;
        assert_eq!(
            (last.status, last.code.as_deref()),
            (400, Some("value_too_large"))
        );
    }

    fn put_of(key: &str, req: PutRequest) -> Put {
        Put {
            caller: alice(&format!("memory/ns/{key}")),
            namespace: "ns".into(),
            key: key.into(),
            req,
        }
    }

    #[tokio::test]
    async fn put_many_writes_in_order_audits_each_and_stops_at_a_refusal() {
        let (m, s, rec) = service(None);
        let items = m
            .put_many(
                vec![put_of("a", value("1")), put_of("b", value("2"))],
                false,
            )
            .await
            .expect("put_many");
        let keys: Vec<&str> = items.iter().map(|i| i.key.as_str()).collect();
        assert_eq!(keys, ["a", "b"]);
        assert!(items[0].version < items[1].version, "written in order");
        let seen = rec.events();
        let audited: Vec<(&str, bool)> = seen
            .iter()
            .map(|e| (e.event.resource.as_str(), e.committed))
            .collect();
        assert_eq!(audited, [("memory/ns/a", true), ("memory/ns/b", true)]);
        // A refused put stops the rest; those before it stay written and audited.
        let e = m
            .put_many(
                vec![
                    put_of("c", value("3")),
                    put_of("", value("4")),
                    put_of("d", value("5")),
                ],
                false,
            )
            .await
            .expect_err("refused");
        assert_eq!(e.kind(), "invalid_input", "{e}");
        // The same with w=2 and no replica: the refusal is the answer, not the missing replica
        // (which a caller may accept as durable here).
        let e = m
            .put_many(vec![put_of("e", value("6")), put_of("", value("7"))], true)
            .await
            .expect_err("refused");
        assert_eq!(e.kind(), "invalid_input", "{e}");
        let got = |k: &str| s.memory.get("ns", k, now_ms()).expect("get");
        assert_eq!(got("c").map(|i| i.value_json), Some("3".into()));
        assert!(got("d").is_none(), "nothing after the refusal is written");
        assert_eq!(records(&s), 4);
        let outcomes: Vec<(String, String)> = rec
            .events()
            .iter()
            .skip(2)
            .take(2)
            .map(|e| (e.event.resource.clone(), e.event.outcome.clone()))
            .collect();
        assert_eq!(
            outcomes,
            [
                ("memory/ns/c".to_string(), "ok".to_string()),
                ("memory/ns/".to_string(), "error".to_string()),
            ],
            "audited in the order asked for"
        );
    }

    /// A sink like the node's writer: a commit is answered later, from its own thread; it
    /// fails while `fail` is set.
    #[derive(Debug, Default)]
    struct Later {
        inner: Recorder,
        fail: std::sync::atomic::AtomicBool,
    }

    impl AuditSink for Later {
        fn submit(&self, event: AuditEvent) -> Result<(), StorageError> {
            self.inner.submit(event)
        }

        fn commit(&self, event: AuditEvent) -> Result<(), StorageError> {
            self.inner.commit(event)
        }

        fn sync_then(&self, done: Committed) {
            self.inner.sync_then(done);
        }

        fn try_commit_many_then(
            &self,
            events: Vec<AuditEvent>,
            done: Committed,
        ) -> swarm_storage::Handed {
            self.commit_many_then(events, done);
            Ok(())
        }

        fn commit_many_then(&self, events: Vec<AuditEvent>, done: Committed) {
            let r = if self.fail.load(std::sync::atomic::Ordering::Relaxed) {
                Err(StorageError::Engine("disk full".into()))
            } else {
                self.commit_many(events)
            };
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                done(r);
            });
        }
    }

    #[tokio::test]
    async fn put_many_answers_after_a_later_commit_and_a_failed_one_is_audited_as_refused() {
        let s = storage("n1");
        let sink = Arc::new(Later::default());
        let m = Memory::new("n1", s.clone(), None, sink.clone());
        let items = m
            .put_many(vec![put_of("a", value("1"))], false)
            .await
            .expect("put_many");
        assert_eq!(items.len(), 1);
        let committed: Vec<bool> = sink.inner.events().iter().map(|e| e.committed).collect();
        assert_eq!(committed, [true], "answered once its entry is committed");
        // More records than run on the async worker: the same, from a blocking thread.
        let many: Vec<Put> = (0..=INLINE_WRITES)
            .map(|i| put_of(&format!("m{i}"), value("1")))
            .collect();
        let items = m.put_many(many, false).await.expect("put_many");
        assert_eq!(items.len(), INLINE_WRITES + 1);
        assert_eq!(sink.inner.events().len(), INLINE_WRITES + 2);
        sink.fail.store(true, std::sync::atomic::Ordering::Relaxed);
        let e = m
            .put_many(vec![put_of("b", value("2")), put_of("", value("3"))], false)
            .await
            .expect_err("the commit failed");
        assert_eq!(e.kind(), "storage_engine", "{e}");
        let outcomes: Vec<(String, String)> = sink
            .inner
            .events()
            .iter()
            .skip(INLINE_WRITES + 2)
            .map(|e| (e.event.resource.clone(), e.event.outcome.clone()))
            .collect();
        assert_eq!(
            outcomes,
            [
                ("memory/ns/b".to_string(), "error".to_string()),
                ("memory/ns/".to_string(), "error".to_string()),
            ],
            "the write whose commit failed, then the refusal that stopped the rest"
        );
    }

    #[tokio::test]
    async fn delete_is_audited_and_deleting_nothing_is_a_refusal() {
        let (m, s, rec) = service(None);
        m.put(
            alice("memory/ns/k"),
            "ns".into(),
            "k".into(),
            value("1"),
            false,
        )
        .await
        .expect("put");
        let bob = Caller::new("bob", "memory.write", "memory/ns/k");
        m.delete(bob.clone(), "ns".into(), "k".into())
            .await
            .expect("delete");
        assert!(s.memory.get("ns", "k", now_ms()).expect("get").is_none());
        let seen = rec.events();
        assert_eq!(seen.len(), 2);
        assert!(seen[1].committed);
        assert_eq!(
            (seen[1].event.actor.as_str(), seen[1].event.outcome.as_str()),
            ("bob", "ok")
        );
        // Nothing left to delete: refused, and audited as such.
        let e = m
            .delete(bob, "ns".into(), "k".into())
            .await
            .expect_err("nothing to delete");
        assert_eq!(
            (e.kind(), e.to_string().as_str()),
            ("not_found", "memory/ns/k not found")
        );
        let seen = rec.events();
        assert_eq!(seen.len(), 3);
        assert!(!seen[2].committed);
        assert_eq!(
            (
                seen[2].event.outcome.as_str(),
                seen[2].event.code.as_deref()
            ),
            ("error", Some("not_found"))
        );
    }

    #[tokio::test]
    async fn erase_shreds_the_subject_and_is_audited() {
        let (m, s, rec) = service(None);
        let req = PutRequest {
            subject: Some("carol".into()),
            ..value("\"secret\"")
        };
        m.put(alice("memory/ns/k"), "ns".into(), "k".into(), req, false)
            .await
            .expect("put");
        let admin = Caller::new("root", "subjects.erase", "subjects/carol");
        assert!(
            m.erase_subject(admin.clone(), "carol".into())
                .await
                .expect("erase")
        );
        assert!(
            matches!(
                s.memory.get("ns", "k", now_ms()),
                Ok(None) | Err(StorageError::Erased(_))
            ),
            "the value is unreadable once shredded"
        );
        let last = rec.events().pop().expect("audited");
        assert!(last.committed);
        assert_eq!(
            (last.event.action.as_str(), last.event.resource.as_str()),
            ("subjects.erase", "subjects/carol")
        );
        // Erased for good: a new value of that subject is refused (and audited as such).
        let req = PutRequest {
            subject: Some("carol".into()),
            ..value("2")
        };
        let e = m
            .put(alice("memory/ns/k2"), "ns".into(), "k2".into(), req, false)
            .await
            .expect_err("erased");
        assert_eq!(e.kind(), "subject_erased");
        // Again: allowed, and says there was no key left.
        assert!(!m.erase_subject(admin, "carol".into()).await.expect("again"));
    }

    #[tokio::test]
    async fn w2_without_a_replicator_is_durable_here_and_fails_no_replica() {
        let (m, s, rec) = service(None);
        let e = m
            .put(
                alice("memory/ns/k"),
                "ns".into(),
                "k".into(),
                value("1"),
                true,
            )
            .await
            .expect_err("no replica");
        assert!(
            matches!(&e, Error::NotReplicated(inner) if matches!(**inner, Error::NoReplicator)),
            "{e:?}"
        );
        assert_eq!(e.kind(), "no_replica");
        assert!(s.memory.get("ns", "k", now_ms()).expect("get").is_some());
        let seen = rec.events();
        assert_eq!(seen.len(), 1, "only the write's own entry: {seen:?}");
        assert_eq!(seen[0].event.outcome, "ok");
    }

    fn replicator(net: &MemNet, name: &str, storage: Storage) -> Replicator {
        let (peers, mut incoming) = net.join(name);
        let hook: RefusalHook = Arc::new(|_: &str, _: &str, _: &str| {});
        let cfg = ReplicationConfig {
            w2_timeout: HumanDuration(Duration::from_secs(2)),
            ..ReplicationConfig::default()
        };
        let r = Replicator::start(storage, peers, cfg, hook, None);
        let serve = r.clone();
        tokio::spawn(async move {
            while let Some(s) = incoming.recv().await {
                serve.serve(s.peer, s.kind, s.duplex);
            }
        });
        r
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn w2_waits_for_a_peer_and_fails_no_replica_alone() {
        let net = MemNet::new(7);
        let s1 = storage("n1");
        let rec = Arc::new(Recorder::default());
        let m = Memory::new(
            "n1",
            s1.clone(),
            Some(replicator(&net, "n1", s1)),
            rec.clone(),
        );
        // Alone: durable here, no peer to confirm it.
        let e = m
            .put(
                alice("memory/ns/a"),
                "ns".into(),
                "a".into(),
                value("1"),
                true,
            )
            .await
            .expect_err("alone");
        assert!(matches!(&e, Error::NotReplicated(inner) if matches!(**inner, Error::NoReplica)));
        assert_eq!(e.kind(), "no_replica");
        // With a peer: acknowledged once the peer has it.
        let s2 = storage("n2");
        let _r2 = replicator(&net, "n2", s2.clone());
        let mut ok = false;
        for _ in 0..50 {
            match m
                .put(
                    alice("memory/ns/b"),
                    "ns".into(),
                    "b".into(),
                    value("2"),
                    true,
                )
                .await
            {
                Ok(_) => {
                    ok = true;
                    break;
                }
                Err(e) if e.kind() == "no_replica" => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("w=2 put failed: {e}"),
            }
        }
        assert!(ok, "no peer ever confirmed the write");
        let got = s2.memory.get("ns", "b", now_ms()).expect("get");
        assert_eq!(got.map(|i| i.value_json), Some("2".to_string()));
        // Several writes together: acknowledged once the peer has every one.
        m.put_many(vec![put_of("c", value("3")), put_of("d", value("4"))], true)
            .await
            .expect("put_many with a peer");
        for (k, v) in [("c", "3"), ("d", "4")] {
            let got = s2.memory.get("ns", k, now_ms()).expect("get");
            assert_eq!(got.map(|i| i.value_json), Some(v.to_string()), "{k}");
        }
        assert!(rec.events().iter().all(|e| e.event.outcome == "ok"));
    }
}
