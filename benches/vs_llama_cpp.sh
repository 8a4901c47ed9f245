#!/usr/bin/env bash
# hypura vs llama.cpp on the same GGUF files: `hypura bench` and `llama-bench`, same thread count,
# interleaved (hypura, llama.cpp, hypura, ...) so that machine noise hits both alike.
#
#   benches/vs_llama_cpp.sh MODEL.gguf [MODEL2.gguf ...]
#
# Env: LLAMA_BENCH (default $ORACLE_HOME/llama-tools/bin/llama-bench, ORACLE_HOME=~/.cache/oracle),
#      HYPURA (default target/release/hypura), THREADS (2), PP (128), TG (64), REPS (3).
# Prints a markdown table of tok/s (median over REPS runs of each tool) and the ratios, with the
# targets of the engine milestone: decode >= 1.0x llama.cpp, prompt >= 0.8x.
set -euo pipefail
cd "$(dirname "$0")/.."
ORACLE_HOME=${ORACLE_HOME:-$HOME/.cache/oracle}
LLAMA_BENCH=${LLAMA_BENCH:-$ORACLE_HOME/llama-tools/bin/llama-bench}
HYPURA=${HYPURA:-target/release/hypura}
THREADS=${THREADS:-2}; PP=${PP:-128}; TG=${TG:-64}; REPS=${REPS:-3}
[ $# -ge 1 ] || { sed -n '2,10p' "$0"; exit 2; }
[ -x "$LLAMA_BENCH" ] || { echo "llama-bench not found at $LLAMA_BENCH (see benches/README.md)"; exit 2; }
[ -x "$HYPURA" ] || cargo build --release --quiet
out=$(mktemp -d)
for model in "$@"; do
  name=$(basename "$model")
  for r in $(seq "$REPS"); do
    "$HYPURA" bench -m "$model" -p "$PP" -n "$TG" -t "$THREADS" -r 1 --json 2>/dev/null >> "$out/$name.hypura.jsonl"
    "$LLAMA_BENCH" -m "$model" -p "$PP" -n "$TG" -t "$THREADS" -r 1 -o json 2>/dev/null > "$out/$name.llama.$r.json"
  done
done
python3 benches/summarize.py "$out" "$PP" "$TG" "$THREADS" "$@"
