//! Append-only audit log, hash-chained over what is stored.
//!
//! Entry `n` is stored as `{seq, prev, sealed, mac}` where `sealed` is the event encrypted under
//! the audit key and `mac = HMAC(audit_mac_key, "swarm-audit-v1" ‖ seq ‖ prev ‖ nonce ‖ ct)` with
//! `prev` the previous entry's `mac`. The chain covers ciphertext, so it stays verifiable whatever
//! happens to data keys, and it is keyed, so whoever edits the file cannot recompute it. The head
//! (last seq and mac) is kept separately, so cutting entries off the end is detected too.
//!
//! Entries appended together are stored as one block (one engine insert, keyed by the first
//! entry's seq, at most [`MAX_BLOCK`] entries): sled copies a leaf on every insert, so one insert
//! per entry made auditing every read the gateway's largest cost. Each entry keeps its own seal
//! and link, so `verify` still names the first broken entry.

use std::sync::{Arc, Mutex};

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::crypto::{self, Sealed, SecretKey};
use crate::engine::Engine;
use crate::error::{Result, StorageError};

pub(crate) const AUDIT_TREE: &str = "audit";
const META_TREE: &str = "meta";
const HEAD_KEY: &[u8] = b"audit_head";
/// Most entries stored under one key.
pub const MAX_BLOCK: usize = 512;
/// Bytes of a stored record besides its ciphertext, at most: seq, prev, nonce, length, mac.
const RECORD_OVERHEAD: usize = 10 + 32 + 24 + 5 + 32;

/// What happened, by whom, to what, with which outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    pub ts_ms: u64,
    pub node: String,
    pub request_id: String,
    /// The principal (`anonymous` when unauthenticated).
    pub actor: String,
    pub action: String,
    pub resource: String,
    /// `ok`, `denied` or `error`.
    pub outcome: String,
    pub status: u16,
    /// The error code, when there was one.
    pub code: Option<String>,
}

/// An event read back with its sequence number.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditEntry {
    pub seq: u64,
    #[serde(flatten)]
    pub event: AuditEvent,
}

/// Where audit events go: a narrow seam, so whatever audits (the gateway, replication and
/// membership refusals, the memory service, agents) holds the node's one writer without depending
/// on the crate that owns it. The node's writer batches appends and shares one sync among the
/// commits of a batch (group commit); a test's sink records what it was given.
pub trait AuditSink: Send + Sync + std::fmt::Debug {
    /// Queue `event` (a read, a refusal, something the node did on its own). Never blocks the
    /// caller for long: when the queue is full the event is appended in place, never dropped.
    fn submit(&self, event: AuditEvent) -> Result<()>;

    /// Append `event` and make it, and every write made before this call, durable. For state
    /// changes: the caller acknowledges only after this returns. Blocking (waits for the batch's
    /// sync): call off the async workers.
    fn commit(&self, event: AuditEvent) -> Result<()>;

    /// [`AuditSink::commit`] for the entries of several changes made together: all appended,
    /// then one sync. On an error the caller takes none of them as committed (this default
    /// stops at the first failure, after committing those before it).
    fn commit_many(&self, events: Vec<AuditEvent>) -> Result<()> {
        events.into_iter().try_for_each(|e| self.commit(e))
    }

    /// [`AuditSink::commit_many`] without waiting for the sync: `done` is called with the
    /// outcome once the entries, and every write made before this call, are durable (or could
    /// not be made so). It may block while the writer's queue is full, and `done` may run on
    /// the writer's thread, so it must be quick. This default commits here and calls `done`
    /// before it returns.
    fn commit_many_then(&self, events: Vec<AuditEvent>, done: Committed) {
        done(self.commit_many(events));
    }

    /// [`AuditSink::commit_many_then`] for a caller on the async workers: it never blocks.
    /// When the commit cannot be handed over at once (the writer's queue is full, or the sink
    /// commits in place) it comes back, for the caller to commit off the async workers. This
    /// default always gives it back.
    fn try_commit_many_then(&self, events: Vec<AuditEvent>, done: Committed) -> Handed {
        Err(Commit { events, done })
    }

    /// Make every write made before this call durable, then call `done` with the outcome (the
    /// node's writer shares the sync with the commits of its batch). Like
    /// [`AuditSink::commit_many_then`], it may block while the writer's queue is full.
    fn sync_then(&self, done: Committed);

    /// [`AuditSink::sync_then`] that never blocks, as [`AuditSink::try_commit_many_then`]
    /// (`events` of what comes back is empty). This default always gives it back.
    fn try_sync_then(&self, done: Committed) -> Handed {
        Err(Commit {
            events: Vec::new(),
            done,
        })
    }

