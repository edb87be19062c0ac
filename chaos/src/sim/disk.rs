//! The simulated disk: an in-memory [`Engine`] whose writes become durable only at
//! [`Engine::sync`]. A crash ([`Disk::crash`]) keeps what was synced and loses the rest, as a
//! killed process loses what it had not flushed; the store a restarted node opens on it is the
//! store that process would find.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use swarm_storage::{Engine, Pairs, Result, StorageError};

type Tree = BTreeMap<Vec<u8>, Vec<u8>>;
type Trees = BTreeMap<String, Tree>;

/// One change not yet synced: (tree, key, new value or `None` for a removal).
type Change = (String, Vec<u8>, Option<Vec<u8>>);

#[derive(Debug, Default)]
struct State {
    /// What reads see.
    live: Trees,
    /// What survives a crash.
    durable: Trees,
    /// Changes since the last sync, in order.
    journal: Vec<Change>,
}

fn set(trees: &mut Trees, tree: &str, key: &[u8], value: Option<&[u8]>) {
    match value {
        Some(v) => {
            trees
                .entry(tree.to_string())
                .or_default()
                .insert(key.to_vec(), v.to_vec());
        }
        None => {
            if let Some(t) = trees.get_mut(tree) {
                t.remove(key);
            }
        }
    }
}

/// A node's disk; it outlives the node's processes.
#[derive(Debug, Default)]
pub(crate) struct Disk {
    state: Mutex<State>,
}

impl Disk {
    fn lock(&self) -> Result<MutexGuard<'_, State>> {
        self.state
            .lock()
            .map_err(|_| StorageError::Engine("simulated disk lock poisoned".into()))
    }

    /// The process died: everything written since the last sync is gone. Returns how many
    /// changes were lost.
    pub(crate) fn crash(&self) -> usize {
        let Ok(mut s) = self.lock() else {
            return 0;
        };
        let lost = s.journal.len();
        s.journal.clear();
        s.live = s.durable.clone();
        lost
    }

    /// Remove `key` from `tree`, durably (the sabotage of a replica that loses a record).
    pub(crate) fn forget(&self, tree: &str, key: &[u8]) -> Result<()> {
        self.remove(tree, key)?;
        self.sync()
    }
}

impl Engine for Disk {
    fn get(&self, tree: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self
            .lock()?
            .live
            .get(tree)
            .and_then(|t| t.get(key).cloned()))
    }

    fn put(&self, tree: &str, key: &[u8], value: &[u8]) -> Result<()> {
        let mut s = self.lock()?;
        set(&mut s.live, tree, key, Some(value));
        s.journal
            .push((tree.to_string(), key.to_vec(), Some(value.to_vec())));
        Ok(())
    }

    fn remove(&self, tree: &str, key: &[u8]) -> Result<()> {
        let mut s = self.lock()?;
        set(&mut s.live, tree, key, None);
        s.journal.push((tree.to_string(), key.to_vec(), None));
        Ok(())
    }

    fn scan(&self, tree: &str, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Pairs> {
        let s = self.lock()?;
        let Some(t) = s.live.get(tree) else {
            return Ok(Vec::new());
        };
        let start = match after {
            Some(a) if a >= prefix => std::ops::Bound::Excluded(a.to_vec()),
            _ => std::ops::Bound::Included(prefix.to_vec()),
        };
        Ok(t.range((start, std::ops::Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }

    fn last(&self, tree: &str) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        Ok(self
            .lock()?
            .live
            .get(tree)
            .and_then(|t| t.last_key_value())
            .map(|(k, v)| (k.clone(), v.clone())))
    }

    fn sync(&self) -> Result<()> {
        let mut s = self.lock()?;
        let journal = std::mem::take(&mut s.journal);
        for (tree, key, value) in journal {
            set(&mut s.durable, &tree, &key, value.as_deref());
        }
        Ok(())
    }

    fn name(&self) -> &'static str {
        "simulated"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_crash_keeps_what_was_synced_and_loses_the_rest() {
        let d = Disk::default();
        d.put("t", b"a", b"1").expect("put");
        d.put("t", b"b", b"1").expect("put");
        d.sync().expect("sync");
        d.put("t", b"a", b"2").expect("put");
        d.remove("t", b"b").expect("remove");
        d.put("t", b"c", b"1").expect("put");
        assert_eq!(d.get("t", b"a").expect("get"), Some(b"2".to_vec()));
        assert_eq!(d.crash(), 3);
        assert_eq!(d.get("t", b"a").expect("get"), Some(b"1".to_vec()));
        assert_eq!(d.get("t", b"b").expect("get"), Some(b"1".to_vec()));
        assert_eq!(d.get("t", b"c").expect("get"), None);
        assert_eq!(d.scan("t", b"", None, 10).expect("scan").len(), 2);
        assert_eq!(
            d.last("t").expect("last").map(|(k, _)| k),
            Some(b"b".to_vec())
        );
    }
}
