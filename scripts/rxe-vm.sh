#!/usr/bin/env bash
# rxe-vm.sh [--cache DIR] CMD [ARGS...]
#
# Run CMD inside a small QEMU virtual machine that has two soft-RoCE
# devices, so the RDMA LND can be tested on a host without RDMA hardware
# (CI machines, laptops):
#   rxe0 on vethA 10.77.0.1/24   <->   rxe1 on vethB 10.77.0.2/24
# (GID index 1 is the IPv4-mapped GID; both ends share one network
# namespace, and policy routing sends 10.77.0.1 <-> 10.77.0.2 across the
# veth pair so the RoCE packets really go through rxe.)
#
# The VM boots the distribution's stock kernel (Debian ships rdma_rxe) with
# this host's root file system mounted read-only over 9p under a tmpfs
# overlay: binaries built on the host run unchanged, writes vanish. CMD runs
# in the current directory; its output streams back and its exit status is
# ours (125 when the VM itself failed).
#
# The kernel and a tiny initramfs are built once into the cache directory
# (default: $RXE_VM_CACHE or ~/.cache/lnet-rs/rxe-vm, outside the clone).
# Software emulation (TCG) by default; RXE_VM_ACCEL=kvm where real
# hardware virtualisation exists. RXE_VM_TIMEOUT (s, 1800), RXE_VM_MEM (4G).
set -euo pipefail

cache=${RXE_VM_CACHE:-$HOME/.cache/lnet-rs/rxe-vm}
if [ "${1:-}" = --cache ]; then cache=$2; shift 2; fi
[ $# -ge 1 ] || { echo "usage: $0 [--cache DIR] CMD [ARGS...]" >&2; exit 2; }
cache=$(realpath -m "$cache")
mkdir -p "$cache"

need="qemu-system-x86 kmod busybox-static ibverbs-providers ibverbs-utils rdmacm-utils perftest iproute2"
if ! dpkg -s $need >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ]; then
    echo "rxe-vm: missing packages; run: sudo apt-get install -y --no-install-recommends $need" >&2
    exit 125
  fi
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -yq --no-install-recommends $need
fi

