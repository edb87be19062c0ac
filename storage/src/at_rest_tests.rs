//! What a store keeps at rest: payload limits (tags included), list byte budgets, and no subject
//! name in plaintext anywhere in the engine, before or after the subject is erased.

use std::sync::Arc;

use super::*;
use crate::crdt::Version;
use crate::hlc::Hlc;

const NAME: &str = "zq-subject-alice-7391";

fn store_on(engine: Arc<dyn Engine>, master: SecretKey, node: &str) -> Storage {
    Storage::with_engine(engine, master, StorageOptions::new(node)).expect("open")
}

fn req(value_json: &str, subject: Option<&str>, tags: Vec<String>) -> PutRequest {
    PutRequest {
        value_json: value_json.into(),
        subject: subject.map(String::from),
        tags,
        ..Default::default()
    }
}

#[test]
fn tags_count_toward_the_value_limit_and_are_capped() {
    let s = store_on(Arc::new(MemEngine::new()), SecretKey::generate(), "n1");
    let limits = MemoryLimits::default();
    let tag_field = |e: StorageError| match e {
        StorageError::InvalidInput { field, message } => {
            assert_eq!(field, "tags", "{message}");
            message
        }
        other => panic!("expected invalid tags, got {other:?}"),
    };
    // The attack: value `1` and 895 KiB of tags.
    let many: Vec<String> = (0..7160).map(|i| format!("{i:0>128}")).collect();
    let e = s
        .memory
        .put("ns", "k", req("1", None, many), 1)
        .expect_err("895 KiB of tags");
    tag_field(e);
    // Too many tags, even small ones.
    let count: Vec<String> = (0..=limits.max_tags).map(|i| i.to_string()).collect();
    tag_field(
        s.memory
            .put("ns", "k", req("1", None, count), 1)
            .expect_err("too many"),
    );
    // One tag too long.
    let long = vec!["x".repeat(limits.max_tag_bytes + 1)];
    tag_field(
        s.memory
            .put("ns", "k", req("1", None, long), 1)
            .expect_err("too long"),
    );
    // A value that fits alone but not with its tags.
    let value = format!("\"{}\"", "v".repeat(limits.max_value_bytes - 2 - 100));
    let tags = vec!["t".repeat(limits.max_tag_bytes)];
    let msg = tag_field(
        s.memory
            .put("ns", "k", req(&value, None, tags), 1)
            .expect_err("value + tags"),
    );
    assert!(msg.contains("value and tags"), "{msg}");
    // The same value with small tags, and the most tags allowed, are fine.
    let ok_tags: Vec<String> = (0..limits.max_tags).map(|i| format!("t{i}")).collect();
    s.memory
        .put("ns", "k", req("1", None, ok_tags.clone()), 1)
        .expect("max tags");
    let item = s.memory.get("ns", "k", 1).expect("get").expect("some");
    assert_eq!(item.tags, ok_tags);
}

#[test]
fn list_pages_stop_at_their_byte_budget() {
    let s = store_on(Arc::new(MemEngine::new()), SecretKey::generate(), "n1");
    let big = format!("\"{}\"", "b".repeat(100_000));
    for i in 0..10 {
        s.memory
            .put("ns", &format!("k{i}"), req(&big, None, Vec::new()), 1)
            .expect("put");
    }
    let budget = 250_000;
    let mut after: Option<String> = None;
    let mut seen = Vec::new();
    for _ in 0..20 {
        let page = s
            .memory
            .list_page("ns", "", after.as_deref(), 40, budget, 1)
            .expect("list");
        let bytes: usize = page.items.iter().map(MemoryItem::payload_bytes).sum();
        assert!(bytes <= budget, "page of {bytes} bytes over {budget}");
        assert!(!page.items.is_empty());
        seen.extend(page.items.iter().map(|i| i.key.clone()));
        if !page.more {
            break;
        }
        assert!(page.truncated, "stopped by the budget, not the limit of 40");
        after = page.items.last().map(|i| i.key.clone());
    }
    let want: Vec<String> = (0..10).map(|i| format!("k{i}")).collect();
    assert_eq!(seen, want, "pages cover every item once, in order");
    // One item larger than the budget still comes back alone, so paging moves forward.
    let page = s.memory.list_page("ns", "", None, 40, 10, 1).expect("list");
    assert_eq!(page.items.len(), 1);
    assert!(page.more && page.truncated);
    // The item limit still applies, without `truncated`.
    let page = s
        .memory
        .list_page("ns", "", None, 3, usize::MAX, 1)
        .expect("list");
    assert_eq!(page.items.len(), 3);
    assert!(page.more && !page.truncated);
}

