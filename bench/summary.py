"""Median of the rounds of bench/inference.sh per server and concurrency, as a Markdown table,
and the two ratios the inference issue sets targets for (at concurrency 16).
Usage: summary.py RESULTS.jsonl"""
import json
import statistics
import sys

rows = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]
fields = ["out_tok_s", "req_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms"]
runs = {}
for r in rows:
    runs.setdefault((r["label"], r["concurrency"]), []).append(r)
med = {k: {f: statistics.median(x[f] for x in v) for f in fields} | {"rounds": len(v)}
       for k, v in runs.items()}
print("| server | C | out tok/s | req/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | rounds |")
print("|---|---|---|---|---|---|---|")
for (label, c), m in med.items():
    print(f"| {label} | {c} | {m['out_tok_s']:.1f} | {m['req_s']:.2f} | {m['ttft_p50_ms']:.0f} / "
          f"{m['ttft_p99_ms']:.0f} | {m['itl_p50_ms']:.1f} / {m['itl_p99_ms']:.1f} | {m['rounds']} |")
tput = {k: m["out_tok_s"] for k, m in med.items()}
if ("swarm-cb", 16) in tput and ("swarm-1", 16) in tput:
    print(f"\nbatching / one at a time at 16: {tput[('swarm-cb', 16)] / tput[('swarm-1', 16)]:.2f}x (target 4x)")
llama = [tput[(l, 16)] for l in ("llama-1", "llama-8") if (l, 16) in tput]
if ("swarm-cb", 16) in tput and llama:
    print(f"batching / best llama-server at 16: {tput[('swarm-cb', 16)] / max(llama):.2f}x (target 1x)")
if ("swarm-cb", 16) in tput and ("before-cb", 16) in tput:
    print(f"this build / BEFORE at 16: {tput[('swarm-cb', 16)] / tput[('before-cb', 16)]:.2f}x")