    /// Wait until every event submitted so far is appended (before the final sync at shutdown).
    fn flush(&self) {}
}

/// What [`AuditSink::commit_many_then`] calls with the outcome of a commit.
pub type Committed = Box<dyn FnOnce(Result<()>) + Send>;

/// Whether a sink took a commit without blocking; the [`Commit`] comes back when it did not.
pub type Handed = std::result::Result<(), Commit>;

/// A commit to hand to a sink: its entries and what to call with the outcome.
pub struct Commit {
    pub events: Vec<AuditEvent>,
    pub done: Committed,
}

impl std::fmt::Debug for Commit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Commit")
            .field("events", &self.events.len())
            .finish_non_exhaustive()
    }
}

/// The stored form of one entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub seq: u64,
    pub prev: [u8; 32],
    pub sealed: Sealed,
    pub mac: [u8; 32],
}

/// Entries stored under one key (the first entry's seq).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditBlock {
    pub records: Vec<AuditRecord>,
}

/// The result of [`AuditLog::verify`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub ok: bool,
    pub entries: u64,
    /// The first entry whose link is broken.
    pub first_broken: Option<u64>,
    pub reason: Option<String>,
}

#[derive(Debug)]
struct Head {
    next_seq: u64,
    last_mac: [u8; 32],
}

/// The audit log of one node.
#[derive(Debug)]
pub struct AuditLog {
    engine: Arc<dyn Engine>,
    seal_key: SecretKey,
    mac_key: SecretKey,
    head: Mutex<Head>,
}

