//! One chaos run: start the cluster, drive the workload, apply the seeded faults, heal, wait,
//! check, report.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::Error;
use crate::check::{self, Check, Recording, Replica, RestartRead, TaskEnd};
use crate::cluster::{Client, Cluster};
use crate::history::{Op, OpKind, Version};
use crate::nemesis::{self, Nemesis};
use crate::report::{self, Report};
use crate::scenario::{FaultKind, Planned, Scenario};
use crate::workload::{self, NAMESPACE, Shared};

/// What `swarm-chaos run` was asked.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub scenario: PathBuf,
    pub seed: u64,
    pub out: PathBuf,
    pub swarm: Option<PathBuf>,
    /// Overrides the scenario's node count.
    pub nodes: Option<u32>,
    /// Run without root by setting aside the faults that need it (else refused).
    pub skip_root_faults: bool,
}

/// Load and check everything a run needs before any process starts.
pub fn prepare(opts: &RunOptions) -> Result<(Scenario, Vec<String>), Error> {
    let mut s = Scenario::load(&opts.scenario)?;
    if let Some(n) = opts.nodes {
        s.nodes = n;
    }
    s.validate()?;
    let mut skipped = Vec::new();
    if s.needs_root() && !nemesis::is_root() {
        if !opts.skip_root_faults {
            let i = s
                .faults
                .iter()
                .position(|f| f.kind.needs_root())
                .unwrap_or(0);
            return Err(Error::scenario(
                format!("faults[{i}].kind"),
                "this fault needs root (iptables rules); run as root, or pass --skip-root-faults",
            ));
        }
        for kind in s.without_root_faults() {
            skipped.push(format!(
                "{} (needs root for iptables; not root)",
                kind.name()
            ));
        }
    }
    Ok((s, skipped))
}

