#!/usr/bin/env bash
# Expert-streaming under a real memory cap: a Mixtral-shaped synthetic MoE (8 experts, top-2)
# about 3× larger than the cap, with plain random routers (nearly uniform routing) and with
# skewed, layer-correlated synthetic routing. For each: llama.cpp (default mmap) and hypura under
# the same cgroup cap (benches/capped.sh), hypura run twice (the first run learns co-activation
# statistics, the second is measured): tok/s, expert-cache hit rate, prefetch precision/recall,
# bytes read per token, and the I/O bound they imply at the profile's direct-I/O bandwidth.
#
#   benches/moe_capped.sh [CAP] [N_TOKENS]          default: 1200M 32
#
# Env: DIR (where the models are written, default ~/.cache/hypura-bench), SKEW (1.5), CORR (0.8),
#      LAYERS (16), DIM (2048), FF (7168), plus capped.sh's (THREADS, CTX, TIMEOUT, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
CAP=${1:-1200M}; N=${2:-32}
DIR=${DIR:-$HOME/.cache/hypura-bench}; mkdir -p "$DIR"
SKEW=${SKEW:-1.5}; CORR=${CORR:-0.8}; LAYERS=${LAYERS:-16}; DIM=${DIM:-2048}; FF=${FF:-7168}
HYPURA=${HYPURA:-target/release/hypura}
shape=(--preset mixtral-8x7b --layers "$LAYERS" --dim "$DIM" --ff "$FF" --heads 16 --kv-heads 4 --type Q4_K_M)
for routing in uniform skewed; do
  m="$DIR/moe-${LAYERS}x${DIM}x${FF}-$routing-Q4_K_M.gguf"
  args=()
  [ "$routing" = skewed ] && { args=(--router-skew "$SKEW" --router-corr "$CORR"); m="${m%.gguf}-s$SKEW-c$CORR.gguf"; }
  [ -f "$m" ] || "$HYPURA" synth "${shape[@]}" "${args[@]}" -o "$m"
  # Start without what earlier runs learned about this file.
  rm -f "${XDG_CACHE_HOME:-$HOME/.cache}/hypura/experts/$(basename "${m%.gguf}")"-*.json
  echo "=== $routing routing ==="
  WARMUP=1 TIMEOUT=${TIMEOUT:-900} bash benches/capped.sh "$m" "$CAP" "$N"
  echo
done
