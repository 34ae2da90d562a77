#!/usr/bin/env bash
# Install the system packages the full build and tests need (Debian/Ubuntu):
#   libibverbs-dev librdmacm-dev cmake libclang-dev  the verbs feature (lnd-rdma)
#   iproute2                                         ip(8) for network-namespace tests
# As root it installs what is missing; otherwise it prints the exact
# apt-get line and fails. The soft-RoCE VM's own packages (qemu, perftest,
# ...) are installed by scripts/rxe-vm.sh.
set -euo pipefail
pkgs="libibverbs-dev librdmacm-dev ibverbs-providers cmake libclang-dev pkg-config iproute2"
missing=$(for p in $pkgs; do dpkg -s "$p" >/dev/null 2>&1 || echo "$p"; done | tr '\n' ' ')
[ -z "${missing// }" ] && exit 0
if [ "$(id -u)" = 0 ]; then
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -yq --no-install-recommends $missing
else
  echo "missing packages; run: sudo apt-get install -y --no-install-recommends $missing" >&2
  exit 1
fi
