#!/usr/bin/env bash
# A model larger than RAM, for real: llama.cpp (default mmap) and hypura under the same memory cap,
# a child memory cgroup (v1) whose limit counts page cache. Prints tok/s for both, hypura's bytes
# streamed per token, the direct-I/O bandwidth it saw, and the I/O bound = bandwidth / bytes.
#
#   sudo benches/capped.sh MODEL.gguf CAP [N_TOKENS]        e.g. benches/capped.sh medium-llama-Q8_0.gguf 400M 16
#
# Env: LLAMA_COMPLETION (default $ORACLE_HOME/llama-tools/bin/llama-completion), HYPURA
#      (target/release/hypura), THREADS (2), CTX (128), TIMEOUT (seconds per run, 300),
#      HYPURA_ARGS (extra arguments for hypura run), WARMUP (1: run hypura once before the measured
#      run, so an MoE model's co-activation statistics are learned; the table shows both runs),
#      SKIP_LLAMA (1: hypura only, for sweeps of hypura's own options).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=$1; CAP=$2; N=${3:-16}
ORACLE_HOME=${ORACLE_HOME:-$HOME/.cache/oracle}
LLAMA=${LLAMA_COMPLETION:-$ORACLE_HOME/llama-tools/bin/llama-completion}
HYPURA=${HYPURA:-target/release/hypura}
THREADS=${THREADS:-2}; CTX=${CTX:-128}; TIMEOUT=${TIMEOUT:-300}; WARMUP=${WARMUP:-0}
read -r -a EXTRA <<< "${HYPURA_ARGS:-}"
bytes() { python3 -c "import sys;s=sys.argv[1].upper();m={'K':1<<10,'M':1<<20,'G':1<<30};print(int(float(s[:-1])*m[s[-1]]) if s[-1] in m else int(s))" "$1"; }
LIMIT=$(bytes "$CAP")
REL=$(grep -E '^[0-9]+:memory:' /proc/self/cgroup | cut -d: -f3)
[ -n "$REL" ] || { echo "needs cgroup v1 with a memory controller"; exit 2; }
drop_cache() { python3 -c "import os,sys;fd=os.open(sys.argv[1],os.O_RDONLY);os.posix_fadvise(fd,0,0,os.POSIX_FADV_DONTNEED)" "$MODEL"; }
# capped NAME CMD...: runs CMD in a fresh child cgroup; prints "exit peak_bytes oom_kills seconds".
capped() {
  local cg=/sys/fs/cgroup/memory$REL/hypura-bench-$$-$1; shift
  mkdir "$cg"; echo "$LIMIT" > "$cg/memory.limit_in_bytes"
  drop_cache
  local t0=$(date +%s.%N) rc=0
  timeout "$TIMEOUT" bash -c 'echo $$ > "$0/cgroup.procs" && exec "$@"' "$cg" "$@" > "$OUT/$name.out" 2> "$OUT/$name.err" || rc=$?
  local t1=$(date +%s.%N)
  echo "$rc $(cat $cg/memory.max_usage_in_bytes) $(grep '^oom_kill ' $cg/memory.oom_control | awk '{print $2}') $(python3 -c "print(round($t1-$t0,2))")"
  rmdir "$cg" 2>/dev/null || true
}
OUT=$(mktemp -d)
echo "model $(basename "$MODEL") ($(du -h "$MODEL" | cut -f1)), cap $CAP, $N tokens, ctx $CTX, $THREADS threads"
if [ "${SKIP_LLAMA:-0}" = 1 ]; then
  l_rc=-; l_peak=0; l_oom=-; l_s=-; : > "$OUT/llama.err"
else
  name=llama; read -r l_rc l_peak l_oom l_s < <(capped llama "$LLAMA" -m "$MODEL" -p "Once upon a time" -n "$N" -c "$CTX" -t "$THREADS" --temp 0 -no-cnv --no-warmup)
fi
l_tps=$(grep -oE 'eval time.*\( *[0-9.]+ ms per token, +[0-9.]+ tokens per second' "$OUT/llama.err" | tail -1 | grep -oE '[0-9.]+ tokens per second' | cut -d' ' -f1 || true)
HYP=("$HYPURA" run -m "$MODEL" -p "Once upon a time" -n "$N" -c "$CTX" -t "$THREADS" --temp 0 --stats "${EXTRA[@]}")
tps() { grep -oE 'generated [0-9]+ tokens in [0-9.]+ s \([0-9.]+ tok/s' "$OUT/$1.err" | grep -oE '\([0-9.]+' | tr -d '(' || true; }
if [ "$WARMUP" = 1 ]; then
  name=hypura-cold; read -r c_rc c_peak c_oom c_s < <(capped hypura-cold "${HYP[@]}")
  c_tps=$(tps hypura-cold)
fi
name=hypura; read -r h_rc h_peak h_oom h_s < <(capped hypura "${HYP[@]}")
h_tps=$(tps hypura)
echo
echo "| engine | exit | peak RAM | OOM kills | wall s | decode tok/s |"
echo "| --- | ---: | ---: | ---: | ---: | ---: |"
echo "| llama.cpp (mmap) | $l_rc | $((l_peak >> 20)) MiB | $l_oom | $l_s | ${l_tps:-n/a} |"
[ "$WARMUP" = 1 ] && echo "| hypura (first run: learns) | $c_rc | $((c_peak >> 20)) MiB | $c_oom | $c_s | ${c_tps:-n/a} |"
echo "| hypura | $h_rc | $((h_peak >> 20)) MiB | $h_oom | $h_s | ${h_tps:-n/a} |"
echo
[ "$WARMUP" = 1 ] && { echo "first run:"; grep -E "^hypura: expert cache" "$OUT/hypura-cold.err" || true; echo "measured run:"; }
grep -E "^hypura: mode|^hypura stats|^hypura: expert cache" "$OUT/hypura.err" || tail -5 "$OUT/hypura.err"
# MoE: the I/O bound at the profile's direct-I/O bandwidth and the bytes the expert cache read.
mib=$(grep -oE 'expert cache: .* ([0-9.]+) MiB read per token' "$OUT/hypura.err" | grep -oE '[0-9.]+ MiB read per token' | cut -d' ' -f1 || true)
if [ -n "$mib" ]; then
  bw=$("$HYPURA" profile -m "$MODEL" --json 2>/dev/null | python3 -c "import json,sys;print(json.load(sys.stdin)['disk_read_bps'])")
  python3 -c "b=$bw;m=$mib*2**20;print(f'expert I/O: {m/2**20:.1f} MiB per token at {b/1e9:.2f} GB/s (direct I/O, profile) -> I/O bound {b/m:.2f} tok/s' + (f'; hypura at {float(\"$h_tps\")/(b/m):.2f}x the bound' if '$h_tps' else ''))"
fi
if [ -n "${l_tps:-}" ] && [ -n "${h_tps:-}" ]; then
  python3 -c "print(f'hypura / llama.cpp decode: {float(\"$h_tps\")/float(\"$l_tps\"):.2f}x')"
fi
echo "(outputs in $OUT)"
