#!/usr/bin/env bash
# Builds the guest side of a kite VM: unpacks Debian's cloud kernel (not installed on the host)
# and builds an initrd with kite-guest as PID 1 plus the modules it loads.
#   hack/build-guest.sh [OUT_DIR [FEATURES]]      (default /var/lib/kite/guest, none)
# FEATURES: cargo features of kite-guest (`misbehave`: the tests' misbehaving agent, never for
# pods). Idempotent: the kernel is unpacked once per version (in /var/lib/kite/guest/work, for
# every OUT_DIR); the initrd is rebuilt every time.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-/var/lib/kite/guest}
features=${2:-}
mkdir -p "$out"
work=/var/lib/kite/guest/work
mkdir -p "$work"
# One build at a time: builds for every OUT_DIR share the unpacked kernel and the agent's
# cargo artifact (target/…/guest/kite-guest, rebuilt for each FEATURES).
exec 9>"$work/.lock"
flock 9

# The kernel: whatever linux-image-cloud-amd64 points at today.
kpkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/{print $2; exit}')
[ -n "$kpkg" ] || { echo "build-guest: cannot resolve linux-image-cloud-amd64 (run apt-get update)" >&2; exit 1; }
kver=${kpkg#linux-image-}
kroot=$work/kernel-$kver
if [ ! -f "$kroot/boot/vmlinuz-$kver" ]; then
  echo "build-guest: unpacking $kpkg"
  rm -rf "$kroot" "$work"/*.deb
  (cd "$work" && apt-get download "$kpkg" >/dev/null 2>&1)
  dpkg-deb -x "$work"/"$kpkg"_*.deb "$kroot"
  depmod -b "$kroot" "$kver"
  rm -f "$work"/*.deb
fi
# Files are replaced only when they change: the warm pool's VMs were booted from the old ones
# and stay valid while they are the same (kite-pool retires VMs made from other files).
replace() { if cmp -s "$1" "$2"; then rm -f "$1"; else mv "$1" "$2"; fi; }
cp "$kroot/boot/vmlinuz-$kver" "$out/vmlinuz.new" && replace "$out/vmlinuz.new" "$out/vmlinuz"

# The agent, linked statically: the initrd has no libc.
target=x86_64-unknown-linux-gnu
(cd "$here" && RUSTFLAGS="-C target-feature=+crt-static" \
   LIBSECCOMP_LINK_TYPE=static LIBSECCOMP_LIB_PATH=/usr/lib/x86_64-linux-gnu \
   cargo build --profile guest --locked -q \
   -p kite-guest --target $target ${features:+--features "$features"})
agent=$here/target/$target/guest/kite-guest

# The initrd: /init -> /sysroot/init; everything the agent needs lives in /sysroot.
stage=$work/initrd-$(basename "$out")
rm -rf "$stage"
mkdir -p "$stage/sysroot/lib/modules"
# Stripped: the initrd stays in the guest's RAM (unpacked) for the VM's life.
strip --strip-all -o "$stage/sysroot/init" "$agent"
ln -s sysroot/init "$stage/init"
# The console the kernel opens as PID 1's stdin, stdout and stderr (the agent logs there); the
# kernel's built-in initramfs has one too, but not every kernel's.
mkdir -p "$stage/dev"
mknod -m 600 "$stage/dev/console" c 5 1
# Modules in groups; the shim names the groups a VM needs on the kernel command line
# (kite.modules=…), and the agent loads just those, in this order, each after its dependencies.
# vf: drivers of the network functions a pod may get passed through (ENA, Intel VF, gVNIC).
groups="core:virtio_ring,virtio mmio:virtio_mmio pci:virtio_pci console:virtio_console
        fs:virtiofs net:virtio_net vsock:vmw_vsock_virtio_transport overlay:overlay
        balloon:virtio_balloon vf:ena,ixgbevf,gve"
: > "$stage/sysroot/lib/modules/modules.load"
for g in $groups; do
  name=${g%%:*}
  for m in $(echo "${g#*:}" | tr , ' '); do
    modprobe -d "$kroot" -S "$kver" --show-depends "$m" | awk -v g="$name" '$1=="insmod"{print g, $2}'
  done
done | awk '!seen[$2]++' | while read -r group ko; do
  rel=${ko#"$kroot"/lib/modules/"$kver"/}
  mkdir -p "$stage/sysroot/lib/modules/$(dirname "$rel")"
  # Newer Debian kernels ship modules xz-compressed; the agent loads plain ones (finit_module
  # without MODULE_INIT_COMPRESSED_FILE: decompressing at every boot is slow under TCG).
  case "$rel" in
    *.ko.xz) rel=${rel%.xz}; xz -dc "$ko" > "$stage/sysroot/lib/modules/$rel" ;;
    *) cp "$ko" "$stage/sysroot/lib/modules/$rel" ;;
  esac
  echo "$group $rel" >> "$stage/sysroot/lib/modules/modules.load"
done
# Fixed times: the same files make the same initrd (and the warm pool's VMs stay valid).
find "$stage" -mindepth 1 -exec touch -h -d @0 {} +
(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) > "$out/initrd.img.new"
replace "$out/initrd.img.new" "$out/initrd.img"
echo "$kver" > "$out/kernel-release"
echo "build-guest: $out/vmlinuz ($kver), $out/initrd.img ($(du -h "$out/initrd.img" | cut -f1))"
