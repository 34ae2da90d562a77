#!/usr/bin/env bash
# Every test of the workspace, with every feature, on a fresh machine:
#  1. installs the system packages the RDMA (verbs) build needs (scripts/deps.sh);
#  2. unit, integration and doc tests of all crates with --all-features
#     (the multi-process shm and TCP tests included; the RDMA tests that
#     need devices are listed as ignored here);
#  3. the main job, README's first command, as a newcomer runs it (a
#     selftest over shm between two processes; fails on any error);
#  4. the loom model checks of the shared-memory ring (a separate build
#     with `--cfg lnet_loom`; LOOM_MAX_PREEMPTIONS bounds the search, 4);
#  5. the RDMA tests that need devices, inside a QEMU VM with two
#     soft-RoCE devices (scripts/rxe-vm.sh; built here, run there).
# LNET_SKIP_VM=1 skips step 5 (for a quick local run; CI never sets it).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/deps.sh
cargo test --workspace --all-features
main_job=$(scripts/readme-command.sh 1)
[ -n "$main_job" ] || { echo "README.md names no main job" >&2; exit 1; }
echo "+ the main job (README.md): $main_job"
eval "$main_job"
echo "+ loom model checks of the shm ring"
LOOM_MAX_PREEMPTIONS="${LOOM_MAX_PREEMPTIONS:-4}" RUSTFLAGS="--cfg lnet_loom" \
  CARGO_TARGET_DIR=target/loom cargo test -p lnd-loopback --lib --release loom
if [ "${LNET_SKIP_VM:-0}" = 1 ]; then
  echo "+ LNET_SKIP_VM=1: soft-RoCE tests NOT run" >&2
  exit 0
fi
echo "+ RDMA tests on soft-RoCE (QEMU VM)"
# Build the device tests on the host; the VM runs the binaries as they are.
tests=$(cargo test -p lnet-examples --features rdma --test rdma --no-run --message-format=json 2>/dev/null |
  grep '"kind":\["test"\]' | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p')
[ -n "$tests" ] || { echo "no RDMA test binary built" >&2; exit 1; }
cargo build -p lnet-selftest --features rdma
scripts/rxe-vm.sh bash scripts/rxe-tests.sh $tests