/// Run a scenario to its report. The report says whether the checks passed.
pub fn run(opts: &RunOptions, scenario: Scenario, skipped: Vec<String>) -> Result<Report, Error> {
    let swarm = crate::cluster::find_swarm(opts.swarm.as_deref())?;
    std::fs::create_dir_all(&opts.out)
        .map_err(|e| Error::io(format!("create {}", opts.out.display()), e))?;
    let cluster_dir = opts.out.join("cluster");
    if cluster_dir.exists() {
        std::fs::remove_dir_all(&cluster_dir)
            .map_err(|e| Error::io(format!("clear {}", cluster_dir.display()), e))?;
    }
    let plan = scenario.schedule(opts.seed);
    let n = scenario.nodes;
    let mut cluster = Cluster::init(&swarm, &cluster_dir, &scenario)?;
    let mut nemesis = Nemesis::new(
        n,
        scenario.http_port,
        plan.iter().any(|f| f.kind.needs_root()),
    )?;
    for k in 1..=n {
        cluster.start(k)?;
    }
    let clients: Vec<Client> = (1..=n)
        .map(|k| cluster.client(k).with_timeout(Duration::from_secs(3)))
        .collect();
    if wait_membership(
        &clients,
        &(1..=n).collect::<Vec<_>>(),
        Duration::from_secs(30),
    )
    .is_none()
    {
        return Err(Error::Cluster(
            "the nodes did not all see each other alive within 30 s".into(),
        ));
    }
    wait_models(&clients, Duration::from_secs(30))?;
    eprintln!(
        "swarm-chaos: {n} nodes up in {}; workload and faults for {:?}",
        cluster.dir.display(),
        scenario.end()
    );

    let shared = Arc::new(Shared::new(n));
    for k in 1..=n {
        shared.set_up(k, true);
    }
    let threads: Vec<_> = (0..scenario.workload.clients)
        .map(|me| {
            let (sh, cl, w) = (shared.clone(), clients.clone(), scenario.workload.clone());
            let seed = opts.seed;
            std::thread::spawn(move || workload::client_loop(sh, cl, w, seed, me))
        })
        .collect();
    let monitor = {
        let (sh, cl) = (shared.clone(), clients.clone());
        std::thread::spawn(move || monitor_members(&sh, &cl))
    };

    // The timeline: each fault applied at its start and undone at its end.
    let mut steps: Vec<(Duration, bool, usize)> = Vec::new();
    for (i, f) in plan.iter().enumerate() {
        steps.push((f.start, true, i));
        steps.push((f.end, false, i));
    }
    steps.sort_by_key(|&(t, apply, _)| (t, apply));
    let mut active: Vec<usize> = Vec::new();
    let mut restart_reads = Vec::new();
    let mut fault_errors = Vec::new();
    for (at, apply, i) in steps {
        sleep_until(&shared, at);
        let f = &plan[i];
        let result = if apply {
            active.push(i);
            eprintln!(
                "swarm-chaos: {:>6.1} s  {} {:?}",
                at.as_secs_f64(),
                f.kind.name(),
                f.nodes
            );
            if f.kind.silences() {
                shared.set_up(f.nodes[0], false);
            }
            if f.kind.is_partition() {
                shared.partitioned.store(true, Ordering::SeqCst);
            }
            nemesis.apply(&mut cluster, f)
        } else {
            active.retain(|&j| j != i);
            eprintln!(
                "swarm-chaos: {:>6.1} s  end of {} {:?}",
                at.as_secs_f64(),
                f.kind.name(),
                f.nodes
            );
            let r = undo(&mut nemesis, &mut cluster, &plan, &active, f);
            if f.kind.silences() {
                shared.set_up(f.nodes[0], true);
                if matches!(
                    f.kind,
                    FaultKind::Kill | FaultKind::Leave | FaultKind::RollingRestart
                ) && r.is_ok()
                {
                    let quiet = !active.iter().any(|&j| plan[j].kind.is_partition());
                    if quiet {
                        restart_reads.extend(first_reads(
                            &shared,
                            &clients,
                            f.nodes[0],
                            scenario.workload.keys,
                        ));
                    }
                }
            }
            if !active.iter().any(|&j| plan[j].kind.is_partition()) {
                shared.partitioned.store(false, Ordering::SeqCst);
            }
            r
        };
        if let Err(e) = result {
            eprintln!("swarm-chaos: fault step failed: {e}");
            fault_errors.push(format!("{} at {:?}: {e}", f.kind.name(), at));
        }
    }
    sleep_until(&shared, scenario.end());

    // Heal: no rule left, every node running and resumed.
    nemesis.heal_all(&cluster);
    for k in 1..=n {
        let _ = cluster.pause(k, false);
        if !cluster.is_running(k)
            && let Err(e) = cluster.start(k)
        {
            fault_errors.push(format!("restart node-{k} at the heal: {e}"));
        }
        shared.set_up(k, true);
    }
    shared.partitioned.store(false, Ordering::SeqCst);
    let healed = Instant::now();
    let heal_ms = shared.now_ms();
    eprintln!(
        "swarm-chaos: {:>6.1} s  healed; stopping the workload and checking",
        heal_ms as f64 / 1000.0
    );
    shared.stop.store(true, Ordering::SeqCst);
    for t in threads {
        let _ = t.join();
    }
    let false_deaths = monitor
        .join()
        .map(|obs| count_false_deaths(&obs, &plan))
        .unwrap_or(0);
    let ops = shared.history.snapshot();

    let all: Vec<u32> = (1..=n).collect();
    let bound = scenario.converge_within.0;
    let membership_s =
        wait_membership(&clients, &all, bound).map(|_| healed.elapsed().as_secs_f64());
    let (replicas, replicas_s) = wait_replicas(&clients, bound, healed);

    let erased: BTreeSet<String> = ops
        .iter()
        .filter(|o| o.kind == OpKind::Erase && o.acked())
        .map(|o| o.key.clone())
        .collect();
    let mut checks = Vec::new();
    checks.push(Check::new(
        "faults_applied",
        format!("{} faults applied and undone", plan.len()),
        fault_errors,
    ));
    checks.push(Check::new(
        "membership_converged",
        match membership_s {
            Some(s) => format!("every node saw every other alive {s:.1} s after the heal"),
            None => format!("not within {bound:?} of the heal"),
        },
        if membership_s.is_some() {
            vec![]
        } else {
            vec![membership_view(&clients)]
        },
    ));
    let lost_check = match &replicas {
        Some(r) => check::no_acked_write_lost(&ops, r, &erased),
        None => Check::failed(
            "no_acked_write_lost",
            "the nodes' replicas could not be listed".into(),
        ),
    };
    let lost = lost_check.violations.len() as u64;
    checks.push(lost_check);
    checks.push(match (&replicas, replicas_s) {
        (Some(r), Some(_)) => check::replicas_identical(r),
        (Some(r), None) => {
            let mut c = check::replicas_identical(r);
            c.summary = format!("not identical within {bound:?} of the heal: {}", c.summary);
            c.ok = false;
            c
        }
        (None, _) => Check::failed(
            "replicas_identical",
            "the nodes' replicas could not be listed".into(),
        ),
    });
    checks.push(check::nothing_erased_readable(&erased_reads(
        &clients, &ops, &erased,
    )));
    checks.push(check::no_stale_read_after_restart(&ops, &restart_reads));
    let ends = task_ends(&clients, &ops, scenario.tasks_within.0, &shared);
    let (tasks_lost, twice, dup, fenced, superseded) = check::tasks(&ops, &ends, &plan);
    let tasks_lost_n = tasks_lost.violations.len() as u64;
    let twice_n = twice.violations.len() as u64;
    let completed = ends.values().filter(|t| t.status == "completed").count() as u64;
    checks.extend([tasks_lost, twice, dup]);
    let (success, share) = check::gateway_success(&ops, &plan, scenario.min_gateway_success);
    checks.push(success);
    checks.push(audit_chains(&clients));
    if false_deaths > 0 {
        checks.push(Check::new(
            "no_false_member_death",
            format!("{false_deaths} nodes seen down with no fault to explain it"),
            vec![format!(
                "{false_deaths} false deaths (see the monitor in report.json)"
            )],
        ));
    }
    let ok = checks.iter().all(|c| c.ok);
    let accepted = ops
        .iter()
        .filter(|o| o.kind == OpKind::Task && o.acked() && !o.deduplicated)
        .count() as u64;
    let report = Report {
        scenario: scenario.name.clone(),
        seed: opts.seed,
        nodes: n,
        skipped_faults: skipped,
        faults: plan,
        duration_s: heal_ms as f64 / 1000.0,
        operations: ops.len() as u64,
        acknowledged: ops.iter().filter(|o| o.acked()).count() as u64,
        by_kind: report::by_kind(&ops),
        lost,
        tasks_accepted: accepted,
        tasks_completed: completed,
        tasks_lost: tasks_lost_n,
        stages_recorded_twice: twice_n,
        twins_in_partition: fenced,
        superseded_results_fenced: superseded as u64,
        membership_converged_s: membership_s,
        replicas_converged_s: replicas_s,
        gateway_success: share,
        false_member_deaths: false_deaths,
        checks,
        ok,
    };
    report.write(&opts.out, &ops)?;
    cluster.stop_all();
    drop(nemesis);
    Ok(report)
}

