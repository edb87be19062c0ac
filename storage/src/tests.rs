//! Store-level tests run against every engine.

use std::sync::Arc;

use proptest::prelude::*;

use super::*;

fn engines() -> Vec<(Arc<dyn Engine>, Option<tempfile::TempDir>)> {
    let dir = tempfile::tempdir().expect("tempdir");
    let sled: Arc<dyn Engine> = Arc::new(SledEngine::open(&dir.path().join("db")).expect("sled"));
    vec![(Arc::new(MemEngine::new()), None), (sled, Some(dir))]
}

fn put(store: &Storage, ns: &str, key: &str, json: &str, subject: Option<&str>) -> MemoryItem {
    store
        .memory
        .put(
            ns,
            key,
            PutRequest {
                value_json: json.into(),
                subject: subject.map(String::from),
                tags: vec!["t".into()],
                ..Default::default()
            },
            1_000,
        )
        .expect("put")
}

#[test]
fn put_get_list_delete_on_every_engine() {
    for (engine, _dir) in engines() {
        let s = Storage::with_engine(engine, SecretKey::generate(), StorageOptions::new("n1"))
            .expect("open");
        let item = put(&s, "ns", "a", r#"{"x":1}"#, None);
        put(&s, "ns", "b", "2", None);
        put(&s, "ns", "c", "3", None);
        put(&s, "other", "a", "4", None);
        let got = s
            .memory
            .get("ns", "a", 1_000)
            .expect("get")
            .expect("present");
        assert_eq!(got.value_json, r#"{"x":1}"#);
        assert_eq!(got.version, item.version);
        assert_eq!(got.tags, ["t"]);
        let keys: Vec<_> = s
            .memory
            .list("ns", "", None, 10, 1_000)
            .expect("list")
            .into_iter()
            .map(|i| i.key)
            .collect();
        assert_eq!(keys, ["a", "b", "c"]);
        assert_eq!(
            s.memory.list("ns", "", Some("a"), 1, 1_000).expect("list")[0].key,
            "b"
        );
        assert!(s.memory.delete("ns", "b", 1_001).expect("delete"));
        assert!(!s.memory.delete("ns", "b", 1_002).expect("delete again"));
        assert_eq!(s.memory.get("ns", "b", 1_003).expect("get"), None);
        assert_eq!(
            s.memory
                .list("ns", "", None, 10, 1_003)
                .expect("list")
                .len(),
            2
        );
        s.sync().expect("sync");
    }
}

#[test]
fn overwrite_orders_after_previous_even_if_wall_clock_went_back() {
    let s = Storage::with_engine(
        Arc::new(MemEngine::new()),
        SecretKey::generate(),
        StorageOptions::new("n1"),
    )
    .expect("open");
    let first = s
        .memory
        .put(
            "ns",
            "k",
            PutRequest {
                value_json: "1".into(),
                ..Default::default()
            },
            10_000,
        )
        .expect("put");
    let second = s
        .memory
        .put(
            "ns",
            "k",
            PutRequest {
                value_json: "2".into(),
                ..Default::default()
            },
            5_000,
        )
        .expect("put");
    assert!(second.version > first.version);
    assert_eq!(
        s.memory
            .get("ns", "k", 5_000)
            .expect("get")
            .expect("some")
            .value_json,
        "2"
    );
}

#[test]
fn ttl_and_memory_type_defaults_expire() {
    let s = Storage::with_engine(
        Arc::new(MemEngine::new()),
        SecretKey::generate(),
        StorageOptions::new("n1"),
    )
    .expect("open");
    let req = |ty, ttl| PutRequest {
        value_json: "1".into(),
        memory_type: ty,
        ttl_ms: ttl,
        ..Default::default()
    };
    s.memory
        .put("ns", "ttl", req(MemoryType::Semantic, Some(500)), 1_000)
        .expect("put");
    s.memory
        .put("ns", "session", req(MemoryType::Session, None), 1_000)
        .expect("put");
    s.memory
        .put("ns", "forever", req(MemoryType::Semantic, None), 1_000)
        .expect("put");
    assert!(s.memory.get("ns", "ttl", 1_499).expect("get").is_some());
    assert!(s.memory.get("ns", "ttl", 1_500).expect("get").is_none());
    assert!(
        s.memory
            .get("ns", "session", 1_000 + 86_400_000 - 1)
            .expect("get")
            .is_some()
    );
    assert!(
        s.memory
            .get("ns", "session", 1_000 + 86_400_000)
            .expect("get")
            .is_none()
    );
    assert!(
        s.memory
            .get("ns", "forever", u64::MAX / 2)
            .expect("get")
            .is_some()
    );
}

#[test]
fn erased_subject_cannot_be_read_or_written() {
    let s = Storage::with_engine(
        Arc::new(MemEngine::new()),
        SecretKey::generate(),
        StorageOptions::new("n1"),
    )
    .expect("open");
    put(&s, "ns", "alice-1", "\"secret\"", Some("alice"));
    put(&s, "ns", "bob-1", "\"fine\"", Some("bob"));
    // Read first, so the decrypted value sits in the read cache: the erase must drop it.
    assert!(s.memory.get("ns", "alice-1", 1_500).expect("get").is_some());
    assert!(
        s.memory
            .get("ns", "alice-1", 1_500)
            .expect("cached get")
            .is_some()
    );
    assert!(s.memory.erase_subject("alice", 2_000).expect("erase"));
    let e = s.memory.get("ns", "alice-1", 2_000).expect_err("erased");
    assert_eq!(e.kind(), "subject_erased");
    assert!(s.memory.get("ns", "bob-1", 2_000).expect("get").is_some());
    // Listing skips what can no longer be read.
    let keys: Vec<_> = s
        .memory
        .list("ns", "", None, 10, 2_000)
        .expect("list")
        .into_iter()
        .map(|i| i.key)
        .collect();
    assert_eq!(keys, ["bob-1"]);
    let again = s.memory.put(
        "ns",
        "alice-2",
        PutRequest {
            value_json: "1".into(),
            subject: Some("alice".into()),
            ..Default::default()
        },
        2_001,
    );
    assert_eq!(again.expect_err("erased").kind(), "subject_erased");
}

#[test]
fn names_that_could_traverse_are_refused() {
    let s = Storage::with_engine(
        Arc::new(MemEngine::new()),
        SecretKey::generate(),
        StorageOptions::new("n1"),
    )
    .expect("open");
    for bad in ["", "..", "../etc", "a/b", ".hidden", "a\0b", "spa ce", "é"] {
        let e = s
            .memory
            .put(
                bad,
                "k",
                PutRequest {
                    value_json: "1".into(),
                    ..Default::default()
                },
                1,
            )
            .expect_err(bad);
        assert_eq!(e.kind(), "invalid_input", "{bad}");
        let e = s
            .memory
            .put(
                "ns",
                bad,
                PutRequest {
                    value_json: "1".into(),
                    ..Default::default()
                },
                1,
            )
            .expect_err(bad);
        assert_eq!(e.kind(), "invalid_input", "{bad}");
    }
    assert!(
        s.memory
            .list("ns", "", None, 10, 1)
            .expect("list")
            .is_empty()
    );
}

#[test]
fn limits_are_enforced() {
    let mut opts = StorageOptions::new("n1");
    opts.limits = MemoryLimits {
        max_value_bytes: 10,
        max_name_len: 8,
        max_namespace_entries: 2,
        ..Default::default()
    };
    let s = Storage::with_engine(Arc::new(MemEngine::new()), SecretKey::generate(), opts)
        .expect("open");
    let req = |v: &str| PutRequest {
        value_json: v.into(),
        ..Default::default()
    };
    assert_eq!(
        s.memory
            .put("ns", "k", req("12345678901"), 1)
            .expect_err("big")
            .kind(),
        "too_large"
    );
    assert_eq!(
        s.memory
            .put("ns", "toolongkey", req("1"), 1)
            .expect_err("long")
            .kind(),
        "invalid_input"
    );
    s.memory.put("ns", "a", req("1"), 1).expect("put");
    s.memory.put("ns", "b", req("1"), 1).expect("put");
    s.memory
        .put("ns", "a", req("2"), 1)
        .expect("overwrite is fine");
    assert_eq!(
        s.memory
            .put("ns", "c", req("1"), 1)
            .expect_err("full")
            .kind(),
        "namespace_full"
    );
}

#[test]
fn sled_files_hold_no_plaintext() {
    let dir = tempfile::tempdir().expect("tempdir");
    let marker = "PLAINTEXT-MARKER-7f3a9c";
    {
        let s = Storage::open(dir.path(), SecretKey::generate(), StorageOptions::new("n1"))
            .expect("open");
        for i in 0..50 {
            put(
                &s,
                "ns",
                &format!("k{i}"),
                &format!("\"{marker}-{i}\""),
                Some("carol"),
            );
            put(
                &s,
                "ns2",
                &format!("k{i}"),
                &format!("\"{marker}-{i}\""),
                None,
            );
        }
        s.audit
            .append(&AuditEvent {
                ts_ms: 1,
                node: "n1".into(),
                request_id: "r".into(),
                actor: marker.into(),
                action: "a".into(),
                resource: "r".into(),
                outcome: "ok".into(),
                status: 200,
                code: None,
            })
            .expect("audit");
        s.sync().expect("sync");
    }
    let mut found = Vec::new();
    for entry in walk(dir.path()) {
        let bytes = std::fs::read(&entry).expect("read");
        if bytes.windows(marker.len()).any(|w| w == marker.as_bytes()) {
            found.push(entry);
        }
    }
    assert!(found.is_empty(), "plaintext found in {found:?}");
}

fn walk(p: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(p).expect("read_dir").flatten() {
        let path = e.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

#[test]
fn tampered_value_fails_authentication() {
    let engine: Arc<dyn Engine> = Arc::new(MemEngine::new());
    let s = Storage::with_engine(
        engine.clone(),
        SecretKey::generate(),
        StorageOptions::new("n1"),
    )
    .expect("open");
    put(&s, "ns", "a", "\"v\"", None);
    put(&s, "ns", "b", "\"w\"", None);
    // Swap the two records: each is bound to its own key by the AAD.
    let a = engine
        .get(trees::MEMORY, b"ns\0a")
        .expect("get")
        .expect("a");
    let b = engine
        .get(trees::MEMORY, b"ns\0b")
        .expect("get")
        .expect("b");
    engine.put(trees::MEMORY, b"ns\0a", &b).expect("put");
    engine.put(trees::MEMORY, b"ns\0b", &a).expect("put");
    assert_eq!(
        s.memory.get("ns", "a", 1_000).expect_err("swapped").kind(),
        "decrypt_failed"
    );
}

proptest! {
    /// Decoders of stored bytes never panic, whatever the bytes.
    #[test]
    fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_record(&bytes);
        let _ = decode_audit_block(&bytes);
    }

    /// Values round-trip through sealing for any JSON text and names.
    #[test]
    fn values_round_trip(value in ".{0,200}", key in "[a-z0-9_:-]{1,20}") {
        let s = Storage::with_engine(Arc::new(MemEngine::new()), SecretKey::generate(), StorageOptions::new("n1"))
            .expect("open");
        let json = serde_json::to_string(&value).expect("json");
        s.memory.put("ns", &key, PutRequest { value_json: json.clone(), ..Default::default() }, 1).expect("put");
        prop_assert_eq!(s.memory.get("ns", &key, 1).expect("get").expect("some").value_json, json);
    }
}

proptest! {
    /// Wrapped data keys and the audit head read back from disk: garbage is an error, not a panic.
    #[test]
    fn garbage_keys_and_heads_are_errors(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let engine: Arc<dyn Engine> = Arc::new(MemEngine::new());
        engine.put(trees::KEYS, b"subject:alice", &bytes).expect("put");
        let ring = Keyring::new(SecretKey::generate(), engine.clone());
        prop_assert!(ring.get(&KeyId::Subject("alice".into())).is_err());
        engine.put("meta", b"audit_head", &bytes).expect("put");
        let master = SecretKey::generate();
        prop_assert!(AuditLog::open(engine.clone(), &master).is_err());
        let report = AuditLog::for_verify(engine, &master).verify();
        prop_assert!(report.is_ok_and(|r| !r.ok));
    }
}

#[test]
fn change_counter_moves_on_every_change_of_its_namespace_only() {
    use std::sync::atomic::Ordering;
    let a = Storage::with_engine(
        Arc::new(MemEngine::new()),
        SecretKey::generate(),
        StorageOptions::new("a"),
    )
    .expect("storage");
    let b = Storage::with_engine(
        Arc::new(MemEngine::new()),
        SecretKey::generate(),
        StorageOptions::new("b"),
    )
    .expect("storage");
    // Taken before the namespace exists, as a cache does at start.
    let counter = b.memory.change_counter("watched");
    let seen = || counter.load(Ordering::Acquire);
    assert_eq!(seen(), 0);
    put(&b, "watched", "k", "1", None);
    assert_eq!(seen(), 1, "a local write");
    put(&b, "other", "k", "1", None);
    assert_eq!(seen(), 1, "another namespace");
    let (_, delta) = a
        .memory
        .put_with_delta(
            "watched",
            "r",
            PutRequest {
                value_json: "2".into(),
                ..Default::default()
            },
            2_000,
        )
        .expect("put");
    b.memory.apply_delta(&delta, 2_000).expect("apply");
    assert_eq!(seen(), 2, "a replicated delta");
    assert!(b.memory.delete("watched", "k", 1_500).expect("delete"));
    assert_eq!(seen(), 3, "a delete");
}
