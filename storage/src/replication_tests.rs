//! Replication tests: replicas exchanging deltas and destroyed sets in any order converge; digest
//! anti-entropy repairs what deltas missed; deletes and erasures never come undone; refusals
//! change nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use proptest::prelude::*;

use super::*;

const T0: u64 = 1_700_000_000_000;

fn replica(node: &str) -> Storage {
    replica_with(node, MemoryLimits::default(), Arc::new(MemEngine::new()))
}

fn replica_with(node: &str, limits: MemoryLimits, engine: Arc<dyn Engine>) -> Storage {
    let mut opts = StorageOptions::new(node);
    opts.limits = limits;
    Storage::with_engine(engine, SecretKey::generate(), opts).expect("open")
}

fn req(value: &str, subject: Option<&str>, ttl_ms: Option<u64>) -> PutRequest {
    PutRequest {
        value_json: value.into(),
        subject: subject.map(String::from),
        ttl_ms,
        tags: vec!["t".into()],
        ..Default::default()
    }
}

type Summary = BTreeMap<String, (Version, Option<u64>)>;

fn summaries(s: &Storage, ns: &str, buckets: &[u16]) -> Summary {
    s.memory
        .bucket_summaries(ns, buckets)
        .expect("summaries")
        .into_iter()
        .map(|(k, v, e)| (k, (v, e)))
        .collect()
}

fn all_buckets() -> Vec<u16> {
    (0..BUCKETS as u16).collect()
}

/// Digest-driven anti-entropy between two replicas: destroyed sets first, then per namespace the
/// differing buckets, their summaries, and the deltas of the keys that differ, both ways. Returns
/// how many deltas were sent.
fn anti_entropy(a: &Storage, b: &Storage, now: u64) -> usize {
    let da = a.memory.destroyed_subjects().expect("destroyed");
    let db = b.memory.destroyed_subjects().expect("destroyed");
    a.memory.merge_destroyed(&db, now).expect("merge destroyed");
    b.memory.merge_destroyed(&da, now).expect("merge destroyed");
    let mut namespaces: BTreeSet<String> = a.memory.namespaces().expect("ns").into_iter().collect();
    namespaces.extend(b.memory.namespaces().expect("ns"));
    let mut sent = 0;
    for ns in namespaces {
        let (dga, dgb) = (
            a.memory.digest(&ns).expect("digest"),
            b.memory.digest(&ns).expect("digest"),
        );
        let buckets = dga.differing_buckets(&dgb);
        if buckets.is_empty() {
            continue;
        }
        let (sa, sb) = (summaries(a, &ns, &buckets), summaries(b, &ns, &buckets));
        let keys: BTreeSet<&String> = sa.keys().chain(sb.keys()).collect();
        for key in keys {
            if sa.get(key) == sb.get(key) {
                continue;
            }
            for (from, to) in [(a, b), (b, a)] {
                if let Some(d) = from.memory.delta(&ns, key).expect("delta") {
                    to.memory.apply_delta(&d, now).expect("apply");
                    sent += 1;
                }
            }
        }
    }
    sent
}

/// Every replica holds the same records: equal digests for every namespace, equal deltas for
/// every key, equal destroyed sets; and each incremental digest equals one rebuilt by a scan.
fn assert_converged(replicas: &[Storage]) {
    let namespaces: BTreeSet<String> = replicas
        .iter()
        .flat_map(|s| s.memory.namespaces().expect("ns"))
        .collect();
    let first = &replicas[0];
    for s in replicas {
        assert_eq!(
            s.memory.namespaces().expect("ns"),
            namespaces.iter().cloned().collect::<Vec<_>>()
        );
        assert_eq!(
            s.memory.destroyed_subjects().expect("destroyed"),
            first.memory.destroyed_subjects().expect("destroyed")
        );
    }
    for ns in &namespaces {
        let digest = first.memory.digest(ns).expect("digest");
        let keys = summaries(first, ns, &all_buckets());
        assert_eq!(digest.count as usize, keys.len());
        for s in replicas {
            assert_eq!(
                s.memory.digest(ns).expect("digest"),
                digest,
                "namespace {ns}"
            );
            assert_eq!(rebuilt_digest(s, ns), digest, "incremental digest of {ns}");
            assert_eq!(summaries(s, ns, &all_buckets()), keys);
            for key in keys.keys() {
                assert_eq!(
                    s.memory.delta(ns, key).expect("delta"),
                    first.memory.delta(ns, key).expect("delta"),
                    "{ns}/{key}"
                );
            }
        }
    }
}

