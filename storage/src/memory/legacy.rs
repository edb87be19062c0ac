//! Stores written before keyed subject ids named each record's subject in plaintext
//! (`KeyRef::LegacySubject`); [`MemoryStore::migrate_legacy`] rewrites them when a store opens.

use super::{
    MEMORY_TREE, MemoryStore, Plain, Protection, StoredRecord, StoredValue, decode_record,
    value_aad,
};
use crate::crypto::{self, KeyId, KeyRef, Sealed};
use crate::error::{Result, StorageError};

impl MemoryStore {
    /// Rewrite the records of a store from before keyed subject ids, which name their subject in
    /// plaintext: the name moves into the sealed value, the record keeps only the keyed id. Run
    /// after [`Keyring::migrate_legacy`]. Returns how many records were rewritten; a record that
    /// cannot be opened is left as it is, with a warning.
    pub fn migrate_legacy(&self) -> Result<usize> {
        let mut done = 0;
        self.engine
            .for_each(MEMORY_TREE, b"", None, 256, &mut |k, v| {
                let is_legacy = |rec: &StoredRecord| {
                    matches!(&rec.value, Some(sv) if matches!(sv.key_id, KeyRef::LegacySubject(_)))
                };
                match decode_record(&v) {
                    Ok(rec) if is_legacy(&rec) => {}
                    _ => return Ok(true),
                }
                let (ns, key) = super::replica::split_record_key(&k)?;
                let slot = self.ns_state(&ns)?;
                let _guard = self.stripe(&ns, &key);
                let Some(cur) = self.read_record(&k)?.filter(is_legacy) else {
                    return Ok(true);
                };
                match self.migrated(&ns, &key, &cur) {
                    Ok(new) => {
                        self.commit(&slot, &ns, &key, &k, Some(&cur), Some(&new))?;
                        done += 1;
                    }
                    Err(e) => {
                        tracing::warn!(namespace = %ns, key = %key, error = %e, "legacy memory record left as it is");
                    }
                }
                Ok(true)
            })?;
        if done > 0 {
            tracing::info!(
                records = done,
                "memory: subject names moved into sealed values"
            );
        }
        Ok(done)
    }

    /// A legacy record in the current form (see [`MemoryStore::migrate_legacy`]).
    fn migrated(&self, ns: &str, key: &str, cur: &StoredRecord) -> Result<StoredRecord> {
        let Some(stored) = &cur.value else {
            return Ok(cur.clone());
        };
        let KeyRef::LegacySubject(name) = &stored.key_id else {
            return Ok(cur.clone());
        };
        let id = KeyId::Subject(name.clone());
        let key_ref = self.keyring.key_ref(&id);
        let shredded = || StoredRecord {
            version: cur.version.clone(),
            value: Some(StoredValue {
                key_id: key_ref.clone(),
                memory_type: stored.memory_type,
                sealed: Sealed {
                    nonce: [0; 24],
                    ct: Vec::new(),
                },
            }),
            expires_at: None,
        };
        if stored.is_shredded() || self.keyring.is_destroyed(&id)? {
            return Ok(shredded());
        }
        let data_key = self.keyring.get(&id)?;
        let bytes = match self.protection {
            Protection::Encrypted => crypto::open(
                &data_key,
                &value_aad(ns, key, &cur.version, &stored.key_id),
                &stored.sealed,
                "memory value",
            )?,
            Protection::PlaintextForBenchmarks => stored.sealed.ct.clone(),
        };
        let mut plain: Plain = serde_json::from_slice(&bytes)
            .map_err(|e| StorageError::Corrupt(format!("{ns}/{key}: {e}")))?;
        plain.subject = Some(name.clone());
        let plain = serde_json::to_vec(&plain).map_err(|e| StorageError::Corrupt(e.to_string()))?;
        let sealed = match self.protection {
            Protection::Encrypted => crypto::seal(
                &data_key,
                &value_aad(ns, key, &cur.version, &key_ref),
                &plain,
            )?,
            Protection::PlaintextForBenchmarks => Sealed {
                nonce: [0; 24],
                ct: plain,
            },
        };
        Ok(StoredRecord {
            version: cur.version.clone(),
            value: Some(StoredValue {
                key_id: key_ref,
                memory_type: stored.memory_type,
                sealed,
            }),
            expires_at: cur.expires_at,
        })
    }
}