impl AuditLog {
    /// Open the log, continuing the chain from its stored head.
    /// Fails closed when the stored head does not match its tag (tampering): use
    /// [`AuditLog::for_verify`] to inspect such a log.
    pub fn open(engine: Arc<dyn Engine>, master: &SecretKey) -> Result<Self> {
        let log = Self::for_verify(engine, master);
        let mut head = match log.read_head()? {
            Some((seq, mac)) => Head {
                next_seq: seq + 1,
                last_mac: mac,
            },
            None => Head {
                next_seq: 1,
                last_mac: [0; 32],
            },
        };
        // A crash between a block's write and its head's write leaves blocks past the head.
        // Extend the head over them when their links check out; anything else is left for
        // `verify` to report.
        let recorded = head.next_seq;
        let after = (head.next_seq - 1).to_be_bytes();
        'blocks: for (_, v) in log.engine.scan(AUDIT_TREE, b"", Some(&after), usize::MAX)? {
            let Ok(block) = decode_audit_block(&v) else {
                break;
            };
            for rec in block.records {
                if rec.seq != head.next_seq
                    || rec.prev != head.last_mac
                    || rec.mac != log.link_mac(rec.seq, &rec.prev, &rec.sealed)
                {
                    break 'blocks;
                }
                head.next_seq += 1;
                head.last_mac = rec.mac;
            }
        }
        if head.next_seq != recorded {
            log.write_head(head.next_seq - 1, &head.last_mac)?;
        }
        if let Ok(mut h) = log.head.lock() {
            *h = head;
        }
        Ok(log)
    }

    /// A log for [`AuditLog::verify`] and [`AuditLog::list`] only: it neither reads nor repairs the
    /// head, so it opens whatever state the log is in. Do not append through it.
    pub fn for_verify(engine: Arc<dyn Engine>, master: &SecretKey) -> Self {
        Self {
            engine,
            seal_key: master.derive("audit-seal"),
            mac_key: master.derive("audit-mac"),
            head: Mutex::new(Head {
                next_seq: 1,
                last_mac: [0; 32],
            }),
        }
    }

    /// The stored head `(last seq, its mac)`, checked against its tag.
    fn read_head(&self) -> Result<Option<(u64, [u8; 32])>> {
        let Some(b) = self.engine.get(META_TREE, HEAD_KEY)? else {
            return Ok(None);
        };
        let (seq, mac, tag): (u64, [u8; 32], [u8; 32]) = postcard::from_bytes(&b)
            .map_err(|e| StorageError::Corrupt(format!("audit head: {e}")))?;
        if tag != self.head_tag(seq, &mac) {
            return Err(StorageError::Corrupt("audit head fails its tag".into()));
        }
        Ok(Some((seq, mac)))
    }

    fn write_head(&self, seq: u64, mac: &[u8; 32]) -> Result<()> {
        let bytes = postcard::to_stdvec(&(seq, *mac, self.head_tag(seq, mac)))
            .map_err(|e| StorageError::Corrupt(e.to_string()))?;
        self.engine.put(META_TREE, HEAD_KEY, &bytes)
    }

    fn head_tag(&self, seq: u64, last: &[u8; 32]) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(self.mac_key.bytes())
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        mac.update(b"swarm-audit-head-v1");
        mac.update(&seq.to_be_bytes());
        mac.update(last);
        mac.finalize().into_bytes().into()
    }

    /// Append an event; returns its sequence number. Durable after the engine's next `sync`.
    pub fn append(&self, event: &AuditEvent) -> Result<u64> {
        self.append_many(std::slice::from_ref(event))
    }

    /// Append events in order under one lock, one engine insert per [`MAX_BLOCK`] events and one
    /// head update; returns the last sequence number. Durable after the engine's next `sync`.
    pub fn append_many(&self, events: &[AuditEvent]) -> Result<u64> {
        let mut head = self.head.lock().unwrap_or_else(|p| p.into_inner());
        for chunk in events.chunks(MAX_BLOCK) {
            let first = head.next_seq;
            let mut seq = first;
            let mut prev = head.last_mac;
            let mut records = Vec::with_capacity(chunk.len());
            // One buffer for every entry's plaintext, one allocation for the block: this runs
            // for every request the gateway serves.
            let mut plain = Vec::with_capacity(512);
            let mut block_len = 16;
            for event in chunk {
                plain.clear();
                plain = postcard::to_extend(event, plain)
                    .map_err(|e| StorageError::Corrupt(e.to_string()))?;
                let sealed = crypto::seal(&self.seal_key, &seq.to_be_bytes(), &plain)?;
                block_len += RECORD_OVERHEAD + sealed.ct.len();
                let mac = self.link_mac(seq, &prev, &sealed);
                records.push(AuditRecord {
                    seq,
                    prev,
                    sealed,
                    mac,
                });
                prev = mac;
                seq += 1;
            }
            let block = postcard::to_extend(&AuditBlock { records }, Vec::with_capacity(block_len))
                .map_err(|e| StorageError::Corrupt(e.to_string()))?;
            self.engine.put(AUDIT_TREE, &first.to_be_bytes(), &block)?;
            self.write_head(seq - 1, &prev)?;
            head.next_seq = seq;
            head.last_mac = prev;
        }
        Ok(head.next_seq - 1)
    }

    /// Entries after `after_seq`, oldest first, at most `limit`.
    pub fn list(&self, after_seq: u64, limit: usize) -> Result<Vec<AuditEntry>> {
        // The block holding `after_seq + 1` starts at most MAX_BLOCK - 1 entries earlier.
        let from = after_seq.saturating_sub(MAX_BLOCK as u64).to_be_bytes();
        let start = (after_seq >= MAX_BLOCK as u64).then_some(&from[..]);
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        self.engine
            .for_each(AUDIT_TREE, b"", start, 16, &mut |_, v| {
                for rec in decode_audit_block(&v)?.records {
                    if rec.seq <= after_seq || out.len() >= limit {
                        continue;
                    }
                    let plain = crypto::open(
                        &self.seal_key,
                        &rec.seq.to_be_bytes(),
                        &rec.sealed,
                        "audit entry",
                    )?;
                    let event: AuditEvent = postcard::from_bytes(&plain).map_err(|e| {
                        StorageError::Corrupt(format!("audit entry {}: {e}", rec.seq))
                    })?;
                    out.push(AuditEntry {
                        seq: rec.seq,
                        event,
                    });
                }
                Ok(out.len() < limit)
            })?;
        Ok(out)
    }

    /// Walk the whole chain and report the first broken link.
    pub fn verify(&self) -> Result<VerifyReport> {
        let head = self.read_head();
        let head_seq = head.as_ref().ok().and_then(|h| h.map(|(seq, _)| seq));
        let mut mac_at_head = None;
        let mut prev = [0u8; 32];
        let mut expected_seq = 1u64;
        let broken = |seq: u64, reason: String, entries: u64| VerifyReport {
            ok: false,
            entries,
            first_broken: Some(seq),
            reason: Some(reason),
        };
        let mut found = None;
        self.engine
            .for_each(AUDIT_TREE, b"", None, 1024, &mut |k, v| {
                let n = expected_seq - 1;
                let block = match decode_audit_block(&v) {
                    Ok(b) if !b.records.is_empty() => b,
                    Ok(_) => {
                        found = Some(broken(expected_seq, "empty block".into(), n));
                        return Ok(false);
                    }
                    Err(e) => {
                        found = Some(broken(expected_seq, e.to_string(), n));
                        return Ok(false);
                    }
                };
                if k != block.records[0].seq.to_be_bytes() {
                    found = Some(broken(
                        expected_seq,
                        "block stored under the wrong key".into(),
                        n,
                    ));
                    return Ok(false);
                }
                for rec in block.records {
                    let n = expected_seq - 1;
                    let problem = if rec.seq != expected_seq {
                        Some((
                            expected_seq,
                            format!("entry {} found where {expected_seq} was expected", rec.seq),
                        ))
                    } else if rec.prev != prev {
                        Some((rec.seq, "link to the previous entry differs".into()))
                    } else if rec.mac != self.link_mac(rec.seq, &prev, &rec.sealed) {
                        Some((rec.seq, "entry content does not match its hash".into()))
                    } else {
                        None
                    };
                    if let Some((seq, reason)) = problem {
                        found = Some(broken(seq, reason, n));
                        return Ok(false);
                    }
                    if Some(rec.seq) == head_seq {
                        mac_at_head = Some(rec.mac);
                    }
                    prev = rec.mac;
                    expected_seq += 1;
                }
                Ok(true)
            })?;
        if let Some(report) = found {
            return Ok(report);
        }
        let entries = expected_seq - 1;
        match head {
            Err(e) => return Ok(broken(entries, e.to_string(), entries)),
            Ok(Some((seq, mac))) => {
                if seq > entries {
                    return Ok(broken(
                        entries + 1,
                        format!("head says {seq} entries, chain has {entries}: entries missing"),
                        entries,
                    ));
                }
                if seq > 0 && mac_at_head != Some(mac) {
                    return Ok(broken(
                        seq,
                        "entry differs from the recorded head".into(),
                        entries,
                    ));
                }
            }
            Ok(None) if entries > 0 => {
                return Ok(broken(1, "audit head missing".into(), entries));
            }
            Ok(None) => {}
        }
        Ok(VerifyReport {
            ok: true,
            entries,
            first_broken: None,
            reason: None,
        })
    }

    fn link_mac(&self, seq: u64, prev: &[u8; 32], sealed: &Sealed) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(self.mac_key.bytes())
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        mac.update(b"swarm-audit-v1");
        mac.update(&seq.to_be_bytes());
        mac.update(prev);
        mac.update(&sealed.nonce);
        mac.update(&(sealed.ct.len() as u64).to_be_bytes());
        mac.update(&sealed.ct);
        mac.finalize().into_bytes().into()
    }
}