/// The digest a freshly started store computes by scanning the same engine.
fn rebuilt_digest(s: &Storage, ns: &str) -> NamespaceDigest {
    MemoryStore::new(
        s.engine.clone(),
        s.keyring.clone(),
        s.clock.clone(),
        "rebuild".into(),
        MemoryLimits::default(),
        Protection::Encrypted,
    )
    .digest(ns)
    .expect("digest")
}

#[derive(Debug, Clone)]
enum Op {
    Put {
        at: usize,
        ns: u8,
        key: u8,
        value: u8,
        ttl_ms: Option<u64>,
        subject: Option<u8>,
    },
    Delete {
        at: usize,
        ns: u8,
        key: u8,
    },
    Erase {
        at: usize,
        subject: u8,
    },
    /// Deliver the pending message picked by this number (and keep a copy to deliver again).
    Deliver(usize),
}

fn op(erasures: bool) -> impl Strategy<Value = Op> {
    let put = (
        0..3usize,
        0..2u8,
        0..4u8,
        any::<u8>(),
        proptest::option::of(1u64..200),
        proptest::option::of(0..2u8),
    )
        .prop_map(|(at, ns, key, value, ttl_ms, subject)| Op::Put {
            at,
            ns,
            key,
            value,
            ttl_ms,
            subject,
        });
    let delete = (0..3usize, 0..2u8, 0..4u8).prop_map(|(at, ns, key)| Op::Delete { at, ns, key });
    let erase = (0..3usize, 0..2u8).prop_map(|(at, subject)| Op::Erase { at, subject });
    let deliver = any::<usize>().prop_map(Op::Deliver);
    let erase_weight = if erasures { 1 } else { 0 };
    prop_oneof![4 => put, 2 => delete, erase_weight => erase, 4 => deliver]
}

#[derive(Debug, Clone)]
enum Msg {
    Delta(Delta),
    Destroyed(Vec<String>),
}

const SUBJECTS: [&str; 2] = ["alice", "bob"];
const NAMESPACES: [&str; 2] = ["ns-a", "ns.b"];

fn deliver(replicas: &[Storage], to: usize, msg: &Msg, now: u64, erasures: bool) {
    let s = &replicas[to].memory;
    match msg {
        Msg::Delta(d) => match s.apply_delta(d, now) {
            Ok(_) => {}
            Err(e) if erasures && e.kind() == "subject_erased" => {}
            Err(e) => panic!("apply {d:?} on {to}: {e}"),
        },
        Msg::Destroyed(set) => {
            s.merge_destroyed(set, now).expect("merge destroyed");
        }
    }
}

