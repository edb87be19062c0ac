//! The unfinished tasks of this node's replica, by id and by hash. It hears every change of a
//! task record here (this node's writes, a peer's pushes, anti-entropy) through the store's
//! [`Observer`], after one scan at start, so it never misses one; it may hold a task that has
//! finished since (the scan raced a change), so a reader checks the record it names.
//!
//! The owner of a hash deduplicates a submission against it (a task of that hash that another
//! node accepted, when the hash's owner moved), and the orphan scan walks it instead of every
//! task record.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use serde::Deserialize;
use swarm_storage::{MemoryStore, Observer};

use super::model::{TASKS_NAMESPACE, TaskRecord, TaskStatus};

/// Most unfinished tasks held (the queues bound them far below this; past it, new ones are
/// left out, and the orphan scan reads every record instead).
const MAX: usize = 100_000;

/// The fields of a task record the index reads.
#[derive(Deserialize)]
struct Head {
    id: String,
    hash: String,
    status: TaskStatus,
}

#[derive(Debug, Default)]
struct Inner {
    /// Task id → its hash.
    by_id: HashMap<String, String>,
    /// Hash → the ids of unfinished tasks with it.
    by_hash: HashMap<String, BTreeSet<String>>,
    /// Whether the bound was hit (logged once).
    full: bool,
}

/// See the module documentation. Cheap to share.
#[derive(Debug, Default)]
pub(crate) struct Unfinished {
    inner: Mutex<Inner>,
}

fn lock(m: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Unfinished {
    /// Hear every later change of a task record of `store` (call before the first scan).
    pub(crate) fn watch(self: &Arc<Self>, store: &MemoryStore) {
        let me = Arc::downgrade(self);
        let observer: Observer = Arc::new(move |key: &str, value: Option<&str>| {
            let Some(me) = me.upgrade() else { return };
            let Some(id) = key.strip_prefix("task:") else {
                return; // a stage record or an idempotency key
            };
            match value.and_then(|v| serde_json::from_str::<Head>(v).ok()) {
                Some(h) => me.note(&h.id, &h.hash, h.status),
                None => me.forget(id),
            }
        });
        store.observe(TASKS_NAMESPACE, observer);
    }

    /// What a scan read.
    pub(crate) fn note_record(&self, rec: &TaskRecord) {
        self.note(&rec.id, &rec.hash, rec.status);
    }

    fn note(&self, id: &str, hash: &str, status: TaskStatus) {
        if status.is_finished() {
            self.forget(id);
            return;
        }
        let mut g = lock(&self.inner);
        if g.by_id.contains_key(id) {
            return; // a task's hash never changes
        }
        if g.by_id.len() >= MAX {
            if !g.full {
                g.full = true;
                tracing::warn!(max = MAX, "index of unfinished tasks full");
            }
            return;
        }
        g.by_id.insert(id.to_string(), hash.to_string());
        g.by_hash
            .entry(hash.to_string())
            .or_default()
            .insert(id.to_string());
    }

    pub(crate) fn forget(&self, id: &str) {
        let mut g = lock(&self.inner);
        let Some(hash) = g.by_id.remove(id) else {
            return;
        };
        if let Some(ids) = g.by_hash.get_mut(&hash) {
            ids.remove(id);
            if ids.is_empty() {
                g.by_hash.remove(&hash);
            }
        }
    }

    /// Ids of the unfinished tasks with `hash`.
    pub(crate) fn with_hash(&self, hash: &str) -> Vec<String> {
        lock(&self.inner)
            .by_hash
            .get(hash)
            .map(|ids| ids.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// Ids of every unfinished task, in no order.
    pub(crate) fn ids(&self) -> Vec<String> {
        lock(&self.inner).by_id.keys().cloned().collect()
    }

    /// Whether tasks were left out (past [`MAX`]).
    pub(crate) fn is_full(&self) -> bool {
        lock(&self.inner).full
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn it_keeps_unfinished_tasks_by_hash_and_forgets_finished_ones() {
        let u = Unfinished::default();
        u.note("t1", "h", TaskStatus::Pending);
        u.note("t2", "h", TaskStatus::InProgress);
        u.note("t3", "g", TaskStatus::DeadLetter);
        assert_eq!(u.with_hash("h"), vec!["t1".to_string(), "t2".to_string()]);
        u.note("t1", "h", TaskStatus::Completed);
        assert_eq!(u.with_hash("h"), vec!["t2".to_string()]);
        u.forget("t2");
        assert!(u.with_hash("h").is_empty());
        assert_eq!(u.ids(), vec!["t3".to_string()]);
        assert!(!u.is_full());
    }
}