#[test]
fn subject_names_are_never_stored_in_plaintext() {
    let engine = Arc::new(MemEngine::new());
    let master = SecretKey::generate();
    let s = store_on(engine.clone(), master, "a");
    let item = s
        .memory
        .put(
            "ns",
            "k1",
            req("\"v\"", Some(NAME), vec!["t".into()]),
            1_000,
        )
        .expect("put");
    assert_eq!(item.subject.as_deref(), Some(NAME));
    s.memory
        .put("ns", "k2", req("\"w\"", None, Vec::new()), 1_000)
        .expect("put");
    // Read back with its subject, although the record holds only the keyed id.
    let got = s.memory.get("ns", "k1", 1_000).expect("get").expect("some");
    assert_eq!(got.subject.as_deref(), Some(NAME));
    assert!(
        !engine.contains_bytes(NAME.as_bytes()),
        "live subject in plaintext"
    );
    // A replica learns the value with its subject.
    let b = store_on(Arc::new(MemEngine::new()), SecretKey::generate(), "b");
    let delta = s.memory.delta("ns", "k1").expect("delta").expect("some");
    assert_eq!(
        delta.value.as_ref().and_then(|v| v.subject.as_deref()),
        Some(NAME)
    );
    b.memory.apply_delta(&delta, 1_000).expect("apply");

    assert!(s.memory.erase_subject(NAME, 2_000).expect("erase"));
    assert_eq!(
        s.memory.get("ns", "k1", 2_000).expect_err("erased").kind(),
        "subject_erased"
    );
    assert!(
        !engine.contains_bytes(NAME.as_bytes()),
        "erased subject in plaintext"
    );
    // The destroyed set is still exchanged by name, and erases on the replica.
    let destroyed = s.memory.destroyed_subjects().expect("destroyed");
    assert_eq!(destroyed, [NAME]);
    assert_eq!(
        b.memory.merge_destroyed(&destroyed, 2_000).expect("merge"),
        1
    );
    assert!(b.memory.get("ns", "k1", 2_000).is_err());
    // Still refused after a restart on the same engine.
    let again = store_on(engine.clone(), s.keyring.master().clone(), "a");
    assert_eq!(
        again
            .memory
            .put("ns", "k3", req("1", Some(NAME), Vec::new()), 3_000)
            .expect_err("erased")
            .kind(),
        "subject_erased"
    );
    assert_eq!(again.memory.destroyed_subjects().expect("set"), [NAME]);
    assert!(!engine.contains_bytes(NAME.as_bytes()));
}

#[test]
fn sled_files_hold_no_subject_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let s = Storage::open(dir.path(), SecretKey::generate(), StorageOptions::new("a"))
            .expect("open");
        for i in 0..20 {
            s.memory
                .put(
                    "ns",
                    &format!("k{i}"),
                    req("\"v\"", Some(NAME), Vec::new()),
                    1_000,
                )
                .expect("put");
        }
        s.sync().expect("sync");
        s.memory.erase_subject(NAME, 2_000).expect("erase");
        assert_eq!(s.memory.destroyed_subjects().expect("set"), [NAME]);
        s.sync().expect("sync");
    }
    let mut stack = vec![dir.path().to_path_buf()];
    let mut files = 0;
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("ls") {
            let p = entry.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else {
                files += 1;
                let bytes = std::fs::read(&p).expect("read");
                assert!(
                    !bytes.windows(NAME.len()).any(|w| w == NAME.as_bytes()),
                    "subject name in {}",
                    p.display()
                );
            }
        }
    }
    assert!(files > 0);
}