/// Three replicas with skewed wall clocks run `ops`; every change goes to the other two as a
/// message, delivered in a random order with duplicates. Without erasures that alone converges;
/// with erasures one anti-entropy round must converge (a replica that learned of an erasure first
/// refuses the erased value and learns its tombstone from a peer).
fn run(ops: Vec<Op>, seed: u64, erasures: bool) -> Vec<Storage> {
    let replicas: Vec<Storage> = ["n0", "n1", "n2"].into_iter().map(replica).collect();
    let skew = [0u64, 5, 13];
    let mut pending: Vec<(usize, Msg)> = Vec::new();
    let mut delivered: Vec<(usize, Msg)> = Vec::new();
    let mut rng = seed | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let send = |pending: &mut Vec<(usize, Msg)>, from: usize, msg: Msg| {
        for to in (0..3).filter(|&t| t != from) {
            pending.push((to, msg.clone()));
        }
    };
    for (step, op) in ops.into_iter().enumerate() {
        let now = |at: usize| T0 + 10 * step as u64 + skew[at];
        match op {
            Op::Put {
                at,
                ns,
                key,
                value,
                ttl_ms,
                subject,
            } => {
                let subject = subject.map(|s| SUBJECTS[usize::from(s)]);
                let r = replicas[at].memory.put_with_delta(
                    NAMESPACES[usize::from(ns)],
                    &format!("k{key}"),
                    req(&value.to_string(), subject, ttl_ms),
                    now(at),
                );
                match r {
                    Ok((item, delta)) => {
                        assert_eq!(item.version, delta.version);
                        send(&mut pending, at, Msg::Delta(delta));
                    }
                    Err(e) if e.kind() == "subject_erased" => {}
                    Err(e) => panic!("put: {e}"),
                }
            }
            Op::Delete { at, ns, key } => {
                let d = replicas[at]
                    .memory
                    .delete_with_delta(NAMESPACES[usize::from(ns)], &format!("k{key}"), now(at))
                    .expect("delete");
                if let Some(d) = d {
                    assert!(d.is_tombstone());
                    send(&mut pending, at, Msg::Delta(d));
                }
            }
            Op::Erase { at, subject } => {
                let name = SUBJECTS[usize::from(subject)];
                replicas[at]
                    .memory
                    .erase_subject(name, now(at))
                    .expect("erase");
                send(&mut pending, at, Msg::Destroyed(vec![name.to_string()]));
            }
            Op::Deliver(pick) => {
                if !pending.is_empty() {
                    let (to, msg) = pending.swap_remove(pick % pending.len());
                    deliver(&replicas, to, &msg, now(to), erasures);
                    delivered.push((to, msg));
                }
            }
        }
    }
    // The rest, and every message once more, in a random order.
    let mut rest: Vec<(usize, Msg)> = pending.into_iter().chain(delivered).collect();
    for i in (1..rest.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        rest.swap(i, j);
    }
    let end = T0 + 100_000;
    for (to, msg) in &rest {
        deliver(&replicas, *to, msg, end, erasures);
    }
    if erasures {
        for (a, b) in [(0, 1), (1, 2), (0, 2)] {
            anti_entropy(&replicas[a], &replicas[b], end);
        }
    }
    replicas
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Writes, TTL writes and deletes on three replicas, their deltas delivered in any order with
    /// duplicates: the replicas converge, and anti-entropy then finds nothing to send.
    #[test]
    fn deltas_in_any_order_converge(ops in proptest::collection::vec(op(false), 1..40), seed in any::<u64>()) {
        let replicas = run(ops, seed, false);
        assert_converged(&replicas);
        for (a, b) in [(0, 1), (1, 2), (0, 2)] {
            prop_assert_eq!(anti_entropy(&replicas[a], &replicas[b], T0 + 200_000), 0);
        }
    }

    /// The same with erasures: after one anti-entropy round the replicas converge, every replica
    /// has destroyed every erased subject, and no replica holds a readable value of one.
    #[test]
    fn with_erasures_anti_entropy_converges(ops in proptest::collection::vec(op(true), 1..40), seed in any::<u64>()) {
        let replicas = run(ops, seed, true);
        assert_converged(&replicas);
        let destroyed = replicas[0].memory.destroyed_subjects().expect("destroyed");
        for s in &replicas {
            for ns in NAMESPACES {
                for key in 0..4 {
                    let key = format!("k{key}");
                    if let Some(d) = s.memory.delta(ns, &key).expect("delta") {
                        let subject = d.value.and_then(|v| v.subject);
                        prop_assert!(subject.is_none_or(|x| !destroyed.contains(&x)));
                    }
                    match s.memory.get(ns, &key, T0) {
                        Ok(Some(item)) => prop_assert!(item.subject.is_none_or(|x| !destroyed.contains(&x))),
                        Ok(None) => {}
                        Err(e) => prop_assert_eq!(e.kind(), "subject_erased"),
                    }
                }
            }
        }
        // Collecting every tombstone everywhere keeps them converged.
        for s in &replicas {
            s.memory.gc_tombstones(u64::MAX).expect("gc");
        }
        assert_converged(&replicas);
        for s in &replicas {
            for ns in s.memory.namespaces().expect("ns") {
                for (key, _) in summaries(s, &ns, &all_buckets()) {
                    prop_assert!(!s.memory.delta(&ns, &key).expect("delta").expect("some").is_tombstone());
                }
            }
        }
    }
}

