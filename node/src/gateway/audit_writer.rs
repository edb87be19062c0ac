//! The audit writer: a thread that appends audit events in batches, and commits state changes.
//!
//! Two kinds of event arrive over one bounded channel:
//! - *queued* events (reads, refusals): the request hands them over and goes on. When the channel
//!   is full the request appends in place instead: back-pressure, never a dropped entry, never an
//!   unbounded queue.
//! - *durable* events (state changes): the request has already written its data; it is told
//!   once the writer has appended its entry and synced the store (it waits for that, or the
//!   writer calls it back), and only then acknowledges. Every durable event of a batch shares
//!   that one append and one fsync (group commit).
//!
//! The node starts one writer before anything that audits and hands it out as an
//! [`AuditSink`]: the gateway, the replication and membership refusal duties and the memory
//! service share it. It counts what it appends (`swarm_audit_entries_total`) and what it loses
//! (`swarm_audit_failures_total`).
//!
//! Each batch takes up to [`BATCH`] events. After a batch with no durable event the thread parks
//! for up to [`PAUSE`] so that the next batch gathers (one wake-up per pause instead of one per
//! request); a durable submission unparks it at once.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::thread::Thread;

use swarm_storage::{
    AuditEvent, AuditLog, AuditSink, Commit, Committed, Engine, Handed, StorageError,
};

const CAPACITY: usize = 8192;
const BATCH: usize = 512;
const PAUSE: std::time::Duration = std::time::Duration::from_millis(2);

enum Msg {
    Queued(AuditEvent),
    /// The entries of one or more changes, acknowledged together (on the writer's thread,
    /// after the batch's sync).
    Durable(Vec<AuditEvent>, Committed),
    /// Reply once everything sent before has been appended.
    Flush(SyncSender<()>),
}

/// Handle to the audit writer thread.
pub struct AuditWriter {
    log: Arc<AuditLog>,
    engine: Arc<dyn Engine>,
    tx: SyncSender<Msg>,
    thread: Thread,
    /// Events accepted: queued or committed.
    entries: Arc<AtomicU64>,
    /// Events lost: a failed append of a batch, a failed append in place.
    failures: Arc<AtomicU64>,
}

impl std::fmt::Debug for AuditWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditWriter").finish_non_exhaustive()
    }
}

impl AuditWriter {
    /// Start the writer thread over `log`, syncing `engine` (the store's) for durable events.
    pub fn spawn(log: Arc<AuditLog>, engine: Arc<dyn Engine>) -> std::io::Result<Self> {
        let (tx, rx) = sync_channel(CAPACITY);
        let (l, e) = (log.clone(), engine.clone());
        let failures = Arc::new(AtomicU64::new(0));
        let entries = Arc::new(AtomicU64::new(0));
        let (n, f) = (entries.clone(), failures.clone());
        let handle = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || run(rx, &l, e.as_ref(), &n, &f))?;
        Ok(Self {
            log,
            engine,
            tx,
            thread: handle.thread().clone(),
            entries,
            failures,
        })
    }

    /// The count of events accepted (for `/metrics`).
    pub fn entries(&self) -> Arc<AtomicU64> {
        self.entries.clone()
    }

    /// The count of events lost (for `/metrics`).
    pub fn failures(&self) -> Arc<AtomicU64> {
        self.failures.clone()
    }

    /// Queue an event; append it here and now when the queue is full.
    fn enqueue(&self, event: AuditEvent) -> Result<(), StorageError> {
        match self.tx.try_send(Msg::Queued(event)) {
            Ok(()) => Ok(()),
            Err(
                TrySendError::Full(Msg::Queued(e)) | TrySendError::Disconnected(Msg::Queued(e)),
            ) => self.log.append(&e).map(|_| ()),
            Err(_) => Ok(()),
        }
    }

    /// [`AuditWriter::commit_durable`] without blocking: gives the commit back when the queue
    /// is full or the writer is gone.
    fn try_commit_durable(&self, events: Vec<AuditEvent>, ack: Committed) -> Handed {
        let back = match self.tx.try_send(Msg::Durable(events, ack)) {
            Ok(()) => {
                self.thread.unpark();
                return Ok(());
            }
            Err(TrySendError::Full(m) | TrySendError::Disconnected(m)) => m,
        };
        match back {
            Msg::Durable(events, done) => Err(Commit { events, done }),
            // Only the durable message was sent.
            Msg::Queued(_) | Msg::Flush(_) => Ok(()),
        }
    }

    /// Hand `events` to the writer (blocking while its queue is full); `ack` gets the outcome
    /// of the sync that covers them.
    fn commit_durable(&self, events: Vec<AuditEvent>, ack: Committed) {
        if let Err(e) = self.tx.send(Msg::Durable(events, ack)) {
            // The writer is gone: do it here.
            if let Msg::Durable(events, ack) = e.0 {
                let n = events.len() as u64;
                let r = self
                    .log
                    .append_many(&events)
                    .and_then(|_| self.engine.sync());
                if r.is_ok() {
                    self.entries.fetch_add(n, Ordering::Relaxed);
                }
                ack(r);
            }
            return;
        }
        self.thread.unpark();
    }
}

