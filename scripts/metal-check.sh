#!/usr/bin/env bash
# Type-checks the Metal build (`--features metal`) for Apple Silicon from Linux: clippy over the
# library, the binary, tests, benches and examples for aarch64-apple-darwin, warnings as errors.
# Nothing is linked or run (there is no macOS SDK here); this catches what a Mac build would
# reject at compile time: the cfg(target_os = "macos") storage code, candle's Metal backend as
# hypura calls it, and src/hardware/metal.rs.
#
#   bash scripts/metal-check.sh          # what .ci/run runs
#
# Needs: rustup (adds the aarch64-apple-darwin standard library) and clang (the C that crates
# compile for the target: ring, under hf-hub's TLS). ring's C includes a few libc and Apple SDK
# headers; without an SDK, this script gives clang minimal stand-ins for them (declarations only,
# enough to compile; nothing is linked).
set -euo pipefail
cd "$(dirname "$0")/.."
TARGET=aarch64-apple-darwin
if ! rustup target list --installed | grep -qx "$TARGET"; then
  rustup target add "$TARGET"
fi
command -v clang >/dev/null || { echo "metal-check: clang not found (apt-get install clang)"; exit 1; }

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target/mac}"
shim="$CARGO_TARGET_DIR/sdk-shim"
mkdir -p "$shim"
shim=$(cd "$shim" && pwd)
cat >"$shim/TargetConditionals.h" <<'EOF'
#pragma once
#define TARGET_OS_MAC 1
#define TARGET_OS_OSX 1
#define TARGET_OS_IPHONE 0
#define TARGET_OS_IOS 0
#define TARGET_OS_SIMULATOR 0
#define TARGET_CPU_ARM64 1
EOF
cat >"$shim/string.h" <<'EOF'
#pragma once
#include <stddef.h>
void *memcpy(void *, const void *, size_t);
void *memmove(void *, const void *, size_t);
void *memset(void *, int, size_t);
int memcmp(const void *, const void *, size_t);
size_t strlen(const char *);
EOF
cat >"$shim/stdlib.h" <<'EOF'
#pragma once
#include <stddef.h>
void abort(void);
EOF
cat >"$shim/assert.h" <<'EOF'
#pragma once
#define assert(x) ((void)0)
EOF

# The repository's .cargo/config.toml builds for the host CPU (target-cpu=native); an x86 CPU
# name means nothing to an Apple target, so name the first Apple Silicon core instead.
export RUSTFLAGS="-C target-cpu=apple-m1"
export CC_aarch64_apple_darwin=clang
export CFLAGS_aarch64_apple_darwin="-nostdlibinc -I$shim"
cargo clippy --target "$TARGET" --features metal --all-targets -- -D warnings
echo "metal-check: --features metal type-checks for $TARGET (not linked, not run)"