#[test]
fn anti_entropy_alone_makes_diverged_replicas_identical() {
    let engines: [Arc<dyn Engine>; 2] = [Arc::new(MemEngine::new()), Arc::new(MemEngine::new())];
    let dir = tempfile::tempdir().expect("tempdir");
    let sled: Arc<dyn Engine> = Arc::new(SledEngine::open(&dir.path().join("db")).expect("sled"));
    // Once on memory engines, once with one replica on sled.
    for (ea, eb) in [
        (engines[0].clone(), engines[1].clone()),
        (Arc::new(MemEngine::new()) as Arc<dyn Engine>, sled),
    ] {
        let a = replica_with("a", MemoryLimits::default(), ea);
        let b = replica_with("b", MemoryLimits::default(), eb);
        for i in 0..300u64 {
            let key = format!("k{i}");
            // Shared history for most keys, then a few diverging writes and deletes.
            let (_, d) = a
                .memory
                .put_with_delta("ns", &key, req(&i.to_string(), None, None), T0 + i)
                .expect("put");
            b.memory.apply_delta(&d, T0 + i).expect("apply");
        }
        for i in 0..10u64 {
            a.memory
                .put(
                    "ns",
                    &format!("k{i}"),
                    req("\"a\"", Some("carol"), Some(60_000)),
                    T0 + 1_000,
                )
                .expect("put");
            b.memory
                .delete("ns", &format!("k{}", 100 + i), T0 + 1_000)
                .expect("delete");
            b.memory
                .put("other", &format!("x{i}"), req("1", None, None), T0 + 1_000)
                .expect("put");
        }
        let before = a.memory.digest("ns").expect("digest");
        let differing = before.differing_buckets(&b.memory.digest("ns").expect("digest"));
        assert!(
            !differing.is_empty() && differing.len() <= 20,
            "{}",
            differing.len()
        );
        // Only the 20 changed keys of `ns` and the 10 of `other` travel.
        let sent = anti_entropy(&a, &b, T0 + 2_000);
        assert_eq!(
            sent,
            2 * 20 + 10,
            "both sides send each differing key; `other` is one-sided"
        );
        assert_converged(&[a.clone(), b.clone()]);
        assert_eq!(anti_entropy(&a, &b, T0 + 3_000), 0);
        assert_eq!(
            b.memory
                .get("ns", "k3", T0 + 2_000)
                .expect("get")
                .expect("some")
                .value_json,
            "\"a\""
        );
        assert!(
            a.memory
                .get("ns", "k105", T0 + 2_000)
                .expect("get")
                .is_none()
        );
    }
}

#[test]
fn deleted_key_never_comes_back_when_an_older_write_arrives_late() {
    let (a, b) = (replica("a"), replica("b"));
    let (_, write) = a
        .memory
        .put_with_delta("ns", "k", req("1", None, None), T0)
        .expect("put");
    let tomb = a
        .memory
        .delete_with_delta("ns", "k", T0 + 1)
        .expect("delete")
        .expect("a tombstone");
    assert!(tomb.is_tombstone() && tomb.version > write.version);
    assert_eq!(
        a.memory
            .delete_with_delta("ns", "k", T0 + 2)
            .expect("delete"),
        None,
        "deleting a tombstone writes nothing"
    );
    a.memory
        .put("ns", "brief", req("1", None, Some(10)), T0)
        .expect("put");
    assert_eq!(
        a.memory
            .delete_with_delta("ns", "brief", T0 + 10)
            .expect("delete"),
        None,
        "deleting an expired value writes nothing"
    );
    assert!(!a.memory.delete("ns", "brief", T0 + 10).expect("delete"));
    b.memory
        .apply_delta(
            &a.memory.delta("ns", "brief").expect("delta").expect("some"),
            T0,
        )
        .expect("apply");
    assert_eq!(
        b.memory.apply_delta(&tomb, T0).expect("tomb"),
        ApplyOutcome::Applied
    );
    assert_eq!(
        b.memory.apply_delta(&write, T0).expect("late"),
        ApplyOutcome::Stale
    );
    assert!(b.memory.get("ns", "k", T0).expect("get").is_none());
    assert_eq!(b.memory.delta("ns", "k").expect("delta"), Some(tomb));
    assert_converged(&[a, b]);
}

