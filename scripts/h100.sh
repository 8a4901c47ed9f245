#!/usr/bin/env bash
# Build hypura for CUDA here (no GPU, no CUDA toolkit needed), run it on the lent H100.
#
#   scripts/h100.sh pack [DEST]     on the development machine: build the CUDA `hypura` binary and
#                                   the fidelity / tiers / perplexity test binaries (CUDA cases),
#                                   strip, xz them into DEST (default: /work/main/.gpu, which
#                                   /work/main/.git/info/exclude must ignore) with this script.
#   .gpu/h100.sh run [WHAT...]      on the GPU machine, from the repository root (where the
#                                   device tool runs): unpack, then run WHAT (default: all):
#                                   tests profile bench plan70
#
# The device tool call (it copies /work/main's tree, whose tests/fixtures the tests read):
#   run(command="bash .gpu/h100.sh run", carry=[".gpu"], timeout_s=600)
# Logs land in $OUT (the last lines of each step are printed; $OUT/log has all of it).
#
# Linking: build.rs makes stub libcuda/libcublas/... when HYPURA_CUDA_STUBS=1 (see build.rs), so
# no RUSTFLAGS change and no rebuild of the CPU build's dependencies.
set -euo pipefail

pack() {
  local dest=${1:-/work/main/.gpu}
  local here; here=$(cd "$(dirname "$0")/.." && pwd)
  cd "$here"
  # shellcheck disable=SC1091
  source "${HYPURA_CUDA_ENV:-$here/../shared/cuda/env.sh}"
  export HYPURA_CUDA_STUBS=1
  # The GPU machine's CPU is not this one: build for a portable x86-64 level instead of
  # .cargo/config.toml's target-cpu=native (a native build died there with SIGILL), in a target
  # dir of its own so the CPU build's artifacts are not rebuilt.
  export RUSTFLAGS=${HYPURA_CUDA_RUSTFLAGS:--C target-cpu=x86-64-v3}
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$here/target/cuda}
  cargo build --release --features cuda --bin hypura
  local tests=${HYPURA_CUDA_TESTS:---test fidelity --test tiers --test perplexity}
  # shellcheck disable=SC2086
  cargo test --release --features cuda --no-run $tests
  mkdir -p "$dest"
  rm -f "$dest"/*.xz
  # shellcheck disable=SC2086
  cargo test --release --features cuda --no-run $tests --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] == ["test"]:
        print(m["target"]["name"], m["executable"])' |
    while read -r name exe; do
      strip -o "$dest/$name" "$exe" && xz -T2 -6 -f "$dest/$name"
    done
  strip -o "$dest/hypura" "$CARGO_TARGET_DIR/release/hypura" && xz -T2 -6 -f "$dest/hypura"
  cp scripts/h100.sh "$dest/h100.sh"
  readelf -d "$CARGO_TARGET_DIR/release/hypura" | grep NEEDED | sed 's/^/  /'
  du -ch "$dest"/* | tail -n 1
}

step() { # name command...: run, log everything to $OUT/log and $OUT/<name>.log
  local name=$1; shift
  echo "=== $name: $*" | tee -a "$OUT/log"
  local t0=$SECONDS rc=0
  "$@" >"$OUT/$name.log" 2>&1 || rc=$?
  cat "$OUT/$name.log" >>"$OUT/log"
  tail -n "${TAIL:-15}" "$OUT/$name.log"
  echo "=== $name: rc $rc, $((SECONDS - t0)) s" | tee -a "$OUT/log"
}

run() {
  : "${OUT:=/tmp/out}"; mkdir -p "$OUT"
  export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  export HYPURA_FIXTURES=$PWD/tests/fixtures RUST_BACKTRACE=1
  local bin=/tmp/hypura-bin; mkdir -p $bin
  for f in .gpu/*.xz; do xz -dc "$f" >"$bin/$(basename "$f" .xz)"; chmod +x "$bin/$(basename "$f" .xz)"; done
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv | tee -a "$OUT/log"
  local what=("$@"); [ ${#what[@]} -eq 0 ] && what=(tests profile bench)
  for w in "${what[@]}"; do
    case $w in
      tests)
        for t in fidelity tiers perplexity; do
          step "test-$t" "$bin/$t" cuda --test-threads=1 --nocapture
        done ;;
      profile)
        step profile "$bin/hypura" profile --dir /tmp --reprofile
        "$bin/hypura" profile --dir /tmp --json >"$OUT/profile.json" ;;
      bench)
        step synth8b "$bin/hypura" synth --preset llama-3-8b --type Q4_K_M -o /tmp/m8.gguf
        step plan8b "$bin/hypura" plan -m /tmp/m8.gguf -c 512
        "$bin/hypura" plan -m /tmp/m8.gguf -c 512 --json >"$OUT/plan8b.json"
        step bench8b "$bin/hypura" bench -m /tmp/m8.gguf -p 512 -n 128 -r 3 --json
        python3 - "$OUT" <<'EOF' | tee -a "$OUT/log"
import json, sys
out = sys.argv[1]
prof = json.load(open(f"{out}/profile.json"))
plan = json.load(open(f"{out}/plan8b.json"))
bench = [json.loads(l) for l in open(f"{out}/bench8b.log") if l.startswith("{")][-1]
bw = prof["device"]["device_read_bps"]
per_tok = plan["bytes_per_token"]["device"]
bound = bw / per_tok
tg = bench["tg_tok_s"]
print(f"8B Q4_K_M: {per_tok/2**30:.3f} GiB weights per token; device copy bw {bw/1e9:.0f} GB/s "
      f"-> bound {bound:.1f} tok/s; measured tg {tg:.1f} ± {bench['tg_tok_s_std']:.1f} tok/s "
      f"= {tg/bound:.2f} x bound; pp512 {bench['pp_tok_s']:.0f} tok/s")
EOF
        ;;
      plan70)
        step synth70b "$bin/hypura" synth --preset llama-3-70b --type Q4_K_M -o /tmp/m70.gguf
        step plan70b "$bin/hypura" plan -m /tmp/m70.gguf -c 512 --device-budget 22GiB --ram-budget 8GiB
        TAIL=30 step run70b "$bin/hypura" run -m /tmp/m70.gguf -c 512 --device-budget 22GiB --ram-budget 8GiB \
          -p "Hello" -n 4 --stats ;;
      *) echo "unknown step $w" >&2; return 2 ;;
    esac
  done
}

cmd=${1:-}; shift || true
case $cmd in
  pack) pack "$@" ;;
  run) run "$@" ;;
  *) sed -n '2,17p' "$0"; exit 2 ;;
esac