/// Decode a stored audit block; never panics on arbitrary bytes.
pub fn decode_audit_block(bytes: &[u8]) -> Result<AuditBlock> {
    postcard::from_bytes(bytes).map_err(|e| StorageError::Corrupt(format!("audit block: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::MemEngine;

    fn event(i: u64) -> AuditEvent {
        AuditEvent {
            ts_ms: i,
            node: "n".into(),
            request_id: format!("r{i}"),
            actor: "alice".into(),
            action: "memory.write".into(),
            resource: format!("memory/ns/k{i}"),
            outcome: "ok".into(),
            status: 200,
            code: None,
        }
    }

    fn log_with(n: u64) -> (Arc<dyn Engine>, SecretKey, AuditLog) {
        let engine: Arc<dyn Engine> = Arc::new(MemEngine::new());
        let master = SecretKey::generate();
        let log = AuditLog::open(engine.clone(), &master).expect("open");
        for i in 1..=n {
            assert_eq!(log.append(&event(i)).expect("append"), i);
        }
        (engine, master, log)
    }

    #[test]
    fn intact_chain_verifies_and_lists() {
        let (engine, master, log) = log_with(10);
        let r = log.verify().expect("verify");
        assert!(r.ok, "{r:?}");
        assert_eq!(r.entries, 10);
        let l = log.list(3, 4).expect("list");
        assert_eq!(l.iter().map(|e| e.seq).collect::<Vec<_>>(), [4, 5, 6, 7]);
        assert_eq!(l[0].event, event(4));
        // Reopening continues the chain.
        let log2 = AuditLog::open(engine, &master).expect("reopen");
        assert_eq!(log2.append(&event(11)).expect("append"), 11);
        assert!(log2.verify().expect("verify").ok);
    }

    #[test]
    fn batches_continue_the_chain() {
        let (_, _, log) = log_with(3);
        let batch: Vec<_> = (4..=9).map(event).collect();
        assert_eq!(log.append_many(&batch).expect("batch"), 9);
        assert_eq!(log.append_many(&[]).expect("empty"), 9);
        assert_eq!(log.append(&event(10)).expect("append"), 10);
        let r = log.verify().expect("verify");
        assert!(r.ok && r.entries == 10, "{r:?}");
        assert_eq!(log.list(8, 10).expect("list")[0].event, event(9));
    }

    #[test]
    fn a_flipped_byte_inside_a_block_names_its_entry() {
        let (engine, _, log) = log_with(2);
        let batch: Vec<_> = (3..=700).map(event).collect();
        assert_eq!(log.append_many(&batch).expect("batch"), 700);
        assert!(log.verify().expect("verify").ok);
        assert_eq!(log.list(600, 3).expect("list")[0].seq, 601);
        assert_eq!(log.list(0, 1000).expect("list").len(), 700);
        // Entries 3..=514 share the block stored under seq 3; corrupt entry 10 inside it.
        let k = 3u64.to_be_bytes();
        let mut block =
            decode_audit_block(&engine.get(AUDIT_TREE, &k).expect("get").expect("some"))
                .expect("decode");
        block.records[7].sealed.ct[0] ^= 1;
        engine
            .put(
                AUDIT_TREE,
                &k,
                &postcard::to_stdvec(&block).expect("encode"),
            )
            .expect("put");
        let r = log.verify().expect("verify");
        assert_eq!(r.first_broken, Some(10), "{r:?}");
    }

    #[test]
    fn crash_between_block_and_head_is_repaired_not_reported() {
        let (engine, master, log) = log_with(3);
        let head_after_3 = engine.get(META_TREE, HEAD_KEY).expect("get").expect("head");
        log.append(&event(4)).expect("append");
        log.append(&event(5)).expect("append");
        // The blocks of 4 and 5 reached the disk, their head writes did not.
        engine.put(META_TREE, HEAD_KEY, &head_after_3).expect("put");
        assert!(
            log.verify().expect("verify").ok,
            "a lagging head is not tampering"
        );
        let reopened = AuditLog::open(engine.clone(), &master).expect("reopen");
        assert_eq!(reopened.append(&event(6)).expect("append"), 6);
        let r = reopened.verify().expect("verify");
        assert!(r.ok && r.entries == 6, "{r:?}");
    }

    #[test]
    fn forged_head_is_reported() {
        let (engine, _, log) = log_with(4);
        // Point the head at entry 2 with entry 2's mac but no valid tag: truncation cover-up.
        let block = decode_audit_block(
            &engine
                .get(AUDIT_TREE, &2u64.to_be_bytes())
                .expect("get")
                .expect("2"),
        )
        .expect("decode");
        let forged = postcard::to_stdvec(&(2u64, block.records[0].mac, [0u8; 32])).expect("encode");
        engine.put(META_TREE, HEAD_KEY, &forged).expect("put");
        assert!(!log.verify().expect("verify").ok);
        // The node refuses to open it; the verifier still reports it.
        let master = SecretKey::generate();
        assert!(AuditLog::open(engine.clone(), &master).is_err());
    }

    #[test]
    fn flipped_byte_is_reported_at_its_entry() {
        let (engine, _, log) = log_with(10);
        let k = 6u64.to_be_bytes();
        let mut raw = engine.get(AUDIT_TREE, &k).expect("get").expect("some");
        let last = raw.len() - 40; // inside the ciphertext
        raw[last] ^= 0x01;
        engine.put(AUDIT_TREE, &k, &raw).expect("put");
        let r = log.verify().expect("verify");
        assert!(!r.ok);
        assert_eq!(r.first_broken, Some(6));
    }

    #[test]
    fn removed_and_truncated_entries_are_reported() {
        let (engine, _, log) = log_with(10);
        engine
            .remove(AUDIT_TREE, &4u64.to_be_bytes())
            .expect("remove");
        assert_eq!(log.verify().expect("verify").first_broken, Some(4));

        let (engine, _, log) = log_with(10);
        engine
            .remove(AUDIT_TREE, &10u64.to_be_bytes())
            .expect("remove");
        assert_eq!(log.verify().expect("verify").first_broken, Some(10));
    }

    #[test]
    fn rewritten_entry_without_key_is_reported() {
        let (engine, _, log) = log_with(5);
        // An attacker re-seals entry 3 under a key of their own and recomputes nothing else.
        let rogue =
            AuditLog::open(Arc::new(MemEngine::new()), &SecretKey::generate()).expect("open");
        rogue.append(&event(1)).expect("append");
        rogue.append(&event(2)).expect("append");
        rogue.append(&event(3)).expect("append");
        let forged = rogue
            .engine
            .get(AUDIT_TREE, &3u64.to_be_bytes())
            .expect("get")
            .expect("some");
        engine
            .put(AUDIT_TREE, &3u64.to_be_bytes(), &forged)
            .expect("put");
        assert_eq!(log.verify().expect("verify").first_broken, Some(3));
    }
}
