#!/usr/bin/env bash
# Expert reads per token before and after `hypura optimize`, on a synthetic skewed MoE.
#
#   benches/optimize_moe.sh [DIR]                  # writes ~0.5 GB models to DIR (default /tmp/hypura-optimize-bench)
#   BASE=/path/to/old/hypura benches/optimize_moe.sh   # also the hypura before merged expert reads
#
# 1. `hypura synth` writes a Mixtral-shaped model (8 layers, d 1024, ff 3584, 8 experts top-2,
#    Q4_K_M, Zipf 1.5 popularity, layer correlation 0.8);
# 2. one run with its experts streamed learns the co-activation statistics (text A);
# 3. `hypura optimize` rewrites it (default 'pairs' order) and a second copy with 'popularity';
# 4. each file (and the original with BASE, the binary before this change) reads text B under
#    each RAM budget with `--stats`: one token per forward pass (`-b 1 -n 1`: decode-like
#    routing, and the same token sequence for every binary whatever its logits), and as one
#    prompt batch; from a cold predictor (--no-learn; LEARN="cold warm" adds runs from the
#    learned statistics, restored before every run).
# Reads, bytes and hit rates do not depend on the machine's speed; tok/s does (shared cores).
set -euo pipefail
cd "$(dirname "$0")/.."
HYPURA=${HYPURA:-$(pwd)/target/release/hypura}
DIR=${1:-/tmp/hypura-optimize-bench}
BUDGETS=${BUDGETS:-"350MiB 400MiB"}
mkdir -p "$DIR"
export XDG_CACHE_HOME="$DIR/cache" HF_HUB_OFFLINE=1
M="$DIR/moe.gguf"
A=$(tail -c +3000 tests/fixtures/text.txt | head -c 700)
B=$(head -c 700 tests/fixtures/text.txt)
[ -f "$M" ] || "$HYPURA" synth --preset mixtral-8x7b --layers 8 --dim 1024 --ff 3584 \
    --router-skew 1.5 --router-corr 0.8 -o "$M"
rm -rf "$XDG_CACHE_HOME/hypura/experts"
"$HYPURA" run -m "$M" --ram-budget 400MiB -c 512 -b 1 -n 1 --temp 0 -p "$A" > /dev/null 2> "$DIR/learn.log"
# The default order ('pairs', checked under the 400MiB plan) and 'popularity'.
"$HYPURA" optimize -m "$M" -o "$DIR/moe-opt.gguf" --ram-budget 400MiB -c 512 --check 16 | tee "$DIR/optimize.out"
"$HYPURA" optimize -m "$M" -o "$DIR/moe-pop.gguf" --order popularity --ram-budget 400MiB -c 512 --check 0 | grep expected
cp -r "$XDG_CACHE_HOME/hypura/experts" "$DIR/learned"
printf '| file | binary | budget | passes | predictor | hit rate | misses | prefetches | MiB / token | reads / token | tok/s |\n'
printf '| --- | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |\n'
for budget in $BUDGETS; do
  for kind in ${KINDS:-decode prompt}; do
  for learn in ${LEARN:-cold}; do
    for run in "base moe.gguf" "new moe.gguf" "new moe-pop.gguf" "new moe-opt.gguf"; do
      set -- $run
      bin=$HYPURA
      if [ "$1" = base ]; then
        [ -n "${BASE:-}" ] || continue
        bin=$BASE
      fi
      rm -rf "$XDG_CACHE_HOME/hypura/experts" && cp -r "$DIR/learned" "$XDG_CACHE_HOME/hypura/experts"
      extra=""
      [ "$learn" = cold ] && extra="--no-learn"
      # decode: one token per forward pass; prompt: the text as one batch.
      batch=1
      [ "$kind" = prompt ] && batch=512
      log="$DIR/run-$1-$2-$budget-$kind-$learn.log"
      "$bin" run -m "$DIR/$2" --ram-budget "$budget" -c 512 -b $batch -n 1 --temp 0 -p "$B" --stats $extra \
          > /dev/null 2> "$log"
      hit=$(grep -o 'hit rate [0-9.]* %' "$log" | head -1 | grep -o '[0-9.]* %')
      miss=$(grep -o '[0-9]* misses' "$log" | grep -o '[0-9]*')
      pf=$(grep -o 'prefetch [0-9]* issued' "$log" | grep -o '[0-9]*')
      mib=$(grep -o '[0-9.]* MiB read per token (' "$log" | grep -o '^[0-9.]*')
      reads=$(grep -o 'in [0-9.]* reads per token' "$log" | grep -o '[0-9.]*' || true)
      if [ -z "$reads" ]; then
        # The binary before merged reads prints no read count: it reads 3 slices per expert.
        tokens=$(grep -o 'prompt [0-9]* tokens' "$log" | grep -o '[0-9]*')
        gen=$(grep -o 'generated [0-9]* tokens' "$log" | grep -o '[0-9]*')
        reads=$(python3 -c "print(f'{3*($miss+$pf)/($tokens+$gen-1):.2f} (3 per expert)')")
      fi
      tps=$(grep -o '([0-9.]* tok/s)' "$log" | tr -d '()' | sed 's/ tok\/s//' | head -1)
      printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$2" "$1" "$budget" "$kind" "$learn" "$hit" "$miss" "$pf" "$mib" "$reads" "$tps"
    done
  done
  done
done
