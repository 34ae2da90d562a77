#!/usr/bin/env bash
# Every test of the workspace: unit, integration and doc tests (including
# the multi-process shm and TCP tests), then the loom model checks of the
# shared-memory ring (a separate build with `--cfg lnet_loom`).
# LOOM_MAX_PREEMPTIONS bounds loom's search (4 here: every interleaving
# with up to 4 preemptions; raise it for a deeper, slower check).
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --workspace
echo "+ loom model checks of the shm ring"
LOOM_MAX_PREEMPTIONS="${LOOM_MAX_PREEMPTIONS:-4}" RUSTFLAGS="--cfg lnet_loom" \
  CARGO_TARGET_DIR=target/loom cargo test -p lnd-loopback --lib --release loom
