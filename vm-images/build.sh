#!/usr/bin/env bash
# Builds the guest kernel and initrd for peapod pods from Debian packages only.
#
#   vm-images/build.sh OUT_DIR AGENT_BINARY
#
# OUT_DIR gets
#   vmlinux     the uncompressed kernel ELF, booted directly through its PVH entry point
#   vmlinuz     Debian's generic kernel as packaged (linux-image-amd64's current version)
#   cmdline     the kernel command line to boot with
#   initrd.img  an uncompressed newc cpio, holding:
#   /init                      peapod-agent (PID 1)
#   /usr/bin/crun              crun built from the Debian package's source, static and without
#                              systemd (vm-images/crun.sh says why)
#   /lib/..., /lib64/...       every shared library the agent needs (its ldd closure)
#   /lib/modules/<ver>/...     the modules the guest needs and their dependencies
#   /etc/peapod/modules        those modules, in load order (the agent loads them with
#                              finit_module; there is no modprobe or udev in the guest)
# Results are cached by a hash of every input; a second run with the same inputs only prints.
set -euo pipefail

out=${1:?usage: build.sh OUT_DIR AGENT_BINARY}
agent=${2:?usage: build.sh OUT_DIR AGENT_BINARY}
cache=${PEAPOD_VM_IMAGE_CACHE:-/var/cache/peapod/vm-images}
here=$(cd "$(dirname "$0")" && pwd)

# What the guest loads. virtio_pci/console first: the agent channel needs them; the rest are
# for disks (scsi), the NIC, the pod share (9p), layers (erofs) and overlay.
# crc32c_generic: libcrc32c (needed by erofs) asks the crypto API for crc32c at load time, a
# soft dependency modules.dep does not list.
# virtio_balloon: free page reporting, so memory the guest frees goes back to the host (the
# domain's <memballoon freePageReporting='on'>; nothing inflates the balloon).
modules=(virtio_pci virtio_console virtio_scsi sd_mod virtio_net 9pnet_virtio 9p crc32c_generic erofs overlay
         vmw_vsock_virtio_transport virtio_rng virtio_balloon)
# In the image but loaded only when needed, from the list /etc/peapod/modules.<name>: by the
# agent when a pod first mounts that filesystem (ext4 for the per-pod scratch disk is 2.5 MB of
# module that a boot would otherwise relocate for nothing), or by the kernel, which runs
# /sbin/modprobe (a link to the agent) when a privileged container asks for a bridge (brctl
# addbr), a veth pair, a TUN device or another link type. Each alias of a module (rtnl-link-veth,
# fs-ext4, char-major-10-200) gets a link to its list.
ondemand=(ext4 bridge veth tun dummy macvlan ipvlan vxlan 8021q)

# Measured under TCG (docs/guest-image.md): PVH boot of vmlinux skips ~4.5 s of in-guest xz
# decompression; these flags take ~1 s more off kernel init. Uncompressed initrd: unpacking
# raw is faster than any decompressor, and fw_cfg transfer is not the bottleneck.
cmdline="console=ttyS0 panic=-1 quiet tsc=reliable no_timer_check noreplace-smp i8042.noaux \
i8042.nomux i8042.nopnp i8042.dumbkbd cryptomgr.notests rcupdate.rcu_expedited=1 pci=lastbus=0 \
reboot=k 8250.nr_uarts=1 mitigations=off random.trust_cpu=on"

die() { echo "vm-images: $*" >&2; exit 1; }

# Writes the kernel ELF inside bzImage $1 to $2: the compressed payload's offset and length
# are in the boot header (setup_sects at 0x1f1, payload_offset/length at 0x248/0x24c).
extract_vmlinux() {
  local img=$1 out=$2 setup off len magic
  setup=$(od -An -tu1 -j $((0x1f1)) -N1 "$img" | tr -d ' ')
  ((setup == 0)) && setup=4
  off=$(( (setup + 1) * 512 + $(od -An -tu4 -j $((0x248)) -N4 "$img" | tr -d ' ') ))
  len=$(od -An -tu4 -j $((0x24c)) -N4 "$img" | tr -d ' ')
  magic=$(od -An -tx1 -j "$off" -N4 "$img" | tr -d ' ')
  local dec
  case "$magic" in
    fd377a58) dec="xz -dc" ;;
    1f8b*) dec="gzip -dc" ;;
    28b52ffd) dec="zstd -dc" ;;
    *) die "unknown kernel compression (magic $magic at $off) in $img" ;;
  esac
  tail -c +$((off + 1)) "$img" | head -c "$len" | $dec > "$out" 2>/dev/null || true
  [[ "$(od -An -tx1 -N4 "$out" | tr -d ' ')" == "7f454c46" ]] || die "could not extract vmlinux from $img"
}
[[ -x "$agent" ]] || die "agent binary '$agent' does not exist or is not executable"
crun=$("$here/crun.sh") || die "no crun for the guest (vm-images/crun.sh failed, above)"
command -v depmod >/dev/null || die "depmod is missing (Debian package kmod)"
command -v cpio >/dev/null || die "cpio is missing (Debian package cpio)"
command -v xz >/dev/null || die "xz is missing (Debian package xz-utils)"

kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[[ -n "$kpkg" ]] || die "cannot resolve linux-image-amd64 (run apt-get update)"
kver=${kpkg#linux-image-}

key=$(
  {
    echo "$kpkg"
    apt-cache policy "$kpkg" | awk '/Candidate/ {print $2}'
    sha256sum "$agent" "$crun" "$here/build.sh" | awk '{print $1}'
    printf '%s\n' "${modules[@]}" "${ondemand[@]}" "$cmdline"
  } | sha256sum | cut -c1-16
)
if [[ -f "$out/.key" && "$(cat "$out/.key")" == "$key" && -f "$out/vmlinux" && -f "$out/initrd.img" ]]; then
  echo "vm-images: up to date ($kpkg, key $key)"
else
  mkdir -p "$cache/debs"
  deb=$(ls "$cache/debs/${kpkg}_"*.deb 2>/dev/null | head -1 || true)
  if [[ -z "$deb" ]]; then
    echo "vm-images: downloading $kpkg"
    (cd "$cache/debs" && apt-get download -q "$kpkg" 2>&1 | grep -v 'unsandboxed' || true)
    deb=$(ls "$cache/debs/${kpkg}_"*.deb 2>/dev/null | head -1 || true)
    [[ -n "$deb" ]] || die "apt-get download $kpkg failed"
  fi

  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  dpkg-deb -x "$deb" "$work/k"
  depmod -b "$work/k" "$kver"
  root="$work/root"
  mkdir -p "$root"/{proc,sys,dev,run,tmp,etc/peapod,usr/bin,lib/modules/"$kver"}

  # Modules and their dependencies, dependencies first, each once.
  declare -A seen=()
  order=()
  add_module() {
    local name=$1 line path dep
    # Module names use '_' where file names may use '-' (virtio_rng is virtio-rng.ko).
    line=$(grep -E "/${name//_/[_-]}\.ko:" "$work/k/lib/modules/$kver/modules.dep" | head -1) ||
      die "module $name not found in $kpkg"
    path=${line%%:*}
    [[ -n "${seen[$path]:-}" ]] && return
    for dep in ${line#*:}; do add_module "$(basename "$dep" .ko)"; done
    seen[$path]=1
    order+=("$path")
  }
  # Writes the modules added since the last call to list $1.
  copy_modules() {
    local p
    for p in "${order[@]}"; do
      mkdir -p "$root/lib/modules/$kver/$(dirname "$p")"
      cp "$work/k/lib/modules/$kver/$p" "$root/lib/modules/$kver/$p"
      echo "/lib/modules/$kver/$p" >> "$1"
    done
    order=()
  }
  for m in "${modules[@]}"; do add_module "$m"; done
  copy_modules "$root/etc/peapod/modules"
  # Each on-demand list holds its module's whole closure beyond the boot list (two lists may
  # share a dependency: whichever loads first loads it).
  declare -A boot_seen=()
  for k in "${!seen[@]}"; do boot_seen[$k]=1; done
  for m in "${ondemand[@]}"; do
    seen=()
    for k in "${!boot_seen[@]}"; do seen[$k]=1; done
    add_module "$m"
    copy_modules "$root/etc/peapod/modules.$m"
    while read -r alias; do
      [[ -z "$alias" || "$alias" == "$m" || "$alias" =~ [/*?:\[] ]] && continue
      [[ -e "$root/etc/peapod/modules.$alias" ]] || ln -s "modules.$m" "$root/etc/peapod/modules.$alias"
    done < <(modinfo -b "$work/k" -k "$kver" -F alias "$m" 2>/dev/null)
  done

  # Programs and the shared libraries they load (the ldd closure, keeping paths).
  install -m 0755 "$agent" "$root/init"
  strip --strip-unneeded "$root/init"  # debug info stays in the build tree
  install -m 0755 "$crun" "$root/usr/bin/crun"
  for bin in "$agent" "$crun"; do
    # A static binary has no closure (ldd fails on it).
    hdr=$(readelf -lW "$bin") || die "$bin is not an ELF program readelf can read"
    [[ "$hdr" == *"program interpreter"* ]] || continue
    ldd "$bin" | awk '/=> \// {print $3} /^[ \t]*\/lib/ {print $1}' | while read -r lib; do
      mkdir -p "$root$(dirname "$lib")"
      cp -L "$lib" "$root$lib"
    done
  done
  ln -s usr/bin "$root/bin"
  mkdir -p "$root/sbin"
  ln -s ../init "$root/sbin/modprobe"  # the kernel's module requests (see ondemand above)
  echo "root:x:0:0:root:/:/bin/sh" > "$root/etc/passwd"
  echo "root:x:0:" > "$root/etc/group"

  mkdir -p "$out"
  cp "$work/k/boot/vmlinuz-$kver" "$out/vmlinuz.tmp"
  extract_vmlinux "$out/vmlinuz.tmp" "$out/vmlinux.tmp"
  grep -q '^CONFIG_PVH=y' "$work/k/boot/config-$kver" || die "$kpkg has no PVH entry point"
  (cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet -R 0:0) \
    > "$out/initrd.img.tmp"
  mv "$out/vmlinuz.tmp" "$out/vmlinuz"
  mv "$out/vmlinux.tmp" "$out/vmlinux"
  echo "$cmdline" > "$out/cmdline"
  mv "$out/initrd.img.tmp" "$out/initrd.img"
  echo "$kver" > "$out/kernel-release"
  echo "$key" > "$out/.key"
fi
printf 'vm-images: kernel %s: vmlinuz %s bytes, vmlinux (PVH) %s bytes; initrd: %s bytes\n' \
  "$(cat "$out/kernel-release")" "$(stat -c %s "$out/vmlinuz")" "$(stat -c %s "$out/vmlinux")" \
  "$(stat -c %s "$out/initrd.img")"
