#!/usr/bin/env bash
# Does llama.cpp load what `hypura optimize` writes, and give the same answers as for the original?
#
# For each MoE fixture: hypura learns routing statistics (a short run with the experts streamed
# through the expert cache, `--place '_exps\.=nvme'`), `hypura optimize` rewrites the file with
# them (and checks hypura's own logits, bit for bit), then the oracle's reference.py runs the SAME
# llama.cpp build on the original and on the rewritten file, and the answers are compared: prompt
# logits (one batch), decode logits (KV-cache path), greedy ids, the text prompt's greedy ids,
# and llama-perplexity's result.
#
#   ORACLE_HOME=~/.cache/oracle scripts/check_optimize_llama_cpp.sh [OUT_DIR]
#
# Needs the oracle's venv and tools ($ORACLE_HOME/venv, $ORACLE_HOME/llama-tools/bin: see
# tests/fixtures/README.md) and a release build of hypura (HYPURA=path overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
OH=${ORACLE_HOME:-$HOME/.cache/oracle}
HYPURA=${HYPURA:-target/release/hypura}
OUT=${1:-/tmp/hypura-optimize-check}
PY="$OH/venv/bin/python"
[ -x "$PY" ] && [ -d "$OH/llama-tools/bin" ] || { echo "no oracle in $OH (venv/, llama-tools/bin/)"; exit 1; }
[ -x "$HYPURA" ] || { echo "build hypura first: cargo build --release"; exit 1; }
mkdir -p "$OUT"
export XDG_CACHE_HOME="$OUT/cache" HF_HUB_OFFLINE=1
TEXT=$(pwd)/tests/fixtures/text.txt
for f in tests/fixtures/tiny-moe-spm/tiny-moe-spm-F32.gguf tests/fixtures/small-moe/small-moe-*.gguf; do
  name=$(basename "$f" .gguf)
  d="$OUT/$name"
  mkdir -p "$d"
  cp "$f" "$d/orig.gguf"
  echo "== $name"
  "$HYPURA" run -m "$d/orig.gguf" --place '_exps\.=nvme' -c 256 -n 96 --temp 0 \
      -p "Once upon a time, there was a little fox who lived in the forest." > /dev/null 2> "$d/learn.log"
  "$HYPURA" optimize -m "$d/orig.gguf" -o "$d/opt.gguf" --place '_exps\.=nvme' -c 256 --check 16 \
      2> "$d/optimize.log" | tee "$d/optimize.out"
  for m in orig opt; do
    "$PY" "$OH/reference.py" "$d/$m.gguf" --tools "$OH/llama-tools/bin" --tok-cache "$OH/tok_cache" \
        --ppl-text "$TEXT" --ppl-ctx 128 > "$d/$m.reference.log" 2>&1 \
      || { tail -n 20 "$d/$m.reference.log"; echo "reference.py failed on $m"; exit 1; }
  done
  "$PY" - "$d" <<'EOF'
import json, sys
import numpy as np
d = sys.argv[1]
r = {m: json.load(open(f"{d}/{m}.ref.json")) for m in ("orig", "opt")}
for what in ("logits", "decode_logits"):
    a, b = (np.load(f"{d}/{m}.ref.{what}.npy") for m in ("orig", "opt"))
    print(f"  llama.cpp {what} {list(a.shape)}: max |diff| {float(np.abs(a - b).max()):.3g}, "
          f"bit-identical {bool(np.array_equal(a.view(np.uint32), b.view(np.uint32)))}")
same = lambda f: f(r["orig"]) == f(r["opt"])
print("  greedy ids equal:", same(lambda x: x["fixed_prompt"]["greedy_ids"]),
      "| text-prompt greedy equal:", same(lambda x: x["text_prompt"]["greedy_ids"]))
p = [r[m]["perplexity"] for m in ("orig", "opt")]
print(f"  llama-perplexity: {p[0]['ppl']} vs {p[1]['ppl']} ({p[0]['final_line'].strip()!r} / {p[1]['final_line'].strip()!r})")
EOF
done