/// Undo `f`; for a network fault, put back the other network faults still on (one flush
/// removes them all).
fn undo(
    nemesis: &mut Nemesis,
    cluster: &mut Cluster,
    plan: &[Planned],
    active: &[usize],
    f: &Planned,
) -> Result<(), Error> {
    nemesis.undo(cluster, f)?;
    if f.kind.needs_root() {
        for &j in active {
            if plan[j].kind.needs_root() {
                nemesis.apply(cluster, &plan[j])?;
            }
        }
    }
    Ok(())
}

fn sleep_until(shared: &Shared, at: Duration) {
    let now = shared.started.elapsed();
    if at > now {
        std::thread::sleep(at - now);
    }
}

/// Wait until every node of `nodes` sees every other alive; how long it took.
fn wait_membership(clients: &[Client], nodes: &[u32], within: Duration) -> Option<Duration> {
    let start = Instant::now();
    loop {
        let all = nodes.iter().all(|&k| {
            let seen = member_states(&clients[(k - 1) as usize]);
            nodes
                .iter()
                .all(|j| seen.get(&format!("node-{j}")).is_some_and(|s| s == "alive"))
        });
        if all {
            return Some(start.elapsed());
        }
        if start.elapsed() > within {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every node answers a chat completion of the tiny model (it loads at start): chat calls that
/// all fail would test nothing of inference.
fn wait_models(clients: &[Client], within: Duration) -> Result<(), Error> {
    let start = Instant::now();
    let body = serde_json::json!({
        "model": "tiny",
        "messages": [{"role": "user", "content": "ready?"}],
        "max_tokens": 1,
    });
    for (i, c) in clients.iter().enumerate() {
        loop {
            let r = c.call("POST", "/v1/chat/completions", Some(&body));
            if r.status() == Some(200) {
                break;
            }
            if start.elapsed() >= within {
                return Err(Error::Cluster(format!(
                    "node-{} served no chat completion of the tiny model within {within:?}: {} {}",
                    i + 1,
                    r.status()
                        .map_or("no answer".to_string(), |s| s.to_string()),
                    r.code()
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Ok(())
}

fn member_states(c: &Client) -> BTreeMap<String, String> {
    match c.get("/v1/cluster/members") {
        Ok((200, v)) => v["members"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|m| {
                        (
                            m["name"].as_str().unwrap_or_default().to_string(),
                            m["state"].as_str().unwrap_or_default().to_string(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default(),
        _ => BTreeMap::new(),
    }
}

fn membership_view(clients: &[Client]) -> String {
    clients
        .iter()
        .enumerate()
        .map(|(i, c)| format!("node-{} sees {:?}", i + 1, member_states(c)))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Each node's replica of the run's namespace (every page).
fn replica(c: &Client) -> Option<Replica> {
    let mut out = Replica::new();
    let mut after: Option<String> = None;
    for _ in 0..10_000 {
        let path = match &after {
            Some(a) => format!("/v1/memory/{NAMESPACE}?limit=500&after={a}"),
            None => format!("/v1/memory/{NAMESPACE}?limit=500"),
        };
        let (status, v) = c.get(&path).ok()?;
        if status != 200 {
            return None;
        }
        for item in v["items"].as_array()? {
            if let (Some(k), Some(ver)) = (item["key"].as_str(), Version::of(item)) {
                out.insert(k.to_string(), ver);
            }
        }
        match v["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => return Some(out),
        }
    }
    None
}

/// Poll the replicas until they are identical or `within` has passed since the heal.
fn wait_replicas(
    clients: &[Client],
    within: Duration,
    healed: Instant,
) -> (Option<BTreeMap<u32, Replica>>, Option<f64>) {
    let mut last = None;
    loop {
        let reps: Option<BTreeMap<u32, Replica>> = clients
            .iter()
            .enumerate()
            .map(|(i, c)| replica(c).map(|r| (i as u32 + 1, r)))
            .collect();
        if let Some(r) = &reps {
            let mut it = r.values();
            let first = it.next();
            if it.all(|x| Some(x) == first) {
                return (reps, Some(healed.elapsed().as_secs_f64()));
            }
        }
        if reps.is_some() {
            last = reps;
        }
        if healed.elapsed() > within {
            return (last, None);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The first reads of a node just restarted: every plain key, at once.
fn first_reads(shared: &Shared, clients: &[Client], k: u32, keys: u32) -> Vec<RestartRead> {
    let serving_ms = shared.now_ms();
    let c = &clients[(k - 1) as usize];
    (0..keys)
        .map(|i| {
            let key = format!("k{i}");
            let r = c.call("GET", &format!("/v1/memory/{NAMESPACE}/{key}"), None);
            RestartRead {
                node: k,
                serving_ms,
                key,
                seen: Version::of(r.body()),
                status: r.status(),
            }
        })
        .collect()
}

/// Every key ever written under an erased subject, read on every node.
fn erased_reads(
    clients: &[Client],
    ops: &[Op],
    erased: &BTreeSet<String>,
) -> Vec<(u32, String, Option<u16>, Option<String>)> {
    let keys: BTreeSet<&str> = ops
        .iter()
        .filter(|o| {
            o.kind == OpKind::SubjectWrite && erased.contains(&check::subject_key_owner(&o.key))
        })
        .map(|o| o.key.as_str())
        .collect();
    let mut out = Vec::new();
    for (i, c) in clients.iter().enumerate() {
        for key in &keys {
            let r = c.call("GET", &format!("/v1/memory/{NAMESPACE}/{key}"), None);
            out.push((
                i as u32 + 1,
                key.to_string(),
                r.status(),
                r.body()["value"].as_str().map(str::to_string),
            ));
        }
    }
    out
}

/// Wait for the accepted tasks to end (at most `within`), then read each one; its stages are
/// counted from every node's audit log (`tasks.record`), so a stage recorded twice shows even
/// where the second write replaced the first.
fn task_ends(
    clients: &[Client],
    ops: &[Op],
    within: Duration,
    shared: &Shared,
) -> BTreeMap<String, TaskEnd> {
    let ids: Vec<(&str, &str)> = ops
        .iter()
        .filter(|o| o.kind == OpKind::Task && o.acked())
        .filter_map(|o| o.task.as_deref().map(|t| (t, o.key.as_str())))
        .collect();
    let start = Instant::now();
    let mut ends: BTreeMap<String, TaskEnd> = BTreeMap::new();
    let finished = |s: &str| matches!(s, "completed" | "failed" | "cancelled" | "dead_letter");
    // The run's clock against the nodes' wall clock (the same machine).
    let wall_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let offset = wall_now.saturating_sub(shared.now_ms());
    loop {
        for (i, (id, objective)) in ids.iter().enumerate() {
            if ends.get(*id).is_some_and(|t| finished(&t.status)) {
                continue;
            }
            let c = &clients[i % clients.len()];
            if let Ok((200, v)) = c.get(&format!("/v1/tasks/{id}")) {
                let ms = |field: &str| v[field].as_u64().map(|t| t.saturating_sub(offset));
                ends.insert(
                    id.to_string(),
                    TaskEnd {
                        task: id.to_string(),
                        objective: objective.to_string(),
                        status: v["status"].as_str().unwrap_or_default().to_string(),
                        stages: BTreeMap::new(),
                        final_epochs: BTreeMap::new(),
                        stages_total: v["stages_total"].as_u64().unwrap_or(0) as u32,
                        created_ms: ms("created_at").unwrap_or(0),
                        finished_ms: ms("finished_at"),
                    },
                );
            }
        }
        let done = ids
            .iter()
            .all(|(id, _)| ends.get(*id).is_some_and(|t| finished(&t.status)));
        if done || start.elapsed() > within {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    for (task, stages) in stage_records(clients) {
        if let Some(end) = ends.get_mut(&task) {
            end.stages = stages;
        }
    }
    // The epoch of each stage's result as the cluster keeps it.
    for (i, end) in ends.values_mut().enumerate() {
        if end.stages.values().any(|r| r.len() > 1)
            && let Ok((200, r)) =
                clients[i % clients.len()].get(&format!("/v1/tasks/{}/results", end.task))
        {
            for s in r["results"].as_array().into_iter().flatten() {
                if let (Some(stage), Some(epoch)) = (s["stage"].as_str(), s["epoch"].as_u64()) {
                    end.final_epochs.insert(stage.to_string(), epoch);
                }
            }
        }
    }
    ends
}

/// Task → stage → each time a node audited recording it, over every node's audit log.
fn stage_records(clients: &[Client]) -> BTreeMap<String, BTreeMap<String, Vec<Recording>>> {
    let mut out: BTreeMap<String, BTreeMap<String, Vec<Recording>>> = BTreeMap::new();
    for c in clients {
        let mut after = 0u64;
        while let Ok((200, page)) = c.get(&format!("/v1/audit?after={after}&limit=500")) {
            let entries = page["entries"].as_array().cloned().unwrap_or_default();
            for e in &entries {
                let resource = e["resource"].as_str().unwrap_or_default();
                if e["action"] == "tasks.record"
                    && e["outcome"] == "ok"
                    && let Some((task, stage)) = resource
                        .strip_prefix("tasks/")
                        .and_then(|r| r.split_once("/stage/"))
                {
                    // The request id is `TASK@EPOCH`.
                    let epoch = e["request_id"]
                        .as_str()
                        .and_then(|r| r.rsplit_once('@'))
                        .and_then(|(_, x)| x.parse().ok())
                        .unwrap_or(0);
                    out.entry(task.to_string())
                        .or_default()
                        .entry(stage.to_string())
                        .or_default()
                        .push(Recording {
                            epoch,
                            node: e["node"].as_str().unwrap_or_default().to_string(),
                            agent: e["actor"].as_str().unwrap_or_default().to_string(),
                            ts_ms: e["ts_ms"].as_u64().unwrap_or_default(),
                        });
                }
            }
            match entries.last().and_then(|e| e["seq"].as_u64()) {
                Some(seq) if entries.len() == 500 => after = seq,
                _ => break,
            }
        }
    }
    out
}

/// Every node's audit chain verifies.
fn audit_chains(clients: &[Client]) -> Check {
    let mut bad = Vec::new();
    let mut entries = 0;
    for (i, c) in clients.iter().enumerate() {
        match c
            .with_timeout(Duration::from_secs(60))
            .get("/v1/audit/verify")
        {
            Ok((200, v)) if v["ok"] == true => entries += v["entries"].as_u64().unwrap_or(0),
            Ok((s, v)) => bad.push(format!("node-{}: {s} {v}", i + 1)),
            Err(e) => bad.push(format!("node-{}: {e}", i + 1)),
        }
    }
    Check::new(
        "audit_chains_verify",
        format!(
            "{entries} audit entries verified on {} nodes",
            clients.len()
        ),
        bad,
    )
}

/// (ms, observer, member, state) every second from every node that answers.
type Observation = (u64, u32, u32, String);

fn monitor_members(shared: &Shared, clients: &[Client]) -> Vec<Observation> {
    let mut out = Vec::new();
    let quick: Vec<Client> = clients
        .iter()
        .map(|c| c.with_timeout(Duration::from_millis(800)))
        .collect();
    while !shared.stop.load(Ordering::SeqCst) {
        for (i, c) in quick.iter().enumerate() {
            let t = shared.now_ms();
            for (name, state) in member_states(c) {
                if let Some(k) = name.strip_prefix("node-").and_then(|x| x.parse().ok())
                    && state != "alive"
                {
                    out.push((t, i as u32 + 1, k, state));
                }
            }
        }
        if out.len() > 1_000_000 {
            break;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    out
}

/// A member seen `down` with no fault, within 20 s before, to explain it: a fault of its own, or
/// a network fault. Counted once per (observer, member) and fault-free stretch.
fn count_false_deaths(obs: &[Observation], plan: &[Planned]) -> u64 {
    let explains = |t: u64, member: u32| {
        plan.iter().any(|f| {
            let (s, e) = (
                f.start.as_millis() as u64,
                f.end.as_millis() as u64 + 20_000,
            );
            s <= t
                && t <= e
                && (!f.kind.silences()
                    || f.nodes.contains(&member)
                    || f.kind == FaultKind::RollingRestart)
        })
    };
    let mut seen = BTreeSet::new();
    for (t, observer, member, state) in obs {
        if state == "down" && !explains(*t, *member) {
            seen.insert((*observer, *member, t / 30_000));
        }
    }
    seen.len() as u64
}

/// Where a run writes by default: `chaos-out/<scenario>-<seed>`.
pub fn default_out(scenario: &Path, seed: u64) -> PathBuf {
    let name = scenario
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_default();
    PathBuf::from("chaos-out").join(format!("{name}-{seed}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deaths_inside_a_fault_are_not_false() {
        let plan = vec![Planned {
            kind: FaultKind::Kill,
            nodes: vec![2],
            bridge: None,
            start: Duration::from_secs(10),
            end: Duration::from_secs(20),
            rate: 0.0,
            delay_ms: 0,
            jitter_ms: 0,
        }];
        let obs = vec![
            (15_000, 1, 2, "down".to_string()),
            (16_000, 1, 3, "down".to_string()),
            (60_000, 1, 2, "down".to_string()),
            (61_000, 1, 2, "down".to_string()),
        ];
        assert_eq!(count_false_deaths(&obs, &plan), 2);
    }
}