#[test]
fn erased_subject_delta_is_refused_after_merging_the_destroyed_set() {
    let (a, b, c) = (replica("a"), replica("b"), replica("c"));
    let (_, older) = a
        .memory
        .put_with_delta("ns", "k", req("\"plain\"", None, None), T0)
        .expect("put");
    let (_, secret) = a
        .memory
        .put_with_delta("ns", "k", req("\"secret\"", Some("alice"), None), T0 + 1)
        .expect("put");
    c.memory.apply_delta(&secret, T0 + 1).expect("c had it");
    b.memory
        .apply_delta(&older, T0 + 1)
        .expect("b has the older value");
    assert!(a.memory.erase_subject("alice", T0 + 2).expect("erase"));
    assert_eq!(
        a.memory.get("ns", "k", T0 + 2).expect_err("erased").kind(),
        "subject_erased"
    );
    assert_eq!(a.memory.destroyed_subjects().expect("set"), ["alice"]);
    // The erasure reaches b before the value does: the value is refused, nothing is stored.
    assert_eq!(
        b.memory
            .merge_destroyed(&a.memory.destroyed_subjects().expect("set"), T0 + 3)
            .expect("merge"),
        1
    );
    assert_eq!(
        b.memory
            .merge_destroyed(&["alice".into()], T0 + 3)
            .expect("again"),
        0
    );
    let digest = b.memory.digest("ns").expect("digest");
    let stored = b.memory.record("ns", "k").expect("record");
    let e = b.memory.apply_delta(&secret, T0 + 3).expect_err("refused");
    assert_eq!(e.kind(), "subject_erased");
    assert_eq!(b.memory.record("ns", "k").expect("record"), stored);
    assert_eq!(b.memory.digest("ns").expect("digest"), digest);
    assert_eq!(
        b.memory
            .get("ns", "k", T0 + 3)
            .expect("get")
            .expect("older")
            .value_json,
        "\"plain\""
    );
    // A replica that has not heard of the erasure cannot push the value back to a or b either.
    let from_c = c.memory.delta("ns", "k").expect("delta").expect("some");
    assert_eq!(
        from_c.value.as_ref().and_then(|v| v.subject.as_deref()),
        Some("alice")
    );
    for s in [&a, &b] {
        assert_eq!(
            s.memory
                .apply_delta(&from_c, T0 + 3)
                .expect_err("refused")
                .kind(),
            "subject_erased"
        );
    }
    // Anti-entropy spreads the erasure and its tombstone; nobody can read the value any more.
    for (x, y) in [(&a, &b), (&a, &c), (&b, &c)] {
        anti_entropy(x, y, T0 + 4);
    }
    assert_converged(&[a.clone(), b.clone(), c.clone()]);
    assert!(b.memory.get("ns", "k", T0 + 4).expect("get").is_none());
    assert_eq!(
        c.memory.get("ns", "k", T0 + 4).expect_err("erased").kind(),
        "subject_erased"
    );
    assert!(
        a.memory
            .delta("ns", "k")
            .expect("delta")
            .expect("some")
            .is_tombstone()
    );
    // The ciphertext itself is gone from the replicas that held it.
    let rec = c.memory.record("ns", "k").expect("record").expect("some");
    assert!(rec.value.expect("shredded value").is_shredded());
}

#[test]
fn clock_skew_is_refused_and_changes_nothing() {
    let (a, b) = (replica("a"), replica("b"));
    let max = b.clock.max_skew_ms();
    let (_, mut d) = a
        .memory
        .put_with_delta("ns", "k", req("1", None, None), T0 + max + 1)
        .expect("put");
    let e = b.memory.apply_delta(&d, T0).expect_err("skew");
    assert_eq!(e.kind(), "clock_skew");
    assert_eq!(b.memory.record("ns", "k").expect("record"), None);
    assert!(b.memory.namespaces().expect("ns").is_empty());
    assert_eq!(b.memory.digest("ns").expect("digest").count, 0);
    // The refused timestamp did not move b's clock.
    let local = b
        .memory
        .put("ns", "other", req("1", None, None), T0)
        .expect("put");
    assert_eq!(local.version.hlc.wall_ms(), T0);
    // Within the skew: applied, and b's next write orders after it.
    d.version.hlc = Hlc::new(T0 + max, 0);
    assert_eq!(
        b.memory.apply_delta(&d, T0).expect("apply"),
        ApplyOutcome::Applied
    );
    let next = b
        .memory
        .put("ns", "later", req("1", None, None), T0)
        .expect("put");
    assert!(next.version.hlc > d.version.hlc);
}

