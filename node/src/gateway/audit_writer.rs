//! Off-request audit appends: a thread that appends audit events in batches.
//!
//! Requests hand their event over a bounded channel and go on; the thread drains up to
//! [`BATCH`] events at a time, appends them under one lock, then pauses [`PAUSE`] so the next batch
//! gathers (one wake-up per pause, not one per request). When the
//! channel is full the request appends synchronously instead: back-pressure, never a dropped
//! entry, never an unbounded queue. State changes do not come here: their entry is appended
//! before the group-commit sync that acknowledges them (`Inner::commit_blocking`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};

use swarm_storage::{AuditEvent, AuditLog, StorageError};

const CAPACITY: usize = 8192;
const BATCH: usize = 512;
const PAUSE: std::time::Duration = std::time::Duration::from_millis(2);

enum Msg {
    Event(AuditEvent),
    /// Reply once everything sent before has been appended.
    Flush(SyncSender<()>),
}

/// Handle to the audit writer thread.
pub(super) struct AuditWriter {
    log: Arc<AuditLog>,
    tx: SyncSender<Msg>,
}

impl std::fmt::Debug for AuditWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditWriter").finish_non_exhaustive()
    }
}

impl AuditWriter {
    /// Start the writer thread; `failures` counts events that could not be appended.
    pub(super) fn spawn(log: Arc<AuditLog>, failures: Arc<AtomicU64>) -> std::io::Result<Self> {
        let (tx, rx) = sync_channel(CAPACITY);
        let l = log.clone();
        std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || run(rx, &l, &failures))?;
        Ok(Self { log, tx })
    }

    /// Queue an event; append it here and now when the queue is full.
    pub(super) fn submit(&self, event: AuditEvent) -> Result<(), StorageError> {
        match self.tx.try_send(Msg::Event(event)) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(Msg::Event(e)) | TrySendError::Disconnected(Msg::Event(e))) => {
                self.log.append(&e).map(|_| ())
            }
            Err(_) => Ok(()),
        }
    }

    /// Wait until every event submitted so far is appended.
    pub(super) fn flush(&self) {
        let (tx, rx) = sync_channel(1);
        if self.tx.send(Msg::Flush(tx)).is_ok() {
            let _ = rx.recv();
        }
    }
}

fn run(rx: Receiver<Msg>, log: &AuditLog, failures: &AtomicU64) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut waiters = Vec::new();
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Event(e) => batch.push(e),
                Msg::Flush(w) => waiters.push(w),
            }
            if batch.len() < BATCH {
                next = rx.try_recv().ok();
            }
        }
        if !batch.is_empty() {
            if let Err(e) = log.append_many(&batch) {
                tracing::error!(error = %e, lost = batch.len(), "audit append failed");
                failures.fetch_add(batch.len() as u64, Ordering::Relaxed);
            }
            batch.clear();
        }
        for w in waiters.drain(..) {
            let _ = w.send(());
        }
        // Let the next batch gather: one wake-up per PAUSE instead of one per request.
        std::thread::sleep(PAUSE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use swarm_storage::{MemEngine, SecretKey};

    #[test]
    fn everything_submitted_is_appended_in_order() {
        let log = Arc::new(
            AuditLog::open(Arc::new(MemEngine::new()), &SecretKey::generate()).expect("log"),
        );
        let failures = Arc::new(AtomicU64::new(0));
        let w = AuditWriter::spawn(log.clone(), failures.clone()).expect("spawn");
        for i in 0..20_000u64 {
            w.submit(AuditEvent {
                ts_ms: i,
                node: "n".into(),
                request_id: i.to_string(),
                actor: "a".into(),
                action: "x.read".into(),
                resource: "r".into(),
                outcome: "ok".into(),
                status: 200,
                code: None,
            })
            .expect("submit");
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
    }
}
