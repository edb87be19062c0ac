#!/usr/bin/env bash
# The chaos suite's figures: every scenario of chaos/scenarios (the smoke one aside) at each
# node count of NODES (default "3 5"), SEEDS seeds each (default 5, seeds 1..SEEDS), with release
# builds (FIRST_SEED moves the first seed, to add seeds to an earlier run); then one table of
# what BENCHMARKS.md reports, over every run folder there. Root for the network faults.
# Each run's folder (report.json, history.jsonl, timeline.svg, the nodes' logs) stays under
# target/chaos-figures/. Usage: [NODES="3 5"] [SEEDS=5] [FIRST_SEED=1] [SCENARIOS="kill-restart pause"] bench/chaos.sh
set -uo pipefail
cd "$(dirname "$0")/.."
nodes=${NODES:-3 5}
seeds=${SEEDS:-5}
first=${FIRST_SEED:-1}
scenarios=${SCENARIOS:-kill-restart partition-heal flaky-network pause rolling-restart}
cargo build --release -q -p swarm-node -p swarm-chaos || exit 1
out=target/chaos-figures
mkdir -p "$out"
# Seed by seed, so that a run cut short still has every scenario and size for its first seeds.
for seed in $(seq "$first" $((first + seeds - 1))); do
  for s in $scenarios; do
    for n in $nodes; do
      dir=$out/$s-$n-$seed
      target/release/swarm-chaos run --scenario "chaos/scenarios/$s.toml" --nodes "$n" \
        --seed "$seed" --out "$dir" >"$dir.log" 2>&1
      echo "$s nodes=$n seed=$seed exit=$? $(grep -E '^(PASSED|FAILED)' "$dir.log")"
    done
  done
done
python3 - "$out" $scenarios <<'PY'
import json, os, sys
out, scenarios = sys.argv[1], sys.argv[2:]
print("| scenario | nodes | runs passed | ops acked | lost | tasks completed / lost / stages twice | superseded fenced | converge after heal s (max) | gateway success (min) | false deaths |")
print("|---|---|---|---|---|---|---|---|---|---|")
for s in scenarios:
    for n in (3, 5):
        rs = []
        for f in sorted(os.listdir(out)):
            p = os.path.join(out, f, "report.json")
            if f.startswith(f"{s}-{n}-") and os.path.exists(p):
                rs.append(json.load(open(p)))
        if not rs:
            continue
        conv = [max(r["membership_converged_s"] or 1e9, r["replicas_converged_s"] or 1e9) for r in rs]
        print(f"| {s} | {n} | {sum(r['ok'] for r in rs)}/{len(rs)} | {sum(r['acknowledged'] for r in rs)} | "
              f"{sum(r['lost'] for r in rs)} | {sum(r['tasks_completed'] for r in rs)} / {sum(r['tasks_lost'] for r in rs)} / "
              f"{sum(r['stages_recorded_twice'] for r in rs)} | {sum(r['superseded_results_fenced'] for r in rs)} | "
              f"{max(conv):.1f} | {min(r['gateway_success'] for r in rs)*100:.2f}% | {sum(r['false_member_deaths'] for r in rs)} |")
PY
