//! The sled engine, with group commit: concurrent `sync` callers share one flush.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Condvar, Mutex, RwLock};

use crate::engine::{Engine, Pairs};
use crate::error::{Result, StorageError};

/// sled-backed engine. One `sled::Db` per node data directory.
#[derive(Debug)]
pub struct SledEngine {
    db: sled::Db,
    trees: RwLock<HashMap<String, sled::Tree>>,
    commit: GroupCommit,
}

#[derive(Debug, Default)]
struct GroupCommit {
    state: Mutex<CommitState>,
    flushed: Condvar,
}

#[derive(Debug, Default)]
struct CommitState {
    /// Number of sync requests made so far.
    requested: u64,
    /// All requests up to this number are durable.
    durable: u64,
    /// A leader is flushing right now.
    flushing: bool,
}

fn is_lock_error(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::WouldBlock || e.to_string().contains("lock")
}

fn poisoned() -> StorageError {
    StorageError::Engine("sled engine lock poisoned".into())
}

impl SledEngine {
    /// Open (or create) the database at `path`. While another handle still holds the file lock
    /// (a process that is exiting, or a handle whose background flusher has not stopped yet), it
    /// retries for up to three seconds before giving up.
    ///
    /// The directory is made owner-only (0700) before sled opens it, and what sled created in it
    /// owner-only after (files 0600), without touching the process's umask; files sled adds later
    /// sit inside the 0700 directory.
    pub fn open(path: &Path) -> Result<Self> {
        create_private_dir(path)?;
        let mut tries = 0;
        let db = loop {
            match sled::Config::new()
                .path(path)
                .flush_every_ms(Some(500))
                .open()
            {
                Ok(db) => break db,
                Err(sled::Error::Io(e)) if is_lock_error(&e) && tries < 30 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                Err(e) => return Err(e.into()),
            }
        };
        restrict_tree(path, 0)?;
        Ok(Self {
            db,
            trees: RwLock::new(HashMap::new()),
            commit: GroupCommit::default(),
        })
    }

    fn tree(&self, name: &str) -> Result<sled::Tree> {
        if let Some(t) = self.trees.read().map_err(|_| poisoned())?.get(name) {
            return Ok(t.clone());
        }
        let t = self.db.open_tree(name)?;
        self.trees
            .write()
            .map_err(|_| poisoned())?
            .insert(name.to_string(), t.clone());
        Ok(t)
    }
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> StorageError {
    StorageError::Engine(format!("{what} {}: {e}", path.display()))
}

/// Create `dir` (and its parents) and make it owner-only (0700 on Unix).
pub(crate) fn create_private_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| io_error("create", dir, e))?;
    set_mode(dir, 0o700)
}

#[cfg(unix)]
fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(|e| io_error("chmod", path, e))
}

#[cfg(not(unix))]
fn set_mode(_path: &Path, _mode: u32) -> Result<()> {
    Ok(())
}

/// Make everything under `dir` owner-only: directories 0700, files 0600 (links are left alone).
fn restrict_tree(dir: &Path, depth: usize) -> Result<()> {
    // sled's layout is two levels deep (`blobs/`); the bound only guards against surprises.
    if depth > 8 {
        return Ok(());
    }
    let entries = std::fs::read_dir(dir).map_err(|e| io_error("read", dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io_error("read", dir, e))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(|e| io_error("stat", &path, e))?;
        if kind.is_dir() {
            set_mode(&path, 0o700)?;
            restrict_tree(&path, depth + 1)?;
        } else if kind.is_file() {
            set_mode(&path, 0o600)?;
        }
    }
    Ok(())
}