# --- one-time: kernel + initramfs ------------------------------------------
if [ ! -s "$cache/initrd.img" ] || [ ! -s "$cache/kver" ]; then
  pkg=$(apt-cache depends linux-image-amd64 | sed -n 's/.*Depends: \(linux-image-[0-9][^ ]*\).*/\1/p' | head -1)
  kver=${pkg#linux-image-}
  echo "rxe-vm: preparing kernel $kver in $cache" >&2
  rm -rf "$cache/kernel" "$cache/initramfs"
  mkdir -p "$cache/kernel" "$cache/initramfs/bin" "$cache/initramfs/mods"
  (cd "$cache" && apt-get download -q -o APT::Sandbox::User=root "$pkg" \
     && dpkg-deb -x "$pkg"_*.deb kernel && rm -f "$pkg"_*.deb)
  depmod -b "$cache/kernel" "$kver"
  cp "$cache/kernel/boot/vmlinuz-$kver" "$cache/vmlinuz"
  cp /bin/busybox "$cache/initramfs/bin/"
  # Modules the initramfs needs to mount the host's root: virtio + 9p + overlay.
  for m in virtio_pci 9pnet_virtio 9p overlay; do
    modprobe -d "$cache/kernel" -S "$kver" --show-depends "$m"
  done | awk '$1 == "insmod" && !seen[$2]++ {print $2}' | while read -r f; do
    cp "$f" "$cache/initramfs/mods/"; basename "$f" >>"$cache/initramfs/mods/list"
  done
  cat >"$cache/initramfs/init" <<'INIT'
#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /host /rw /root
mount -t proc none /proc; mount -t sysfs none /sys; mount -t devtmpfs none /dev
for m in $(cat /mods/list); do insmod "/mods/$m"; done
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=loose,ro host /host
mount -t tmpfs none /rw; mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/host,upperdir=/rw/upper,workdir=/rw/work none /root
for d in proc sys dev; do mount -o move "/$d" "/root/$d"; done
exec switch_root /root /bin/bash "$LNET_RXE_STAGE2"
INIT
  chmod +x "$cache/initramfs/init"
  (cd "$cache/initramfs" && find . | busybox cpio -o -H newc >"$cache/initrd.img" 2>/dev/null)
  echo "$kver" >"$cache/kver"
fi

# --- per run: the script PID 1 runs inside the VM --------------------------
# Each run has its own exchange directory, so runs can overlap.
xfer=$(mktemp -d "$cache/run.XXXXXX")
trap 'rm -rf "$xfer"' EXIT
cat >"$xfer/stage2.sh" <<STAGE2
#!/bin/bash
# Runs as PID 1 in the VM, on the overlay of the host's root.
XFER="$xfer"; KDIR="$cache/kernel"
STAGE2
cat >>"$xfer/stage2.sh" <<'STAGE2'
set -e
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 xfer "$XFER"
mkdir -p /dev/pts /dev/shm
# /tmp stays the host's (under the overlay): the work tree may live there.
mount -t devpts none /dev/pts; mount -t tmpfs none /dev/shm; mount -t tmpfs none /run
. "$XFER/env"
hostname rxe-vm; ip link set lo up
kv=$(uname -r); mkdir -p "/lib/modules/$kv"; mount --bind "$KDIR/lib/modules/$kv" "/lib/modules/$kv"
modprobe -a veth rdma_rxe rdma_ucm
ip link add vethA type veth peer name vethB
ip addr add 10.77.0.1/24 dev vethA; ip addr add 10.77.0.2/24 dev vethB
ip link set vethA up; ip link set vethB up
for i in all vethA vethB; do
  sysctl -qw net.ipv4.conf.$i.accept_local=1 net.ipv4.conf.$i.rp_filter=0
done
# Both addresses are local: move the local table below two rules that send
# locally generated traffic between them out of the right veth.
ip rule add pref 100 lookup local; ip rule del pref 0
ip rule add pref 10 iif lo from 10.77.0.1 to 10.77.0.2 lookup 201
ip route add 10.77.0.2 dev vethA table 201
ip rule add pref 11 iif lo from 10.77.0.2 to 10.77.0.1 lookup 202
ip route add 10.77.0.1 dev vethB table 202
rdma link add rxe0 type rxe netdev vethA
rdma link add rxe1 type rxe netdev vethB
stty -F /dev/ttyS1 raw -echo
set +e
if cd "$(cat "$XFER/cwd")"; then
  bash "$XFER/cmd" </dev/null 2>&1 | cat >/dev/ttyS1
  echo "${PIPESTATUS[0]}" >"$XFER/rc"
else
  echo "rxe-vm: cannot enter $(cat "$XFER/cwd") in the VM" >/dev/ttyS1
  echo 125 >"$XFER/rc"
fi
sync
echo o >/proc/sysrq-trigger
sleep 10
STAGE2

printf '%q ' "$@" >"$xfer/cmd"
pwd >"$xfer/cwd"
export -p | grep -E '^declare -x (PATH|HOME|USER|TERM|RUST[A-Z_]*|CARGO[A-Z_]*|LNET_[A-Z_]*)=' >"$xfer/env" || true
rm -f "$xfer/rc" "$xfer/console.log"

timeout "${RXE_VM_TIMEOUT:-1800}" qemu-system-x86_64 \
  -accel "${RXE_VM_ACCEL:-tcg}" -cpu max -smp 2 -m "${RXE_VM_MEM:-4G}" \
  -nic none -display none -monitor none -no-reboot \
  -serial file:"$xfer/console.log" -serial stdio \
  -kernel "$cache/vmlinuz" -initrd "$cache/initrd.img" \
  -append "console=ttyS0 loglevel=4 panic=-1 LNET_RXE_STAGE2=$xfer/stage2.sh" \
  -virtfs local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap \
  -virtfs local,path="$xfer",mount_tag=xfer,security_model=none </dev/null || true

if [ ! -s "$xfer/rc" ]; then
  echo "rxe-vm: the VM did not finish; last kernel messages:" >&2
  tail -40 "$xfer/console.log" >&2 || true
  exit 125
fi
rc=$(cat "$xfer/rc")
exit "$rc"
