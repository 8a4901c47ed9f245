#!/usr/bin/env bash
# Build hypura for CUDA here (no GPU, no CUDA toolkit needed), run it on the lent GPU (H100/H200).
#
#   scripts/gpu.sh pack [DEST]     on the development machine: build the CUDA `hypura` binary and
#                                  the fidelity / tiers / perplexity / experts test binaries (CUDA
#                                  cases), strip and xz them into DEST (default: .gpu, which
#                                  .gitignore ignores) with this script.
#   scripts/gpu.sh fixtures [DEST] pack the fixtures the GPU tests read into DEST/fixtures.txz:
#                                  the tree travels only under 64 MiB, so a subset (every
#                                  architecture, tokenizer and most quant types; no large F32 files
#                                  but small-qwen2's, which tests/tiers.rs reads). For the call,
#                                  move tests/fixtures (and models/) out of the working tree;
#                                  `run` unpacks the subset there. Restore them afterwards.
#   scripts/gpu.sh kbench [DEST]   build the kernels' micro-benchmark (kernels/cuda/bench.cu) into
#                                  DEST/kbench.xz (`pack` does this too)
#   scripts/gpu.sh lcpp [DEST]     pack llama.cpp's sources (from the oracle's llama-cpp-python
#                                  sdist, pruned to what llama-bench needs) into DEST/lcpp-src.txz
#   bash .gpu/gpu.sh run [STEP...] on the GPU machine, from the repository root (where the device
#                                  tool runs): unpack, then run each STEP (default: tests profile
#                                  bench8b):
#       tests     the CUDA cases of the fixture suites (--test-threads=1)
#       kbench    the decode kernels' micro-benchmark: µs, GB/s and error per shape and variant
#       kbenchpdl the same in chains of dependent launches, as in the step's graph (kbench pdl)
#       kbenchatt the attention kernels alone (kbench att)
#       kflash    the prompt-attention kernel (flash.cu): checked against a reference, timed at 8B shapes
#       profile   hypura profile --reprofile (GPU memory, PCIe and device bandwidth, disk)
#       lcpp      start building llama.cpp with CUDA in the background (log: $OUT/lcpp-build.log)
#       bench8b   synth llama-3-8b Q4_K_M; plan; hypura bench pp512/tg128 ×3 (BENCH8B_MODES: fused
#                 direct candle nopdl nofold nostage: the graph without dependent launches,
#                 without norms folded into the mat-vecs, with down read in place, not staged); the
#                 bound = device bandwidth / weight bytes per token; llama-bench on the same
#                 file if built
#       moe       synth mixtral-8x7b Q5_K_M with skewed routing (~31 GB); with a 22 GiB device
#                 and 8 GiB RAM budget: plan, run once (learns co-activation), then bench (tg
#                 tok/s with the expert caches' hit rates over the timed tg runs, as JSON)
#       moefull   the same Mixtral with no budgets (all on the GPU): hypura bench (MOE_NOSTAGE=1:
#                 again with the experts' down not staged; then, after `moe`,
#                 the budgeted run against its I/O and compute bounds), then llama-bench
#                 on the same file (waits up to 6 minutes for the `lcpp` build)
#       l70       synth llama-3-70b Q4_K_M (~40 GB); same budgets: plan, run with --stats
#       run8b     synth 8B: hypura run -n 256, default sampling and greedy (chained / stepped)
#       depth8b   synth 8B: hypura bench and llama-bench at depth 4096 (-d: the cache holds 4096
#                 tokens when each test starts)
#       prof8b    GPU time per kernel of one fused decode step of the 8B (and ncu's view)
#       ramc8b    the 8B under a 3 GiB device budget: RAM-tier layers uploaded vs on the host
#       clean     delete the synthetic models (the machine's disk holds one big model at a time)
#
# The device tool call (it copies the working tree, whose tests/fixtures the tests read; the
# tree must stay under 64 MiB with .gpu carried):
#   run(command="bash .gpu/gpu.sh run tests profile bench8b", carry=[".gpu"], timeout_s=600)
# Logs land in $OUT (the last lines of each step are printed; $OUT/log has all of it).
set -euo pipefail

