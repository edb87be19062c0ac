//! The deterministic simulation (`swarm_chaos::sim`) under `cargo test`: a batch of seeds that
//! must all keep every invariant, the replay of a seed, and deliberate bugs the checks must
//! catch (so that a clean batch means something). More seeds: `swarm-chaos sim --seeds N`.

use std::ops::Range;

use swarm_chaos::Error;
use swarm_chaos::sim::{Sabotage, SimOptions, run_seed};

/// Seeds in each half of the batch (two tests, so that two cores share it). A seed takes about
/// a second in a debug build.
const HALF: u64 = 20;

/// The failures among `seeds`, one line each.
fn failures(seeds: Range<u64>, opts: &SimOptions) -> Vec<String> {
    seeds
        .filter_map(|seed| run_seed(seed, opts).err())
        .map(|e| e.to_string())
        .collect()
}

fn assert_clean(seeds: Range<u64>) {
    let n = seeds.end - seeds.start;
    let failed = failures(seeds, &SimOptions::default());
    assert!(
        failed.is_empty(),
        "{} of {n} seeds broke an invariant:\n{}",
        failed.len(),
        failed.join("\n")
    );
}

#[test]
fn the_first_half_of_the_batch_keeps_every_invariant() {
    assert_clean(0..HALF);
}

#[test]
fn the_second_half_of_the_batch_keeps_every_invariant() {
    assert_clean(HALF..2 * HALF);
}

#[test]
fn a_seed_replays_exactly() {
    let opts = SimOptions::default();
    let mut traces = Vec::new();
    for seed in [3, 12] {
        let first = run_seed(seed, &opts).expect("a clean seed");
        let again = run_seed(seed, &opts).expect("a clean seed");
        assert_eq!(first, again, "seed {seed} ran differently the second time");
        assert!(first.faults > 0 && first.writes_acked > 0 && first.tasks_completed > 0);
        traces.push(first.trace);
    }
    assert_ne!(traces[0], traces[1], "two seeds ran the same way");
}

/// The message of the failure `opts` makes of `seed`.
fn failure(seed: u64, opts: &SimOptions) -> String {
    match run_seed(seed, opts) {
        Err(e @ Error::Sim(_)) => e.to_string(),
        Err(e) => panic!("seed {seed} failed outside the checks: {e}"),
        Ok(o) => panic!("seed {seed} passed although sabotaged: {o:?}"),
    }
}

#[test]
fn a_replica_that_loses_an_acknowledged_write_is_caught() {
    let opts = SimOptions {
        sabotage: Some(Sabotage::LoseAckedWrite),
        ..SimOptions::default()
    };
    let msg = failure(5, &opts);
    assert!(msg.contains("seed 5: "), "{msg}");
    assert!(msg.contains("acked write lost"), "{msg}");
    assert!(
        msg.contains("replay: swarm-chaos sim --seeds 1 --first-seed 5"),
        "{msg}"
    );
}

#[test]
fn tasks_adopted_from_live_owners_are_caught() {
    let opts = SimOptions {
        sabotage: Some(Sabotage::AdoptFromLiveOwners),
        ..SimOptions::default()
    };
    let msg = failure(6, &opts);
    assert!(msg.contains("seed 6: "), "{msg}");
    assert!(msg.contains("ran twice"), "{msg}");
}

#[test]
fn a_cluster_outside_three_to_seven_nodes_is_refused() {
    let opts = SimOptions {
        nodes: 9,
        ..SimOptions::default()
    };
    assert!(matches!(run_seed(1, &opts), Err(Error::Scenario { .. })));
}

/// Run the batch's seeds with `sabotage` until one fails: it must fail a check on work done
/// twice.
fn assert_caught_running_twice(sabotage: Sabotage, what: &str) {
    let opts = SimOptions {
        sabotage: Some(sabotage),
        ..SimOptions::default()
    };
    let caught = (0..4 * HALF).find_map(|seed| run_seed(seed, &opts).err());
    match caught {
        Some(e @ Error::Sim(_)) => assert!(e.to_string().contains("twice"), "{e}"),
        Some(e) => panic!("failed outside the checks: {e}"),
        None => panic!("no seed of the batch caught {what}"),
    }
}

/// The task service's old ways (orphans looked for before catching up, deduplication only in
/// the dispatcher) ran tasks twice outside any partition; a batch of seeds must show it.
#[test]
fn the_task_services_old_orphan_scan_is_caught() {
    // It stops at the first seed that catches it (41 today).
    assert_caught_running_twice(Sabotage::EarlyOrphanScan, "the old task shell");
}

/// The old submission fallback (a node whose owner does not answer takes the task itself) ran
/// one objective twice when two nodes could not reach its owner; a batch of seeds must show it.
#[test]
fn the_old_submission_fallback_is_caught() {
    assert_caught_running_twice(Sabotage::FallbackHere, "the old fallback");
}
