"""Load generator for OpenAI-compatible servers (stdlib only): N streamed chat completions at
concurrency C, fixed synthetic prompts, temperature 0, a fixed number of output tokens
(ignore_eos). Prints one JSON line: output tokens/s, requests/s, time to first token and
inter-token latency p50/p99.
Usage: loadgen.py URL TOKEN N C MAX_TOKENS LABEL"""
import json
import statistics
import sys
import threading
import time
import urllib.request

url, token, n, conc, max_tokens, label = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]

# Fixed synthetic prompts: the same list on every server; a list of its own per concurrency, so
# no run finds prompts of an earlier run in a server's prompt cache (the shared opening, as a
# system prompt would be, is in every prompt).
TOPICS = ["a robot", "the sea", "a lighthouse", "bees", "a library", "the moon", "rain", "a clock"]
PROMPTS = [f"Write a short story about {TOPICS[i % len(TOPICS)]}, number {conc * 1000 + i}."
           for i in range(n)]

results, lock, nxt = [], threading.Lock(), [0]


def worker():
    while True:
        with lock:
            if nxt[0] >= n:
                return
            i = nxt[0]
            nxt[0] += 1
        body = json.dumps({"model": "SmolLM2-135M-Instruct",
                           "messages": [{"role": "user", "content": PROMPTS[i]}],
                           "max_tokens": max_tokens, "temperature": 0, "stream": True,
                           "ignore_eos": True}).encode()
        req = urllib.request.Request(url + "/v1/chat/completions", data=body, headers={
            "Content-Type": "application/json", "Authorization": "Bearer " + token})
        t0, times = time.perf_counter(), []
        with urllib.request.urlopen(req, timeout=600) as r:
            for line in r:
                line = line.decode().strip()
                if not line.startswith("data:"):
                    continue
                d = line[5:].strip()
                if d == "[DONE]":
                    break
                ch = json.loads(d)
                if ch.get("choices") and ch["choices"][0].get("delta", {}).get("content"):
                    times.append(time.perf_counter())
        with lock:
            results.append((t0, times))


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))] if xs else float("nan")


start = time.perf_counter()
threads = [threading.Thread(target=worker) for _ in range(conc)]
for t in threads:
    t.start()
for t in threads:
    t.join()
wall = time.perf_counter() - start
# Text chunks approximate tokens (servers may merge a token that completes no text).
tokens = sum(len(t) for _, t in results)
ttft = [t[0] - t0 for t0, t in results if t]
itl = [b - a for _, t in results for a, b in zip(t, t[1:])]
print(json.dumps({"label": label, "concurrency": conc, "requests": len(results), "wall_s": round(wall, 2),
                  "out_tok_s": round(tokens / wall, 1), "req_s": round(len(results) / wall, 3),
                  "ttft_p50_ms": round(pct(ttft, 50) * 1000), "ttft_p99_ms": round(pct(ttft, 99) * 1000),
                  "itl_p50_ms": round(pct(itl, 50) * 1000, 1), "itl_p99_ms": round(pct(itl, 99) * 1000, 1)}),
      flush=True)