#[test]
fn applying_the_same_delta_twice_is_stale_the_second_time() {
    let (a, b) = (replica("a"), replica("b"));
    let (_, d) = a
        .memory
        .put_with_delta("ns", "k", req("{\"x\":1}", Some("dave"), Some(5_000)), T0)
        .expect("put");
    assert_eq!(
        b.memory.apply_delta(&d, T0).expect("first"),
        ApplyOutcome::Applied
    );
    let stored = b.memory.record("ns", "k").expect("record");
    assert_eq!(
        b.memory.apply_delta(&d, T0).expect("second"),
        ApplyOutcome::Stale
    );
    assert_eq!(
        b.memory.record("ns", "k").expect("record"),
        stored,
        "not even resealed"
    );
    let got = b.memory.get("ns", "k", T0).expect("get").expect("some");
    assert_eq!(
        (got.value_json.as_str(), got.subject.as_deref()),
        ("{\"x\":1}", Some("dave"))
    );
    assert_eq!(got.expires_at, Some(T0 + 5_000));
    // Sealed under b's own key for dave: a's ciphertext differs, the plaintext is the same.
    assert_ne!(stored, a.memory.record("ns", "k").expect("record"));
    assert_eq!(b.memory.delta("ns", "k").expect("delta"), Some(d));
    let tomb = a
        .memory
        .delete_with_delta("ns", "k", T0 + 1)
        .expect("del")
        .expect("tomb");
    assert_eq!(
        b.memory.apply_delta(&tomb, T0).expect("first"),
        ApplyOutcome::Applied
    );
    assert_eq!(
        b.memory.apply_delta(&tomb, T0).expect("second"),
        ApplyOutcome::Stale
    );
    assert_converged(&[a, b]);
}

#[test]
fn same_version_keeps_the_longest_ttl() {
    let (a, b) = (replica("a"), replica("b"));
    let (_, d) = a
        .memory
        .put_with_delta("ns", "k", req("1", None, Some(100)), T0)
        .expect("put");
    let with = |expires_at| Delta {
        expires_at,
        ..d.clone()
    };
    assert_eq!(
        b.memory
            .apply_delta(&with(Some(T0 + 200)), T0)
            .expect("apply"),
        ApplyOutcome::Applied
    );
    assert_eq!(
        b.memory.apply_delta(&d, T0).expect("shorter"),
        ApplyOutcome::Stale
    );
    assert_eq!(
        b.memory
            .delta("ns", "k")
            .expect("delta")
            .expect("some")
            .expires_at,
        Some(T0 + 200)
    );
    assert_eq!(
        b.memory.apply_delta(&with(None), T0).expect("none"),
        ApplyOutcome::Applied
    );
    assert_eq!(
        b.memory
            .apply_delta(&with(Some(T0 + 300)), T0)
            .expect("any"),
        ApplyOutcome::Stale
    );
    assert!(
        b.memory
            .get("ns", "k", u64::MAX / 2)
            .expect("get")
            .is_some()
    );
    // a converges the same way.
    a.memory.apply_delta(&with(None), T0).expect("apply");
    assert_converged(&[a, b]);
}

#[test]
fn invalid_oversized_and_overflowing_deltas_are_refused() {
    let a = replica("a");
    let b = replica_with(
        "b",
        MemoryLimits {
            max_value_bytes: 8,
            max_namespace_entries: 2,
            ..Default::default()
        },
        Arc::new(MemEngine::new()),
    );
    let (_, d) = a
        .memory
        .put_with_delta("ns", "k", req("1", None, None), T0)
        .expect("put");
    let refused = |d: &Delta| b.memory.apply_delta(d, T0).expect_err("refused").kind();
    assert_eq!(
        refused(&Delta {
            namespace: "../x".into(),
            ..d.clone()
        }),
        "invalid_input"
    );
    assert_eq!(
        refused(&Delta {
            key: String::new(),
            ..d.clone()
        }),
        "invalid_input"
    );
    let mut bad = d.clone();
    bad.version.origin = String::new();
    assert_eq!(refused(&bad), "invalid_input");
    let mut big = d.clone();
    if let Some(v) = big.value.as_mut() {
        v.value_json = "123456789".into();
    }
    assert_eq!(refused(&big), "too_large");
    let mut subject = d.clone();
    if let Some(v) = subject.value.as_mut() {
        v.subject = Some("a b".into());
    }
    assert_eq!(refused(&subject), "invalid_input");
    assert!(b.memory.namespaces().expect("ns").is_empty());
    // Two keys fit; a third, even a tombstone, does not; the existing ones still take updates.
    for key in ["k", "j"] {
        b.memory
            .apply_delta(
                &Delta {
                    key: key.into(),
                    ..d.clone()
                },
                T0,
            )
            .expect("fits");
    }
    let digest = b.memory.digest("ns").expect("digest");
    assert_eq!(
        refused(&Delta {
            key: "x".into(),
            ..d.clone()
        }),
        "namespace_full"
    );
    assert_eq!(
        refused(&Delta {
            key: "x".into(),
            value: None,
            expires_at: None,
            ..d.clone()
        }),
        "namespace_full"
    );
    assert_eq!(b.memory.digest("ns").expect("digest"), digest);
    let tomb = a
        .memory
        .delete_with_delta("ns", "k", T0 + 1)
        .expect("del")
        .expect("tomb");
    assert_eq!(
        b.memory.apply_delta(&tomb, T0 + 1).expect("update"),
        ApplyOutcome::Applied
    );
    assert_eq!(b.memory.digest("ns").expect("digest").count, 2);
    // Collecting the tombstone frees its slot.
    assert_eq!(b.memory.gc_tombstones(T0 + 2).expect("gc"), 1);
    b.memory
        .apply_delta(
            &Delta {
                key: "x".into(),
                ..d.clone()
            },
            T0 + 2,
        )
        .expect("room again");
}

