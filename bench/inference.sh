#!/usr/bin/env bash
# Inference benchmark, side by side in one run on the same GGUF (SmolLM2-135M-Instruct Q4_1):
#   swarm-1     our engine, one request at a time (inference.max_running = 1)
#   swarm-cb    our engine with continuous batching (max_running = 32)
#   llama-1     llama.cpp's llama-server, 1 slot
#   llama-8     llama-server, 8 slots
# at concurrency 1, 4, 16, 32; each: 2×C requests (at least 4), streamed, temperature 0,
# MAX_TOKENS output tokens (ignore_eos). ROUNDS rounds (default 3), each starting every server
# afresh and running all of them in turn, so drift of this shared machine hits them alike; the
# summary gives the median of the rounds. llama-server is built here from the llama.cpp sources
# vendored in the llama-cpp-python sdist from PyPI (needs cmake; not part of CI).
# BEFORE=<swarm binary> adds `before-cb`: that (older) build with continuous batching, run right
# after `swarm-cb` in every round, for a side-by-side of two versions of our engine.
# Usage: [ROUNDS=3] [SKIP_LLAMA=1] [BEFORE=path] bench/inference.sh [max_tokens] [concurrencies]
set -euo pipefail
cd "$(dirname "$0")/.."
max_tokens=${1:-32}
concs=${2:-"1 4 16 32"}
root=$PWD
mkdir -p target/bench
cargo build --release -q -p swarm-node
swarm=$root/target/release/swarm

# The model, through our own catalog (SHA-256 checked).
models=$root/target/bench/models
"$swarm" model pull SmolLM2-135M-Instruct --dir "$root/target/bench" >/dev/null 2>&1
gguf=$models/SmolLM2-135M-Instruct.Q4_1.gguf

# llama-server from the llama-cpp-python sdist (SKIP_LLAMA=1: our engine only).
llama=$root/target/bench/llama-server
if [ -z "${SKIP_LLAMA:-}" ] && [ ! -x "$llama" ]; then
  command -v cmake >/dev/null || { apt-get update -qq && apt-get install -y -qq cmake >/dev/null; }
  src=$root/target/bench/llama-src
  mkdir -p "$src"
  if [ ! -f "$src/llama_cpp_python-0.3.36.tar.gz" ]; then
    python3 -m pip download --quiet --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d "$src"
  fi
  echo "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e  $src/llama_cpp_python-0.3.36.tar.gz" | sha256sum -c --quiet \
    || { echo "llama-cpp-python sdist checksum mismatch" >&2; exit 1; }
  tar -xzf "$src/llama_cpp_python-0.3.36.tar.gz" -C "$src"
  cmake -S "$src/llama_cpp_python-0.3.36/vendor/llama.cpp" -B "$src/build" -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF \
    -DBUILD_SHARED_LIBS=OFF >/dev/null
  cmake --build "$src/build" --target llama-server -j "$(nproc)" >/dev/null
  cp "$src/build/bin/llama-server" "$llama"
fi

work=$(mktemp -d)
pid=""
trap '[ -n "$pid" ] && kill $pid 2>/dev/null; rm -rf "$work"' EXIT
wait_http() { for _ in $(seq 600); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 0.2; done; echo "server at $1 did not come up" >&2; return 1; }

run_swarm() { # label max_running [binary]
  local dir=$work/$1 bin=${3:-$swarm}
  "$bin" init --dir "$dir" --http-port 18280 --gossip-port 18281 >/dev/null
  sed -i "s|^models = \[\]|models = [{ name = \"SmolLM2-135M-Instruct\", path = \"$gguf\" }]\nmax_running = $2\nkv_tokens = 65536|" "$dir/node-1/node.toml"
  # Plain HTTP on loopback, as loadgen.py and llama-server speak it (init configures HTTPS).
  python3 - "$dir/node-1/node.toml" <<'PY2'
import re, sys
t = open(sys.argv[1]).read()
open(sys.argv[1], "w").write(re.sub(r"\n\[gateway\.tls\]\ncert = .*\nkey = .*\n", "\n", t))
PY2
  SWARM_LOG=warn "$bin" node --config "$dir/node-1/node.toml" >/dev/null 2>"$dir/log" &
  pid=$!
  for _ in $(seq 300); do curl -s http://127.0.0.1:18280/health | grep -q '"inference":"ready"' && break; sleep 0.2; done
  local tok; tok=$(cat "$dir/admin.token")
  for c in $concs; do python3 bench/loadgen.py http://127.0.0.1:18280 "$tok" $((c * 2 > 4 ? c * 2 : 4)) "$c" "$max_tokens" "$1" | tee -a "$results"; done
  kill $pid; wait $pid 2>/dev/null || true; pid=""
  rm -rf "$dir"
}

run_llama() { # label slots
  "$llama" -m "$gguf" --host 127.0.0.1 --port 18290 -np "$2" -c $((2048 * $2)) -t "$(nproc)" >"$work/llama-$2.log" 2>&1 &
  pid=$!
  wait_http http://127.0.0.1:18290/health
  for c in $concs; do python3 bench/loadgen.py http://127.0.0.1:18290 none $((c * 2 > 4 ? c * 2 : 4)) "$c" "$max_tokens" "$1" | tee -a "$results"; done
  kill $pid; wait $pid 2>/dev/null || true; pid=""
}

results=$work/results.jsonl
echo "# $(date -u +%FT%TZ) $(nproc) cores, max_tokens=$max_tokens, ${ROUNDS:-3} rounds"
for round in $(seq "${ROUNDS:-3}"); do
  echo "# round $round"
  run_swarm swarm-1 1
  run_swarm swarm-cb 32
  if [ -n "${BEFORE:-}" ]; then run_swarm before-cb 32 "$BEFORE"; fi
  if [ -z "${SKIP_LLAMA:-}" ]; then
    run_llama llama-1 1
    run_llama llama-8 8
  fi
done
python3 bench/summary.py "$results"
