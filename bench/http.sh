#!/usr/bin/env bash
# Gateway benchmark: memory PUT/GET through the gateway with wrk (a second process) for builds
# side by side in one run: `secure` (JWT auth + audit, the product, plain HTTP on loopback),
# `https` (the same binary and node serving HTTPS, as `swarm init` configures it), `noaudit`
# (auth only) and `noauth` (neither; bench-only build flags), and with BEFORE=<commit> also
# `before`: that commit's product build, for a side-by-side with an older version. All nodes run
# at once and the runs interleave (secure, https, noaudit, noauth, before, secure, ...) for
# ROUNDS rounds; the medians are reported, since load on this shared machine drifts.
# Usage: [BEFORE=<commit>] bench/http.sh [seconds-per-run] [rounds]   (needs wrk: apt-get install -y wrk)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}
rounds=${2:-3}
command -v wrk >/dev/null || { echo "wrk missing: apt-get install -y wrk" >&2; exit 1; }

mkdir -p target/bench
for v in noauth noaudit; do
  cargo build --release -q -p swarm-node --features "bench-$v"
  cp target/release/swarm "target/bench/swarm-$v"
done
cargo build --release -q -p swarm-node
cp target/release/swarm target/bench/swarm-secure
cp target/release/swarm target/bench/swarm-https
variants="secure https noaudit noauth"
if [ -n "${BEFORE:-}" ]; then
  # The older commit builds (once per commit) in a worktree with a target folder of its own:
  # cargo names a workspace crate's artifacts the same from any checkout path, so sharing the
  # folder would mix the two versions.
  before=$(git rev-parse --short "$BEFORE")
  if [ ! -x "target/bench/swarm-before-$before" ]; then
    wt=$(mktemp -d)
    git worktree add -q --detach "$wt" "$BEFORE"
    (cd "$wt" && CARGO_TARGET_DIR="$OLDPWD/target/bench-before" cargo build --release -q -p swarm-node)
    cp target/bench-before/release/swarm "target/bench/swarm-before-$before"
    git worktree remove --force "$wt"
  fi
  cp "target/bench/swarm-before-$before" target/bench/swarm-before
  variants="$variants before"
fi

work=$(mktemp -d)
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; rm -rf "$work"' EXIT
declare -A port token url
p=18180
for v in $variants; do
  bin=target/bench/swarm-$v
  dir="$work/$v"
  "$bin" init --dir "$dir" --http-port "$p" --gossip-port $((p + 1000)) >/dev/null
  # 64 connections: lift the memory bulkhead above them so the bench measures work, not shedding;
  # and the per-source limits, since wrk is one source sending thousands of requests a second.
  python3 - "$dir/swarm-config.json" "$dir/node-1/node.toml" "$v" <<'PY'
import json, re, sys
p, toml, v = sys.argv[1:]
c = json.load(open(p))
c["performance"]["concurrency_limits"]["memory_ops"] = 256
json.dump(c, open(p, "w"))
t = open(toml).read()
if v != "https":
    # Plain HTTP on loopback (what the baseline measured); `https` keeps init's certificate.
    t = re.sub(r"\n\[gateway\.tls\]\ncert = .*\nkey = .*\n", "\n", t)
if "max_connections_per_source" in t:
    t = t.replace("max_connections_per_source = 64", "max_connections_per_source = 1024")
    t += "\n[limits]\nrequests_per_second_per_source = 1000000\nburst_per_source = 1000000\n"
open(toml, "w").write(t)
PY
  scheme=http
  grep -q '^\[gateway.tls\]' "$dir/node-1/node.toml" && scheme=https
  url[$v]="$scheme://127.0.0.1:$p"
  SWARM_LOG=warn "$bin" node --config "$dir/node-1/node.toml" >/dev/null 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do curl -sf --cacert "$dir/ca.pem" "${url[$v]}/health" >/dev/null && break; sleep 0.1; done
  token[$v]=$("$bin" token --dir "$dir" --subject bench --role user)
  for i in $(seq 0 999); do
    curl -sf --cacert "$dir/ca.pem" -X PUT -H "Authorization: Bearer ${token[$v]}" "${url[$v]}/v1/memory/seed/k$i" \
      -d '{"value":{"seeded":true}}' >/dev/null
  done
  port[$v]=$p
  p=$((p + 100))
done

results="$work/results"
for r in $(seq "$rounds"); do
  for v in $variants; do
    for t in "PUT 64 put" "GET 64 get" "PUT 20 put"; do
      set -- $t
      line=$(TOKEN=${token[$v]} wrk -t2 -c"$2" -d"${secs}s" -s "bench/$3.lua" "${url[$v]}" | grep RESULT)
      echo "$v $1 c$2 $line" | tee -a "$results" >&2
    done
  done
done

echo
echo "medians of $rounds rounds, wrk -t2, ${secs}s per run, $(nproc) cores"
echo "| build | route | conns | req/s | p50 ms | p99 ms |"
echo "|---|---|---|---|---|---|"
python3 - "$results" <<'PY'
import re, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    v, route, conns, _, *kv = line.split()
    d = dict(x.split("=") for x in kv)
    rows.setdefault((v, route, conns), []).append(d)
med = {}
for key, ds in rows.items():
    m = {k: statistics.median(float(d[k]) for d in ds) for k in ("rps", "p50_ms", "p99_ms")}
    med[key] = m
    print(f"| {key[0]} | {key[1]} | {key[2]} | {m['rps']:.0f} | {m['p50_ms']:.2f} | {m['p99_ms']:.2f} |")
print()
for route, conns in (("PUT", "c64"), ("GET", "c64"), ("PUT", "c20")):
    s, a, n = (med[(v, route, conns)]["rps"] for v in ("secure", "noaudit", "noauth"))
    line = f"{route} {conns}: auth+audit cost {100 * (1 - s / n):.1f}%, auth alone {100 * (1 - a / n):.1f}%"
    h = med[("https", route, conns)]["rps"]
    line += f"; HTTPS cost {100 * (1 - h / s):.1f}%"
    if ("before", route, conns) in med:
        b = med[("before", route, conns)]["rps"]
        line += f"; secure vs before {100 * (s / b - 1):+.1f}%"
    print(line)
PY