#[test]
fn gc_drops_only_tombstones_older_than_the_horizon() {
    let a = replica("a");
    // Written first, at T0: the HLC never goes back, so later writes get later versions.
    a.memory
        .put("ns", "live", req("1", None, None), T0)
        .expect("put");
    a.memory
        .put("ns", "alice", req("1", Some("alice"), None), T0)
        .expect("put");
    for (i, t) in [T0, T0 + 1_000, T0 + 2_000].into_iter().enumerate() {
        a.memory
            .put("ns", &format!("k{i}"), req("1", None, None), t)
            .expect("put");
        a.memory.delete("ns", &format!("k{i}"), t).expect("delete");
    }
    a.memory.erase_subject("alice", T0 + 5_000).expect("erase");
    assert_eq!(a.memory.digest("ns").expect("digest").count, 5);
    assert_eq!(
        a.memory.gc_tombstones(T0 + 1_000).expect("gc"),
        2,
        "k0 and the shredded value"
    );
    assert_eq!(a.memory.digest("ns").expect("digest").count, 3);
    assert_eq!(
        a.memory.digest("ns").expect("digest"),
        rebuilt_digest(&a, "ns")
    );
    assert!(a.memory.record("ns", "k0").expect("record").is_none());
    assert!(a.memory.record("ns", "k1").expect("record").is_some());
    assert!(a.memory.get("ns", "live", T0).expect("get").is_some());
    assert_eq!(a.memory.gc_tombstones(T0 + 1_000).expect("gc"), 0);
}

#[test]
fn namespaces_are_listed_once_each_in_order() {
    let a = replica("a");
    for ns in ["b", "a.b", "a", "ab", "a-b", "a:b"] {
        for key in ["x", "y", "z"] {
            a.memory
                .put(ns, key, req("1", None, None), T0)
                .expect("put");
        }
    }
    a.memory.delete("ab", "x", T0).expect("delete");
    assert_eq!(
        a.memory.namespaces().expect("ns"),
        ["a", "a-b", "a.b", "a:b", "ab", "b"]
    );
    assert_eq!(a.memory.digest("a").expect("digest").count, 3);
    assert_eq!(a.memory.digest("never").expect("digest").count, 0);
}