/// A store written before keyed subject ids: `subject:NAME` keys in `keys` and `destroyed`, and
/// records naming their subject. Opening it rewrites all of them; values still read.
#[test]
fn legacy_plaintext_subject_ids_are_migrated_on_open() {
    let engine = Arc::new(MemEngine::new());
    let master = SecretKey::generate();
    // The legacy wrapped key of `NAME` and a destroyed mark of `bob-legacy-0815`.
    let data_key = SecretKey::generate();
    let slot = format!("subject:{NAME}");
    let wrapped = seal(
        &master,
        format!("swarm-keywrap-v1:{slot}").as_bytes(),
        data_key.bytes(),
    )
    .expect("wrap");
    engine
        .put(
            trees::KEYS,
            slot.as_bytes(),
            &postcard::to_stdvec(&wrapped).expect("enc"),
        )
        .expect("put");
    engine
        .put(
            crate::crypto::DESTROYED_TREE,
            b"subject:bob-legacy-0815",
            &5u64.to_be_bytes(),
        )
        .expect("put");
    // A legacy record sealed under it, and one of bob's.
    let version = Version {
        hlc: Hlc::new(1_000, 0),
        origin: "a".into(),
    };
    let legacy = KeyRef::LegacySubject(NAME.into());
    let plain = br#"{"value":"\"old\"","tags":["t"]}"#;
    let sealed = seal(
        &data_key,
        &memory::value_aad("ns", "old", &version, &legacy),
        plain,
    )
    .expect("seal");
    let rec = |key_id: KeyRef, sealed: Sealed| StoredRecord {
        version: version.clone(),
        value: Some(StoredValue {
            key_id,
            memory_type: MemoryType::Semantic,
            sealed,
        }),
        expires_at: None,
    };
    let put_rec = |key: &str, r: StoredRecord| {
        engine
            .put(
                trees::MEMORY,
                format!("ns\0{key}").as_bytes(),
                &postcard::to_stdvec(&r).expect("enc"),
            )
            .expect("put");
    };
    put_rec("old", rec(legacy, sealed.clone()));
    put_rec(
        "bobs",
        rec(KeyRef::LegacySubject("bob-legacy-0815".into()), sealed),
    );
    assert!(engine.contains_bytes(NAME.as_bytes()));

    let s = store_on(engine.clone(), master.clone(), "a");
    assert!(!engine.contains_bytes(NAME.as_bytes()), "migrated");
    assert!(!engine.contains_bytes(b"bob-legacy-0815"), "migrated");
    let item = s
        .memory
        .get("ns", "old", 1_000)
        .expect("get")
        .expect("some");
    assert_eq!(item.value_json, "\"old\"");
    assert_eq!(item.subject.as_deref(), Some(NAME));
    assert_eq!(
        s.memory
            .get("ns", "bobs", 1_000)
            .expect_err("erased")
            .kind(),
        "subject_erased"
    );
    assert_eq!(
        s.memory.destroyed_subjects().expect("set"),
        ["bob-legacy-0815"]
    );
    // Opening again finds nothing left to migrate.
    assert_eq!(s.keyring.migrate_legacy().expect("again"), 0);
    assert_eq!(s.memory.migrate_legacy().expect("again"), 0);
    // And erasing the migrated subject shreds the migrated record.
    s.memory.erase_subject(NAME, 2_000).expect("erase");
    assert!(s.memory.get("ns", "old", 2_000).is_err());
    assert!(!engine.contains_bytes(NAME.as_bytes()));
}