impl Engine for SledEngine {
    fn get(&self, tree: &str, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.tree(tree)?.get(key)?.map(|v| v.to_vec()))
    }

    fn put(&self, tree: &str, key: &[u8], value: &[u8]) -> Result<()> {
        self.tree(tree)?.insert(key, value)?;
        Ok(())
    }

    fn remove(&self, tree: &str, key: &[u8]) -> Result<()> {
        self.tree(tree)?.remove(key)?;
        Ok(())
    }

    fn scan(&self, tree: &str, prefix: &[u8], after: Option<&[u8]>, limit: usize) -> Result<Pairs> {
        let t = self.tree(tree)?;
        let iter: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> = match after {
            Some(a) if a >= prefix => Box::new(
                t.range::<&[u8], _>((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded)),
            ),
            _ => Box::new(t.range::<&[u8], _>(prefix..)),
        };
        let mut out = Vec::new();
        for item in iter {
            let (k, v) = item?;
            if !k.starts_with(prefix) || out.len() >= limit {
                break;
            }
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    fn last(&self, tree: &str) -> Result<Option<(Vec<u8>, Vec<u8>)>> {
        Ok(self
            .tree(tree)?
            .last()?
            .map(|(k, v)| (k.to_vec(), v.to_vec())))
    }

    /// Group commit: the first caller becomes the leader and flushes everything requested so far;
    /// callers that arrive meanwhile wait and are covered by the next flush.
    fn sync(&self) -> Result<()> {
        let c = &self.commit;
        let mut st = c.state.lock().map_err(|_| poisoned())?;
        st.requested += 1;
        let mine = st.requested;
        loop {
            if st.durable >= mine {
                return Ok(());
            }
            if st.flushing {
                st = c.flushed.wait(st).map_err(|_| poisoned())?;
                continue;
            }
            st.flushing = true;
            let target = st.requested;
            drop(st);
            let result = self.db.flush();
            st = c.state.lock().map_err(|_| poisoned())?;
            st.flushing = false;
            if result.is_ok() {
                st.durable = st.durable.max(target);
            }
            c.flushed.notify_all();
            result?;
        }
    }

    fn name(&self) -> &'static str {
        "sled"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn sled_engine_passes_suite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = SledEngine::open(&dir.path().join("db")).expect("open");
        crate::engine::suite::run_all(&e);
    }

    #[cfg(unix)]
    #[test]
    fn data_dir_and_files_are_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o777;
        // A store from before: world-readable directory and files.
        let data = dir.path().join("data");
        let db = data.join("sled");
        {
            let e = SledEngine::open(&db).expect("open");
            e.put("t", b"k", b"v").expect("put");
            e.sync().expect("sync");
        }
        std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::set_permissions(&db, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        for f in std::fs::read_dir(&db).expect("ls") {
            let p = f.expect("entry").path();
            if p.is_file() {
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644))
                    .expect("chmod");
            }
        }
        let s = crate::Storage::open(
            &data,
            crate::SecretKey::generate(),
            crate::StorageOptions::new("n1"),
        )
        .expect("open storage");
        s.sync().expect("sync");
        assert_eq!(mode(&data), 0o700, "data dir");
        assert_eq!(mode(&db), 0o700, "sled dir");
        let mut files = 0;
        for f in std::fs::read_dir(&db).expect("ls") {
            let p = f.expect("entry").path();
            if p.is_file() {
                files += 1;
                assert_eq!(mode(&p), 0o600, "{}", p.display());
            }
        }
        assert!(files > 0, "sled wrote files");
    }

    #[test]
    fn synced_writes_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("db");
        {
            let e = Arc::new(SledEngine::open(&path).expect("open"));
            let threads: Vec<_> = (0..8)
                .map(|t| {
                    let e = e.clone();
                    std::thread::spawn(move || {
                        for i in 0..20 {
                            let k = format!("{t}-{i}");
                            e.put("t", k.as_bytes(), b"v").expect("put");
                            e.sync().expect("sync");
                        }
                    })
                })
                .collect();
            for t in threads {
                t.join().expect("join");
            }
        }
        let e = SledEngine::open(&path).expect("reopen");
        assert_eq!(e.scan("t", b"", None, 1000).expect("scan").len(), 160);
    }
}
