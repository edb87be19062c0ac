//! The local store of a swarm node. No networking.
//!
//! Layout:
//! - `engine`: the narrow [`Engine`] trait and [`MemEngine`]; `sled_engine`: [`SledEngine`] with
//!   group commit (concurrent `sync` callers share one flush).
//! - `crypto`: XChaCha20-Poly1305 sealing, per-namespace and per-subject data keys wrapped by the
//!   master key ([`Keyring`]), and crypto-shredding.
//! - `hlc`: the hybrid logical clock; `crdt`: the LWW map with tombstones and TTLs and its laws.
//! - `memory`: namespaced agent memory ([`MemoryStore`]) on top of all of the above;
//!   `memory/replica.rs`: its replication (apply peers' deltas, digests, tombstone GC, erasure
//!   across replicas). `delta`: the replicated [`Delta`], the [`MemoryType`] it carries, and its
//!   codec; `memory` uses `delta`, never the other way round. `digest`: the anti-entropy
//!   [`NamespaceDigest`]. `memory/legacy.rs`: rewrites stores from before keyed subject ids.
//! - `audit`: the hash-chained [`AuditLog`].
//!
//! [`Storage`] wires them together for one node.

mod audit;
mod crdt;
mod crypto;
mod delta;
mod digest;
mod engine;
mod error;
mod hlc;
mod memory;
mod plain_cache;
mod sled_engine;

use std::path::Path;
use std::sync::Arc;

pub use audit::{
    AuditBlock, AuditEntry, AuditEvent, AuditLog, AuditRecord, AuditSink, Commit, Committed,
    Handed, MAX_BLOCK, VerifyReport, decode_audit_block,
};
pub use crdt::{LwwMap, Version, Versioned};
pub use crypto::{KeyId, KeyRef, Keyring, Sealed, SecretKey, SubjectId, open, seal};
pub use delta::{ApplyOutcome, Delta, DeltaValue, MemoryType, decode_delta, encode_delta};
pub use digest::{BUCKETS, NamespaceDigest, bucket_of};
pub use engine::{Engine, MemEngine, Pairs};
pub use error::{Result, StorageError};
pub use hlc::{Hlc, HlcClock};
pub use memory::{
    DEFAULT_MAX_TAG_BYTES, DEFAULT_MAX_TAGS, ListPage, MemoryItem, MemoryLimits, MemoryStore,
    Observer, Protection, PutRequest, StoredRecord, StoredValue, decode_record, validate_name,
};
pub use sled_engine::SledEngine;

/// Tree names, for callers that keep small records of their own (API keys, revocations).
pub mod trees {
    pub const MEMORY: &str = crate::memory::MEMORY_TREE;
    pub const AUDIT: &str = crate::audit::AUDIT_TREE;
    pub const KEYS: &str = crate::crypto::KEYS_TREE;
    pub const API_KEYS: &str = "api_keys";
    pub const REVOKED: &str = "revoked";
}

/// Options for [`Storage::open`].
#[derive(Debug, Clone)]
pub struct StorageOptions {
    /// This node's name; the origin of its writes.
    pub node: String,
    pub limits: MemoryLimits,
    /// Largest accepted clock lead of a remote timestamp.
    pub max_clock_skew_ms: u64,
    pub protection: Protection,
}

impl StorageOptions {
    pub fn new(node: impl Into<String>) -> Self {
        Self {
            node: node.into(),
            limits: MemoryLimits::default(),
            max_clock_skew_ms: 60_000,
            protection: Protection::Encrypted,
        }
    }
}

/// One node's store: engine, keyring, memory and audit log.
#[derive(Debug, Clone)]
pub struct Storage {
    pub engine: Arc<dyn Engine>,
    pub keyring: Arc<Keyring>,
    pub memory: Arc<MemoryStore>,
    pub audit: Arc<AuditLog>,
    pub clock: Arc<HlcClock>,
}

impl Storage {
    /// Open (or create) the sled store in `dir`; `dir` is made owner-only (0700), and so is
    /// everything sled keeps in it (directories 0700, files 0600).
    pub fn open(dir: &Path, master: SecretKey, opts: StorageOptions) -> Result<Self> {
        sled_engine::create_private_dir(dir)?;
        let engine: Arc<dyn Engine> = Arc::new(SledEngine::open(&dir.join("sled"))?);
        Self::with_engine(engine, master, opts)
    }

    /// Build on any engine (the in-memory one in tests).
    pub fn with_engine(
        engine: Arc<dyn Engine>,
        master: SecretKey,
        opts: StorageOptions,
    ) -> Result<Self> {
        let audit = Arc::new(AuditLog::open(engine.clone(), &master)?);
        let keyring = Arc::new(Keyring::new(master, engine.clone()));
        keyring.migrate_legacy()?;
        let clock = Arc::new(HlcClock::new(opts.max_clock_skew_ms));
        let memory = Arc::new(MemoryStore::new(
            engine.clone(),
            keyring.clone(),
            clock.clone(),
            opts.node,
            opts.limits,
            opts.protection,
        ));
        memory.migrate_legacy()?;
        Ok(Self {
            engine,
            keyring,
            memory,
            audit,
            clock,
        })
    }

    /// Make every write so far durable (group commit on sled).
    pub fn sync(&self) -> Result<()> {
        self.engine.sync()
    }
}

#[cfg(test)]
mod at_rest_tests;
#[cfg(test)]
mod replication_tests;
#[cfg(test)]
mod tests;
