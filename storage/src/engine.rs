//! The narrow engine trait and its in-memory implementation. The sled engine is in `sled_engine`.

use std::collections::{BTreeMap, HashMap};
use std::sync::RwLock;

use crate::error::{Result, StorageError};

/// Key/value pairs returned by scans.
pub type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

/// An ordered key/value engine with named trees. Writes are visible at once and durable after
/// [`Engine::sync`] returns: an acknowledged write is one whose `sync` has returned.
pub trait Engine: Send + Sync + std::fmt::Debug + 'static {
    fn get(&self, tree: &str, key: &[u8]) -> Result<Option<Vec<u8>>>;
    fn put(&self, tree: &str, key: &[u8], value: &[u8]) -> Result<()>;
    fn remove(&self, tree: &str, key: &[u8]) -> Result<()>;
    /// Up to `limit` pairs whose key starts with `prefix` and is strictly greater than `after`.
    fn scan(&self, tree: &str, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Pairs>;
    /// Visit, in key order, the pairs whose key starts with `prefix` and is greater than `after`,
    /// fetching `page` pairs at a time, until `f` returns `Ok(false)` or an error.
    fn for_each(
        &self,
        tree: &str,
        prefix: &[u8],
        after: Option<&[u8]>,
        page: usize,
        f: &mut dyn FnMut(Vec<u8>, Vec<u8>) -> Result<bool>,
    ) -> Result<()> {
        let mut cursor = after.map(<[u8]>::to_vec);
        loop {
            let batch = self.scan(tree, prefix, cursor.as_deref(), page)?;
            let Some((last, _)) = batch.last() else {
                return Ok(());
            };
            cursor = Some(last.clone());
            for (k, v) in batch {
                if !f(k, v)? {
                    return Ok(());
                }
            }
        }
    }
    /// The pair with the greatest key.
    fn last(&self, tree: &str) -> Result<Option<(Vec<u8>, Vec<u8>)>>;
    /// Make every write that returned before this call durable.
    fn sync(&self) -> Result<()>;
    /// A short name for logs and `/health`.
    fn name(&self) -> &'static str;
}

type Tree = BTreeMap<Vec<u8>, Vec<u8>>;

/// In-memory engine for unit tests and simulators. `sync` is a no-op: nothing survives a restart.
#[derive(Debug, Default)]
pub struct MemEngine {
    trees: RwLock<HashMap<String, Tree>>,
}

impl MemEngine {
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether `needle` occurs in any key or value of any tree (for tests of what is at rest).
    #[cfg(test)]
    pub(crate) fn contains_bytes(&self, needle: &[u8]) -> bool {
        let has = |hay: &[u8]| hay.windows(needle.len()).any(|w| w == needle);
        self.trees.read().is_ok_and(|trees| {
            trees
                .iter()
                .any(|(name, t)| has(name.as_bytes()) || t.iter().any(|(k, v)| has(k) || has(v)))
        })
    }
}

fn poisoned() -> StorageError {
    StorageError::Engine("memory engine lock poisoned".into())
}

impl Engine for MemEngine {
    fn get(&self, tree: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let trees = self.trees.read().map_err(|_| poisoned())?;
        Ok(trees.get(tree).and_then(|t| t.get(key).cloned()))
    }

    fn put(&self, tree: &str, key: &[u8], value: &[u8]) -> Result<()> {
        let mut trees = self.trees.write().map_err(|_| poisoned())?;
        trees
            .entry(tree.to_string())
            .or_default()
            .insert(key.to_vec(), value.to_vec());
        Ok(())
    }

    fn remove(&self, tree: &str, key: &[u8]) -> Result<()> {
        let mut trees = self.trees.write().map_err(|_| poisoned())?;
        if let Some(t) = trees.get_mut(tree) {
            t.remove(key);
        }
        Ok(())
    }

    fn scan(&self, tree: &str, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Pairs> {
        let trees = self.trees.read().map_err(|_| poisoned())?;
        let Some(t) = trees.get(tree) else {
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
        let trees = self.trees.read().map_err(|_| poisoned())?;
        Ok(trees
            .get(tree)
            .and_then(|t| t.last_key_value())
            .map(|(k, v)| (k.clone(), v.clone())))
    }

    fn sync(&self) -> Result<()> {
        Ok(())
    }

    fn name(&self) -> &'static str {
        "memory"
    }
}

/// The conformance suite every engine must pass (used by the tests of each engine).
#[cfg(test)]
pub(crate) mod suite {
    use super::*;

    pub(crate) fn run_all(e: &dyn Engine) {
        basic(e);
        scan_and_last(e);
        trees_are_separate(e);
    }

    fn basic(e: &dyn Engine) {
        assert_eq!(e.get("t", b"a").expect("get"), None);
        e.put("t", b"a", b"1").expect("put");
        assert_eq!(e.get("t", b"a").expect("get"), Some(b"1".to_vec()));
        e.put("t", b"a", b"2").expect("overwrite");
        assert_eq!(e.get("t", b"a").expect("get"), Some(b"2".to_vec()));
        e.remove("t", b"a").expect("remove");
        assert_eq!(e.get("t", b"a").expect("get"), None);
        e.remove("t", b"missing").expect("remove missing is ok");
        e.sync().expect("sync");
    }

    fn scan_and_last(e: &dyn Engine) {
        for k in ["p/a", "p/b", "p/c", "q/a", "o/z"] {
            e.put("s", k.as_bytes(), k.as_bytes()).expect("put");
        }
        let keys = |pairs: Pairs| -> Vec<String> {
            pairs
                .into_iter()
                .map(|(k, _)| String::from_utf8_lossy(&k).into_owned())
                .collect()
        };
        assert_eq!(
            keys(e.scan("s", b"p/", None, 10).expect("scan")),
            ["p/a", "p/b", "p/c"]
        );
        assert_eq!(
            keys(e.scan("s", b"p/", None, 2).expect("scan")),
            ["p/a", "p/b"]
        );
        assert_eq!(
            keys(e.scan("s", b"p/", Some(b"p/b"), 10).expect("scan")),
            ["p/c"]
        );
        assert_eq!(keys(e.scan("s", b"", None, 10).expect("scan")).len(), 5);
        assert!(e.scan("empty", b"", None, 10).expect("scan").is_empty());
        let (k, _) = e.last("s").expect("last").expect("some");
        assert_eq!(k, b"q/a");
        assert_eq!(e.last("nothing").expect("last"), None);
        let mut seen = Vec::new();
        e.for_each("s", b"p/", Some(b"p/a"), 1, &mut |k, _| {
            seen.push(k);
            Ok(true)
        })
        .expect("for_each");
        assert_eq!(seen, [b"p/b".to_vec(), b"p/c".to_vec()]);
        let mut n = 0;
        e.for_each("s", b"", None, 2, &mut |_, _| {
            n += 1;
            Ok(n < 3)
        })
        .expect("for_each stops");
        assert_eq!(n, 3);
    }

    fn trees_are_separate(e: &dyn Engine) {
        e.put("x", b"k", b"x").expect("put");
        e.put("y", b"k", b"y").expect("put");
        assert_eq!(e.get("x", b"k").expect("get"), Some(b"x".to_vec()));
        assert_eq!(e.get("y", b"k").expect("get"), Some(b"y".to_vec()));
    }

    #[test]
    fn mem_engine_passes_suite() {
        run_all(&MemEngine::new());
    }
}