pack() {
  local dest=${1:-.gpu}
  local here; here=$(cd "$(dirname "$0")/.." && pwd)
  cd "$here"
  mkdir -p "$dest"; dest=$(cd "$dest" && pwd)
  # shellcheck disable=SC1091
  source "${HYPURA_CUDA_ENV:-$here/../shared/cuda/env.sh}"
  export HYPURA_CUDA_STUBS=1
  # The GPU machine's CPU is not this one: build for a portable x86-64 level instead of
  # .cargo/config.toml's target-cpu=native (a native build died there with SIGILL), in a target
  # dir of its own so the CPU build's artifacts are not rebuilt.
  export RUSTFLAGS=${HYPURA_CUDA_RUSTFLAGS:--C target-cpu=x86-64-v3}
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$here/target/cuda}
  cargo build --release --features cuda --bin hypura
  local tests=${HYPURA_CUDA_TESTS:---test fidelity --test tiers --test perplexity --test experts --test fused}
  # shellcheck disable=SC2086
  cargo test --release --features cuda --no-run $tests
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
      strip -o "$dest/$name" "$exe" && xz -T2 -9 -f "$dest/$name"
    done
  strip -o "$dest/hypura" "$CARGO_TARGET_DIR/release/hypura" && xz -T2 -9 -f "$dest/hypura"
  kbench "$dest"
  cp scripts/gpu.sh "$dest/gpu.sh"
  readelf -d "$CARGO_TARGET_DIR/release/hypura" | grep NEEDED | sed 's/^/  /'
  du -ch "$dest"/* | tail -n 1
}

kbench() { # the kernels' micro-benchmark (kernels/cuda/bench.cu), static CUDA runtime
  local dest=${1:-.gpu}
  local here; here=$(cd "$(dirname "$0")/.." && pwd)
  # shellcheck disable=SC1091
  [ -n "${CUDA_ROOT:-}" ] || source "${HYPURA_CUDA_ENV:-$here/../shared/cuda/env.sh}"
  nvcc -O3 -std=c++17 -arch="sm_${CUDA_COMPUTE_CAP:-90}" -L"$CUDA_ROOT/lib" -cudart static \
    -o "$dest/kbench" "$here/kernels/cuda/bench.cu" && xz -T2 -9 -f "$dest/kbench"
  nvcc -O3 -std=c++17 -arch="sm_${CUDA_COMPUTE_CAP:-90}" -L"$CUDA_ROOT/lib" -cudart static \
    -o "$dest/kflash" "$here/kernels/cuda/bench_flash.cu" && xz -T2 -9 -f "$dest/kflash"
}

lcpp() { # pruned llama.cpp sources for a CUDA llama-bench build on the GPU machine
  local dest=${1:-.gpu}
  local src=${LLAMA_SRC:-${ORACLE_HOME:-$HOME/.cache/oracle}/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp}
  [ -d "$src" ] || { echo "no llama.cpp sources at $src (run ../shared/oracle/build_llama_cpp_python.sh)"; exit 1; }
  local t; t=$(mktemp -d); local o=$t/lcpp-src
  mkdir -p "$o/ggml/src" "$o/tools"
  cp -r "$src"/{CMakeLists.txt,cmake,common,include,src,vendor} "$o/"
  cp -r "$src"/ggml/{CMakeLists.txt,cmake,include} "$o/ggml/"
  cp "$src"/ggml/src/*.{c,cpp,h,in} "$src/ggml/src/CMakeLists.txt" "$o/ggml/src/" 2>/dev/null || true
  cp -r "$src"/ggml/src/{ggml-cpu,ggml-cuda,ggml-blas} "$o/ggml/src/"
  cp -r "$src"/tools/{llama-bench,completion} "$o/tools/"
  printf 'find_package(Threads REQUIRED)\nllama_add_compile_flags()\nadd_subdirectory(llama-bench)\nadd_subdirectory(completion)\n' \
    >"$o/tools/CMakeLists.txt"
  mkdir -p "$dest"; tar cJf "$dest/lcpp-src.txz" -C "$t" lcpp-src; rm -rf "$t"
  ls -la "$dest/lcpp-src.txz"
}

# The fixture subset the GPU run carries (see `fixtures`).
GPU_FIXTURES="text.txt tiny-llama-bpe tiny-llama-spm tiny-qwen2 tiny-moe-spm
  small-llama/small-llama-Q4_K_M small-llama/small-llama-Q8_0
  small-qwen2/small-qwen2-F32 small-qwen2/small-qwen2-Q4_K_M
  small-moe/small-moe-Q4_K_M small-moe/small-moe-Q5_K_M
  types/small-llama/small-llama-Q4_0 types/small-llama/small-llama-Q6_K
  types/small-llama/small-llama-Q2_K types/small-llama/small-llama-Q5_0"

fixtures() {
  local dest=${1:-.gpu}; mkdir -p "$dest"; dest=$(cd "$dest" && pwd)
  local here; here=$(cd "$(dirname "$0")/.." && pwd)
  cd "$here/tests/fixtures"
  local files=()
  for f in $GPU_FIXTURES; do
    if [ -e "$f" ]; then files+=("$f"); else for x in "$f".*; do files+=("$x"); done; fi
  done
  tar cJf "$dest/fixtures.txz" "${files[@]}"
  ls -la "$dest/fixtures.txz"
}

step() { # name command...: run, log everything to $OUT/log and $OUT/<name>.log
  local name=$1; shift
  echo "=== $name: $*" | tee -a "$OUT/log"
  local t0=$SECONDS rc=0
  "$@" >"$OUT/$name.log" 2>&1 || rc=$?
  cat "$OUT/$name.log" >>"$OUT/log"
  tail -n "${TAIL:-12}" "$OUT/$name.log"
  echo "=== $name: rc $rc, $((SECONDS - t0)) s" | tee -a "$OUT/log"
}

bound() { # plan.json bench.json profile.json: tok/s against device bandwidth / bytes per token
  python3 - "$@" <<'EOF'
import json, sys
plan, bench, prof = (json.load(open(p)) for p in sys.argv[1:4])
bench = bench if isinstance(bench, dict) else bench[-1]
bw = prof["device"]["device_read_bps"]
per_tok = plan["bytes_per_token"]["device"]
bound = bw / per_tok
tg = bench["tg_tok_s"]
print(f"{per_tok/2**30:.3f} GiB device weights per token; device copy bw {bw/1e9:.0f} GB/s -> "
      f"bound {bound:.1f} tok/s; hypura tg {tg:.1f} ± {bench['tg_tok_s_std']:.1f} tok/s = "
      f"{tg/bound:.2f} x bound; pp512 {bench['pp_tok_s']:.0f} tok/s")
EOF
}

moebound() { # budgeted.json all-gpu.json profile.json: the MoE run against its I/O and compute
  python3 - "$@" <<'EOF'
import json, sys
cut, full, prof = (json.load(open(p)) for p in sys.argv[1:4])
ec, dc = cut["expert_cache"], cut["gpu"]["device_expert_cache"]
n = max(ec["tokens"], 1)
disk, up = ec["stats"]["bytes_read"] / n, dc["stats"]["bytes_uploaded"] / n
disk_bps, up_bps = prof["disk_read_bps"], prof["device"]["upload_bps"]
t_io = disk / disk_bps + up / up_bps
t_c = 1 / full["tg_tok_s"]
tg = cut["tg_tok_s"]
io = 1 / t_io if t_io > 0 else float("inf")
serial, overlap = 1 / (t_c + t_io), 1 / max(t_c, t_io)
print(f"MoE under budgets: tg {tg:.1f} ± {cut['tg_tok_s_std']:.1f} tok/s over {n} timed tokens; "
      f"device cache hit rate {100*dc['hit_rate']:.1f} % ({dc['slots']} slots), host cache "
      f"{100*ec['hit_rate']:.1f} %; per token {disk/2**20:.1f} MiB from disk "
      f"({disk_bps/1e9:.2f} GB/s) and {up/2**20:.1f} MiB uploaded ({up_bps/1e9:.1f} GB/s): "
      f"I/O bound {io:.0f} tok/s (= {tg/io:.2f} x); all on the GPU {full['tg_tok_s']:.1f} tok/s; "
      f"compute + I/O in series {serial:.1f} tok/s (= {tg/serial:.2f} x), overlapped "
      f"{overlap:.1f} tok/s (= {tg/overlap:.2f} x)")
EOF
}

run() {
  : "${OUT:=/tmp/out}"; mkdir -p "$OUT"
  export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  export HYPURA_FIXTURES=$PWD/tests/fixtures RUST_BACKTRACE=1
  if [ -f .gpu/fixtures.txz ] && [ ! -f tests/fixtures/text.txt ]; then
    mkdir -p tests/fixtures && tar xJf .gpu/fixtures.txz -C tests/fixtures
    export HYPURA_FIXTURES_MIN=$(find tests/fixtures -name '*.ref.json' | wc -l)
    echo "fixture subset: $HYPURA_FIXTURES_MIN models" | tee -a "$OUT/log"
  fi
  local bin=/tmp/hypura-bin M=${MODELS:-/tmp/models}; mkdir -p $bin "$M"
  for f in .gpu/*.xz; do
    local b; b=$bin/$(basename "$f" .xz)
    [ -x "$b" ] || { xz -dc "$f" >"$b"; chmod +x "$b"; }
  done
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv | tee -a "$OUT/log"
  local what=("$@"); [ ${#what[@]} -eq 0 ] && what=(tests profile bench8b)
  local budgets=(--device-budget 22GiB --ram-budget 8GiB)
  for w in "${what[@]}"; do
    case $w in
      tests)
        for t in fused fidelity tiers perplexity experts; do
          [ -x "$bin/$t" ] && step "test-$t" "$bin/$t" cuda --test-threads=1 --nocapture
        done
        # The fused MoE steps behind the expert caches launched one by one (the host answers
        # the device's requests between MoE blocks instead of while a graph runs).
        [ -x "$bin/experts" ] && HYPURA_CUDA_GRAPH=0 step test-experts-direct "$bin/experts" cuda \
          --test-threads=1
        # candle's ops for single-token steps, with its other mat-vec kernels
        # (see hypura::backend::configure_cuda and hypura::backend::FusedDecode).
        [ -x "$bin/fidelity" ] && HYPURA_CUDA_DECODE=candle HYPURA_CUDA_MATVEC=exact \
          step test-fidelity-candle-exact "$bin/fidelity" cuda --test-threads=1
        # TESTS_MMQ=1: the prompt suites with batches through candle's MMQ kernels (an experiment).
        if [ -n "${TESTS_MMQ:-}" ]; then
          for t in fidelity perplexity; do
            [ -x "$bin/$t" ] && HYPURA_CUDA_BATCH=mmq step "test-$t-mmq" "$bin/$t" cuda \
              --test-threads=1 --nocapture
          done
        fi ;;
      kbench) TAIL=60 step kbench "$bin/kbench" ;;
      kbenchatt) TAIL=30 step kbench-att "$bin/kbench" att ;;
      kbenchpdl) TAIL=30 step kbench-pdl "$bin/kbench" pdl ;;
      kflash) TAIL=60 step kflash "$bin/kflash" ;;
      profile)
        step profile "$bin/hypura" profile --dir "$M" --reprofile
        "$bin/hypura" profile --dir "$M" --json >"$OUT/profile.json" ;;
      lcpp)
        if [ ! -x /tmp/lcpp/build/bin/llama-bench ]; then
          mkdir -p /tmp/lcpp && tar xJf .gpu/lcpp-src.txz -C /tmp/lcpp
          ( cd /tmp/lcpp && setsid nohup bash -c "cmake -S lcpp-src -B build -G Ninja -DGGML_CUDA=ON \
              -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF \
              -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
              -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DCMAKE_BUILD_TYPE=Release && \
              cmake --build build -j ${LCPP_JOBS:-14} --target llama-bench llama-completion" \
              >"$OUT/lcpp-build.log" 2>&1 </dev/null & )
          echo "llama.cpp build started in the background"
        fi ;;
      bench8b)
        [ -f "$M/l8b.gguf" ] || step synth8b "$bin/hypura" synth --preset llama-3-8b --type Q4_K_M -o "$M/l8b.gguf"
        "$bin/hypura" plan -m "$M/l8b.gguf" -c 512 --json >"$OUT/plan8b.json"
        step plan8b "$bin/hypura" plan -m "$M/l8b.gguf" -c 512
        # Single-token steps: the fused kernels from a CUDA graph (the default), the fused kernels
        # launched one by one, candle's ops.
        for mv in ${BENCH8B_MODES:-fused direct candle}; do
          case $mv in
            fused) e=HYPURA_CUDA_DECODE=fused ;; direct) e=HYPURA_CUDA_GRAPH=0 ;; candle) e=HYPURA_CUDA_DECODE=candle ;;
            nopdl) e=HYPURA_CUDA_PDL=0 ;; nofold) e=HYPURA_CUDA_FOLD=0 ;; nostage) e=HYPURA_CUDA_STAGED=0 ;;
            notf32) e=HYPURA_CUDA_TF32=0 ;; mmq) e=HYPURA_CUDA_BATCH=mmq ;; clock) e=HYPURA_CUDA_STEP_CLOCK=1 ;;
            *) echo "unknown bench8b mode $mv" >&2; continue ;;
          esac
          ( export "${e?}"; TAIL=3 step "bench8b-$mv" "$bin/hypura" bench -m "$M/l8b.gguf" -c 1024 -p 512 -n 128 -r 3 --json )
          grep '^{' "$OUT/bench8b-$mv.log" | tail -n 1 >"$OUT/bench8b.json" || true
          echo -n "decode $mv: " | tee -a "$OUT/log"
          bound "$OUT/plan8b.json" "$OUT/bench8b.json" "$OUT/profile.json" | tee -a "$OUT/log" || true
        done
        if [ -x /tmp/lcpp/build/bin/llama-bench ]; then
          step llama-bench8b /tmp/lcpp/build/bin/llama-bench -m "$M/l8b.gguf" -p 512 -n 128 -r 3 -ngl 99 -o md
        else
          echo "llama-bench not built yet"; tail -n 3 "$OUT/lcpp-build.log" 2>/dev/null || true
        fi ;;
      run8b) # hypura run on the 8B, 256 tokens: default sampling (top-k candidates from the device,
        # and from all logits: HYPURA_CUDA_TOPK=0), greedy (its steps chained on the device), greedy
        # one step at a time (HYPURA_CUDA_CHAIN=0); two rounds each
        [ -f "$M/l8b.gguf" ] || step synth8b "$bin/hypura" synth --preset llama-3-8b --type Q4_K_M -o "$M/l8b.gguf"
        local gen=(run -m "$M/l8b.gguf" -c 1024 -p "Once upon a time" -n 256 -s 7)
        for r in 1 2; do
          TAIL=1 step "run8b-default-$r" "$bin/hypura" "${gen[@]}"
          TAIL=1 step "run8b-greedy-$r" "$bin/hypura" "${gen[@]}" --temp 0
          HYPURA_CUDA_CHAIN=0 TAIL=1 step "run8b-greedy-nochain-$r" "$bin/hypura" "${gen[@]}" --temp 0
          HYPURA_CUDA_TOPK=0 TAIL=1 step "run8b-default-alllogits-$r" "$bin/hypura" "${gen[@]}"
        done
        # Top-k from the device's candidates and from all logits: the same text (seed 7).
        cmp <(head -c 4000 "$OUT/run8b-default-1.log" | grep -v '^hypura:') \
          <(head -c 4000 "$OUT/run8b-default-alllogits-1.log" | grep -v '^hypura:') &&
          echo "run8b: default sampling text identical with and without device top-k" | tee -a "$OUT/log" ||
          echo "run8b: default sampling logs differ (see run8b-default-*-1.log)" | tee -a "$OUT/log"
        # The chained and the stepped greedy runs print the same text.
        cmp <(head -c 4000 "$OUT/run8b-greedy-1.log" | grep -v '^hypura:') \
          <(head -c 4000 "$OUT/run8b-greedy-nochain-1.log" | grep -v '^hypura:') &&
          echo "run8b: chained and stepped greedy text identical" | tee -a "$OUT/log" ||
          echo "run8b: chained and stepped greedy logs differ (see run8b-greedy-*-1.log)" | tee -a "$OUT/log" ;;
      depth8b) # decode deep into a context: -d 4096 (llama-bench's depth), both engines
        [ -f "$M/l8b.gguf" ] || step synth8b "$bin/hypura" synth --preset llama-3-8b --type Q4_K_M -o "$M/l8b.gguf"
        TAIL=4 step bench8b-d4096 "$bin/hypura" bench -m "$M/l8b.gguf" -p 512 -n 128 -d 4096 -r 3
        # DEPTH_AB=1: the same with prompt attention on candle's ops (no flash kernel).
        [ -n "${DEPTH_AB:-}" ] && HYPURA_CUDA_FLASH=0 TAIL=4 step bench8b-d4096-noflash \
          "$bin/hypura" bench -m "$M/l8b.gguf" -p 512 -n 0 -d 4096 -r 3
        if [ -x /tmp/lcpp/build/bin/llama-bench ]; then
          step llama-bench8b-d4096 /tmp/lcpp/build/bin/llama-bench -m "$M/l8b.gguf" -p 512 -n 128 \
            -d 4096 -r 3 -ngl 99 -o md
        fi ;;
      prof8b) # per-kernel GPU time of one fused decode step (positions 8 and 100), and ncu's view
        [ -f "$M/l8b.gguf" ] || step synth8b "$bin/hypura" synth --preset llama-3-8b --type Q4_K_M -o "$M/l8b.gguf"
        for p in 8 100; do
          HYPURA_CUDA_PROFILE=$p TAIL=40 step "prof8b-$p" "$bin/hypura" bench -m "$M/l8b.gguf" -c 1024 -p 16 -n 128 -r 1
        done
        if command -v ncu >/dev/null || [ -x /usr/local/cuda/bin/ncu ]; then
          HYPURA_CUDA_GRAPH=0 TAIL=60 step ncu8b timeout 240 /usr/local/cuda/bin/ncu \
            --metrics gpu__time_duration.sum,dram__bytes_read.sum,sm__warps_active.avg.pct_of_peak_sustained_active \
            -k regex:'^(matvec|attention|rms_norm)' --launch-skip 400 -c 14 --csv \
            "$bin/hypura" bench -m "$M/l8b.gguf" -c 256 -p 8 -n 4 -r 1
        fi ;;
      ramc8b) # layer offload of the 8B (3 GiB device budget): RAM-tier layers uploaded vs on the host
        [ -f "$M/l8b.gguf" ] || step synth8b "$bin/hypura" synth --preset llama-3-8b --type Q4_K_M -o "$M/l8b.gguf"
        step plan-ramc "$bin/hypura" plan -m "$M/l8b.gguf" -c 512 --device-budget 3GiB
        for rc in gpu host; do
          TAIL=4 step "bench-ramc-$rc" "$bin/hypura" bench -m "$M/l8b.gguf" -c 512 --device-budget 3GiB \
            --ram-compute "$rc" -p 64 -n 32 -r 2
        done ;;
      llama8b) # wait for the background llama.cpp build (up to 6 minutes), then llama-bench
        [ -f "$M/l8b.gguf" ] || step synth8b "$bin/hypura" synth --preset llama-3-8b --type Q4_K_M -o "$M/l8b.gguf"
        for _ in $(seq 72); do [ -x /tmp/lcpp/build/bin/llama-bench ] && break; sleep 5; done
        tail -n 2 "$OUT/lcpp-build.log"
        step llama-bench8b /tmp/lcpp/build/bin/llama-bench -m "$M/l8b.gguf" -p 512 -n 128 -r 3 -ngl 99 -o md ;;
      moe)
        local m=$M/mixtral-Q5_K_M-skew.gguf
        [ -f "$m" ] || step synth-moe "$bin/hypura" synth --preset mixtral-8x7b --type Q5_K_M \
          --router-skew "${SKEW:-1.5}" --router-corr "${CORR:-0.8}" -o "$m"
        step plan-moe "$bin/hypura" plan -m "$m" -c 512 "${budgets[@]}"
        TAIL=6 step run-moe-learn "$bin/hypura" run -m "$m" -c 512 "${budgets[@]}" -p "Once upon a time" \
          -n "${N_MOE:-48}" --temp 0 --stats
        HYPURA_CUDA_PROFILE=20 TAIL=3 step bench-moe "$bin/hypura" bench -m "$m" -c 512 "${budgets[@]}" \
          -p 32 -n "${N_MOE:-32}" -r 3 --json
        grep '^{' "$OUT/bench-moe.log" | tail -n 1 >"$OUT/bench-moe.json" || true
        # MOE_NOSTAGE=1: the same with the experts' down read in place (not staged), to compare.
        [ -n "${MOE_NOSTAGE:-}" ] && HYPURA_CUDA_STAGED=0 TAIL=3 step bench-moe-nostage \
          "$bin/hypura" bench -m "$m" -c 512 "${budgets[@]}" -p 32 -n "${N_MOE:-32}" -r 3
        true ;;
      moefull) # the same Mixtral all on the GPU (no budgets): hypura bench, llama-bench beside it
        local m=$M/mixtral-Q5_K_M-skew.gguf
        [ -f "$m" ] || step synth-moe "$bin/hypura" synth --preset mixtral-8x7b --type Q5_K_M \
          --router-skew "${SKEW:-1.5}" --router-corr "${CORR:-0.8}" -o "$m"
        HYPURA_CUDA_PROFILE=20 TAIL=3 step bench-moe-full "$bin/hypura" bench -m "$m" -c 512 -p 32 -n 32 -r 3 --json
        grep '^{' "$OUT/bench-moe-full.log" | tail -n 1 >"$OUT/bench-moe-full.json" || true
        # MOE_MMQ=1: the same with prompt batches through candle's MMQ kernels (HYPURA_CUDA_BATCH=mmq).
        [ -n "${MOE_MMQ:-}" ] && HYPURA_CUDA_BATCH=mmq TAIL=3 step bench-moe-full-mmq \
          "$bin/hypura" bench -m "$m" -c 512 -p 32 -n 32 -r 3
        # MOE_NOSTAGE=1: the same with the experts' down read in place (not staged), to compare.
        [ -n "${MOE_NOSTAGE:-}" ] && HYPURA_CUDA_STAGED=0 TAIL=3 step bench-moe-full-nostage \
          "$bin/hypura" bench -m "$m" -c 512 -p 32 -n 32 -r 3
        [ -s "$OUT/bench-moe.json" ] && moebound "$OUT/bench-moe.json" "$OUT/bench-moe-full.json" \
          "$OUT/profile.json" | tee -a "$OUT/log" || true
        # Waits for llama.cpp only if this call's `lcpp` step started building it.
        [ -d /tmp/lcpp ] && for _ in $(seq 72); do [ -x /tmp/lcpp/build/bin/llama-bench ] && break; sleep 5; done
        [ -x /tmp/lcpp/build/bin/llama-bench ] && step llama-bench-moe /tmp/lcpp/build/bin/llama-bench \
          -m "$m" -p 32 -n 32 -r 3 -ngl 99 -o md ;;
      l70)
        local m=$M/l70b.gguf
        [ -f "$m" ] || step synth70b "$bin/hypura" synth --preset llama-3-70b --type Q4_K_M -o "$m"
        step plan70b "$bin/hypura" plan -m "$m" -c 512 "${budgets[@]}"
        TAIL=8 step run70b "$bin/hypura" run -m "$m" -c 512 "${budgets[@]}" -p "Hello" \
          -n "${N_70:-6}" --temp 0 --stats ;;
      clean) rm -f "$M"/*.gguf ;;
      *) echo "unknown step $w" >&2; return 2 ;;
    esac
  done
}

cmd=${1:-}; shift || true
case $cmd in
  pack) pack "$@" ;;
  fixtures) fixtures "$@" ;;
  lcpp) lcpp "$@" ;;
  kbench) kbench "$@" ;;
  run) run "$@" ;;
  *) sed -n '2,40p' "$0"; exit 2 ;;
esac
