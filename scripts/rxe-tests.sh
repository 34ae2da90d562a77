#!/usr/bin/env bash
# Runs inside the soft-RoCE VM (see scripts/rxe-vm.sh): the device tests
# given as arguments (test binaries built on the host), then a selftest
# over rdma between rxe0 and rxe1.
set -euo pipefail
ibv_devices
for t in "$@"; do
  echo "+ $t --ignored"
  timeout 900 "$t" --ignored --test-threads 1
done
echo "+ lnet-selftest run --lnd rdma (write, then ping)"
timeout 300 target/debug/lnet-selftest run --lnd rdma --duration 3 --concurrency 4 --check simple
timeout 300 target/debug/lnet-selftest run --lnd rdma --mode ping --duration 2
echo "+ lnet-selftest compare --lnd rdma (beside ib_write_bw / ib_write_lat)"
timeout 600 target/debug/lnet-selftest compare rdma --duration 2 --concurrency 4
