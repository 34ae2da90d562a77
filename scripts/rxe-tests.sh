#!/usr/bin/env bash
# Runs inside the soft-RoCE VM (see scripts/rxe-vm.sh): the device tests
# given as arguments (test binaries built on the host), then a selftest
# over rdma between rxe0 and rxe1.
set -euo pipefail
ibv_devices
# Soft-RoCE on this two-vCPU VM delivers some packets out of order (the
# requester runs on whichever vCPU posts or schedules it; veth keeps one
# backlog per CPU). The responder NAKs each gap and the requester counts
# that NAK as a retry: with o2iblnd's retry_count of 5, a run of 6 on one
# work request (seen about once in ten CI runs) fails the connection with
# IBV_WC_RETRY_EXC_ERR. rxe treats 7 as "retry without limit", so every
# process here uses it (RdmaConfig reads LNET_RDMA_RETRY_COUNT).
export LNET_RDMA_RETRY_COUNT=7
# Warnings, plus the connections' lifecycle (CM events, connects, closes):
# a few lines per connection, so a failure here shows its sequence.
export RUST_LOG="${RUST_LOG:-warn,net=debug}"
rxe_counters() {
  for d in /sys/class/infiniband/*; do
    [ -d "$d/ports/1/hw_counters" ] || continue
    printf '%s:' "${d##*/}"
    for f in "$d"/ports/1/hw_counters/*; do
      v=$(cat "$f"); [ "$v" = 0 ] || printf ' %s=%s' "${f##*/}" "$v"
    done
    echo
  done
}
trap 'echo "+ rxe counters (non-zero)"; rxe_counters' EXIT
for t in "$@"; do
  echo "+ $t --ignored"
  timeout 900 "$t" --ignored --test-threads 1
done
echo "+ lnet-selftest run --lnd rdma (write, then ping)"
timeout 300 target/debug/lnet-selftest run --lnd rdma --duration 3 --concurrency 4 --check simple
timeout 300 target/debug/lnet-selftest run --lnd rdma --mode ping --duration 2
echo "+ lnet-selftest compare --lnd rdma (beside ib_write_bw / ib_write_lat)"
timeout 600 target/debug/lnet-selftest compare rdma --duration 2 --concurrency 4