#[test]
fn digests_stay_exact_under_concurrent_writers() {
    let a = Arc::new(replica("a"));
    let b = Arc::new(replica("b"));
    // The digest is built before and during the writes.
    a.memory
        .put("ns", "seed", req("1", None, None), T0)
        .expect("put");
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let (a, b) = (a.clone(), b.clone());
            std::thread::spawn(move || {
                for i in 0..150u64 {
                    let key = format!("k{}", i % 40);
                    let now = T0 + i;
                    if (i + t) % 5 == 0 {
                        if let Some(d) =
                            a.memory.delete_with_delta("ns", &key, now).expect("delete")
                        {
                            b.memory.apply_delta(&d, now).expect("apply");
                        }
                    } else {
                        let (_, d) = a
                            .memory
                            .put_with_delta(
                                "ns",
                                &key,
                                req(&i.to_string(), None, Some(t * 100)),
                                now,
                            )
                            .expect("put");
                        b.memory.apply_delta(&d, now).expect("apply");
                    }
                    if i % 50 == 0 {
                        a.memory.digest("ns").expect("digest");
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("writer");
    }
    let (_, d) = a
        .memory
        .put_with_delta("ns", "seed", req("2", None, None), T0)
        .expect("put");
    b.memory.apply_delta(&d, T0).expect("apply");
    assert_eq!(
        a.memory.digest("ns").expect("digest"),
        rebuilt_digest(&a, "ns")
    );
    assert_eq!(
        b.memory.digest("ns").expect("digest"),
        rebuilt_digest(&b, "ns")
    );
    // b saw every write, in some order: the same records.
    assert_converged(&[(*a).clone(), (*b).clone()]);
}

#[test]
fn erase_during_concurrent_writes_leaves_no_readable_value() {
    let a = Arc::new(replica("a"));
    let writers: Vec<_> = (0..3u64)
        .map(|t| {
            let a = a.clone();
            std::thread::spawn(move || {
                for i in 0..200u64 {
                    let r = a.memory.put(
                        "ns",
                        &format!("k{t}-{}", i % 50),
                        req("\"secret\"", Some("erin"), None),
                        T0 + i,
                    );
                    if let Err(e) = r {
                        assert_eq!(e.kind(), "subject_erased");
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(5));
    a.memory.erase_subject("erin", T0).expect("erase");
    for w in writers {
        w.join().expect("writer");
    }
    for (key, _) in summaries(&a, "ns", &all_buckets()) {
        let rec = a.memory.record("ns", &key).expect("record").expect("some");
        assert!(
            rec.value.is_none_or(|v| v.is_shredded()),
            "{key} kept its ciphertext"
        );
        assert!(
            a.memory
                .delta("ns", &key)
                .expect("delta")
                .expect("some")
                .is_tombstone()
        );
    }
    assert_eq!(
        a.memory.digest("ns").expect("digest"),
        rebuilt_digest(&a, "ns")
    );
}

proptest! {
    /// Peers' bytes: a delta decoder never panics (the codec's own tests live in `delta.rs`).
    #[test]
    fn delta_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_delta(&bytes);
    }
}

/// An observer of a namespace hears every change of it, from a write, a delete or a peer's
/// delta, and nothing of other namespaces or of a delta that changes nothing.
#[test]
fn an_observer_hears_every_change_of_its_namespace() {
    let (a, b) = (replica("a"), replica("b"));
    type Heard = Vec<(String, Option<String>)>;
    let heard: Arc<std::sync::Mutex<Heard>> = Arc::default();
    let h = heard.clone();
    b.memory.observe(
        "tasks",
        Arc::new(move |key: &str, value: Option<&str>| {
            h.lock()
                .expect("lock")
                .push((key.to_string(), value.map(String::from)));
        }),
    );
    let (_, d1) = a
        .memory
        .put_with_delta("tasks", "k", req("1", None, None), T0)
        .expect("put");
    assert_eq!(
        b.memory.apply_delta(&d1, T0).expect("apply"),
        ApplyOutcome::Applied
    );
    // The same delta again changes nothing, and is not reported.
    assert_eq!(
        b.memory.apply_delta(&d1, T0).expect("apply"),
        ApplyOutcome::Stale
    );
    b.memory
        .put("tasks", "k", req("2", None, None), T0 + 1)
        .expect("put");
    b.memory
        .put("other", "k", req("3", None, None), T0 + 1)
        .expect("put");
    let (_, d2) = a
        .memory
        .put_with_delta("other", "j", req("4", None, None), T0 + 2)
        .expect("put");
    b.memory.apply_delta(&d2, T0 + 2).expect("apply");
    assert!(b.memory.delete("tasks", "k", T0 + 3).expect("delete"));
    let (_, d3) = a
        .memory
        .put_with_delta("tasks", "n", req("5", None, None), T0 + 4)
        .expect("put");
    b.memory.apply_delta(&d3, T0 + 4).expect("apply");
    // A peer's tombstone over a live value is heard as a delete.
    let tomb = a
        .memory
        .delete_with_delta("tasks", "n", T0 + 5)
        .expect("delete")
        .expect("a tombstone");
    b.memory.apply_delta(&tomb, T0 + 5).expect("apply");
    let got = heard.lock().expect("lock").clone();
    let want = vec![
        ("k".to_string(), Some("1".to_string())),
        ("k".to_string(), Some("2".to_string())),
        ("k".to_string(), None),
        ("n".to_string(), Some("5".to_string())),
        ("n".to_string(), None),
    ];
    assert_eq!(got, want);
}