impl AuditSink for AuditWriter {
    /// Queue an event; append it here and now when the queue is full. A loss is logged and
    /// counted here.
    fn submit(&self, event: AuditEvent) -> Result<(), StorageError> {
        match self.enqueue(event) {
            Ok(()) => {
                self.entries.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "audit entry lost");
                self.failures.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Append `event` and make it, and every write made before this call, durable. Blocking
    /// (waits for room in the queue, then for the batch's fsync): call off the async workers.
    /// A failure goes back to the caller, whose change is then not acknowledged.
    fn commit(&self, event: AuditEvent) -> Result<(), StorageError> {
        self.commit_many(vec![event])
    }

    /// [`AuditSink::commit`] for several entries: one message to the writer, one sync.
    fn commit_many(&self, events: Vec<AuditEvent>) -> Result<(), StorageError> {
        let (tx, rx) = sync_channel(1);
        self.commit_many_then(
            events,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        rx.recv()
            .unwrap_or_else(|_| Err(StorageError::Engine("audit writer stopped".into())))
    }

    /// [`AuditSink::commit_many`] whose caller does not wait: `done` runs on the writer's
    /// thread after the batch's sync.
    fn commit_many_then(&self, events: Vec<AuditEvent>, done: Committed) {
        self.commit_durable(events, done);
    }

    /// [`AuditSink::commit_many_then`] that gives the commit back when the queue is full.
    fn try_commit_many_then(&self, events: Vec<AuditEvent>, done: Committed) -> Handed {
        self.try_commit_durable(events, done)
    }

    /// A commit of no entries: the writer's next sync covers the writes made before it.
    fn sync_then(&self, done: Committed) {
        self.commit_durable(Vec::new(), done);
    }

    /// [`AuditSink::sync_then`] that gives it back when the queue is full.
    fn try_sync_then(&self, done: Committed) -> Handed {
        self.try_commit_durable(Vec::new(), done)
    }

    /// Wait until every event submitted so far is appended.
    fn flush(&self) {
        let (tx, rx) = sync_channel(1);
        if self.tx.send(Msg::Flush(tx)).is_ok() {
            self.thread.unpark();
            let _ = rx.recv();
        }
    }
}

/// The sink of the builds that do not audit (`bench-noauth`, `bench-noaudit`): nothing is
/// appended, but a commit still makes the change durable.
#[derive(Debug)]
pub(super) struct Unaudited(pub(super) Arc<dyn Engine>);

impl AuditSink for Unaudited {
    fn submit(&self, _event: AuditEvent) -> Result<(), StorageError> {
        Ok(())
    }

    fn commit(&self, _event: AuditEvent) -> Result<(), StorageError> {
        self.0.sync()
    }

    fn commit_many(&self, _events: Vec<AuditEvent>) -> Result<(), StorageError> {
        self.0.sync()
    }

    fn sync_then(&self, done: Committed) {
        done(self.0.sync());
    }
}

/// The writer's loop. `entries` counts the durable entries it commits (queued ones are counted
/// when submitted), `failures` those it loses.
fn run(
    rx: Receiver<Msg>,
    log: &AuditLog,
    engine: &dyn Engine,
    entries: &AtomicU64,
    failures: &AtomicU64,
) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut acks: Vec<Committed> = Vec::new();
    let mut durable_entries = 0u64;
    let mut flushes = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Queued(e) => batch.push(e),
                Msg::Durable(es, ack) => {
                    durable_entries += es.len() as u64;
                    batch.extend(es);
                    acks.push(ack);
                }
                Msg::Flush(w) => flushes.push(w),
            }
            if batch.len() < BATCH {
                next = rx.try_recv().ok();
            }
        }
        let appended = if batch.is_empty() {
            Ok(())
        } else {
            log.append_many(&batch).map(|_| ())
        };
        if let Err(e) = &appended {
            tracing::error!(error = %e, lost = batch.len(), "audit append failed");
            failures.fetch_add(batch.len() as u64, Ordering::Relaxed);
        }
        batch.clear();
        let durable = !acks.is_empty();
        if durable {
            let result = appended
                .and_then(|()| engine.sync())
                .map_err(|e| e.to_string());
            if result.is_ok() {
                entries.fetch_add(durable_entries, Ordering::Relaxed);
            }
            for ack in acks.drain(..) {
                ack(result.clone().map_err(StorageError::Engine));
            }
        }
        durable_entries = 0;
        for w in flushes.drain(..) {
            let _ = w.send(());
        }
        if !durable {
            std::thread::park_timeout(PAUSE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use swarm_storage::{MemEngine, SecretKey};

    fn event(i: u64) -> AuditEvent {
        AuditEvent {
            ts_ms: i,
            node: "n".into(),
            request_id: i.to_string(),
            actor: "a".into(),
            action: "x.read".into(),
            resource: "r".into(),
            outcome: "ok".into(),
            status: 200,
            code: None,
        }
    }

    fn writer() -> (Arc<AuditLog>, Arc<AtomicU64>, AuditWriter) {
        let engine: Arc<dyn Engine> = Arc::new(MemEngine::new());
        let log = Arc::new(AuditLog::open(engine.clone(), &SecretKey::generate()).expect("log"));
        let w = AuditWriter::spawn(log.clone(), engine).expect("spawn");
        (log, w.failures(), w)
    }

    #[test]
    fn entries_committed_together_are_all_appended_and_counted() {
        let (log, failures, w) = writer();
        w.commit(event(0)).expect("commit");
        w.commit_many((1..4).map(event).collect())
            .expect("commit_many");
        let r = log.verify().expect("verify");
        assert!(r.ok && r.entries == 4, "{r:?}");
        let seen: Vec<u64> = log
            .list(0, 10)
            .expect("list")
            .iter()
            .map(|e| e.event.ts_ms)
            .collect();
        assert_eq!(seen, [0, 1, 2, 3], "in the order committed");
        assert_eq!(w.entries().load(Ordering::Relaxed), 4);
        assert_eq!(failures.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_commit_not_waited_for_calls_back_once_its_entries_are_appended() {
        let (log, failures, w) = writer();
        let (tx, rx) = sync_channel(1);
        let l = log.clone();
        w.commit_many_then(
            (0..3).map(event).collect(),
            Box::new(move |r| {
                // Called after the batch's append and sync: the entries are there.
                let _ = tx.send(r.map(|()| l.verify().map(|v| v.entries)));
            }),
        );
        let entries = rx
            .recv_timeout(std::time::Duration::from_secs(5))
            .expect("called back")
            .expect("committed")
            .expect("verify");
        assert_eq!(entries, 3);
        assert_eq!(w.entries().load(Ordering::Relaxed), 3);
        // From the async workers: taken at once while the queue has room.
        let (tx, rx) = sync_channel(1);
        let taken = w.try_commit_many_then(
            vec![event(3)],
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        );
        assert!(taken.is_ok(), "the queue has room");
        rx.recv_timeout(std::time::Duration::from_secs(5))
            .expect("called back")
            .expect("committed");
        assert_eq!(log.verify().expect("verify").entries, 4);
        assert_eq!(w.entries().load(Ordering::Relaxed), 4);
        assert_eq!(failures.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_sync_alone_is_answered_and_appends_nothing() {
        let (log, _, w) = writer();
        let (tx, rx) = sync_channel(1);
        w.sync_then(Box::new(move |r| {
            let _ = tx.send(r);
        }));
        rx.recv_timeout(std::time::Duration::from_secs(5))
            .expect("called back")
            .expect("synced");
        assert_eq!(log.verify().expect("verify").entries, 0);
        assert_eq!(w.entries().load(Ordering::Relaxed), 0);
    }

    #[test]
    fn everything_submitted_is_appended() {
        let (log, failures, w) = writer();
        for i in 0..20_000u64 {
            w.submit(event(i)).expect("submit");
        }
        w.flush();
        let r = log.verify().expect("verify");
        assert!(r.ok && r.entries == 20_000, "{r:?}");
        // All there; an event appended in place while the queue was full may precede queued ones.
        let mut seen: Vec<u64> = log
            .list(0, 20_000)
            .expect("list")
            .iter()
            .map(|e| e.event.ts_ms)
            .collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..20_000).collect::<Vec<_>>());
        assert_eq!(failures.load(Ordering::Relaxed), 0);
        assert_eq!(w.entries().load(Ordering::Relaxed), 20_000);
    }

    #[test]
    fn commit_returns_after_its_entry_is_appended() {
        let (log, _, w) = writer();
        let w = Arc::new(w);
        let threads: Vec<_> = (0..8u64)
            .map(|t| {
                let w = w.clone();
                std::thread::spawn(move || {
                    for i in 0..50 {
                        w.commit(event(t * 1000 + i)).expect("commit");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("join");
        }
        // Every commit has returned, so every entry is in the log without a flush.
        assert_eq!(log.verify().expect("verify").entries, 400);
        assert_eq!(w.entries().load(Ordering::Relaxed), 400);
    }
}
