#!/usr/bin/env bash
# Builds the guest kernel and initrd for peapod pods from Debian packages only.
#
#   vm-images/build.sh OUT_DIR AGENT_BINARY
#
# OUT_DIR gets vmlinuz (Debian's generic kernel, linux-image-amd64's current version) and
# initrd.img (uncompressed newc cpio) holding:
#   /init                      peapod-agent (PID 1)
#   /usr/bin/crun              crun from the Debian package, with every shared library it and
#   /lib/..., /lib64/...       the agent need (their ldd closure)
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
modules=(virtio_pci virtio_console virtio_scsi sd_mod virtio_net 9pnet_virtio 9p crc32c_generic erofs overlay
         vmw_vsock_virtio_transport virtio_rng)

die() { echo "vm-images: $*" >&2; exit 1; }
[[ -x "$agent" ]] || die "agent binary '$agent' does not exist or is not executable"
crun=$(command -v crun) || die "crun is not installed (scripts/install-deps.sh installs it)"
command -v depmod >/dev/null || die "depmod is missing (Debian package kmod)"
command -v cpio >/dev/null || die "cpio is missing (Debian package cpio)"

kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[[ -n "$kpkg" ]] || die "cannot resolve linux-image-amd64 (run apt-get update)"
kver=${kpkg#linux-image-}

key=$(
  {
    echo "$kpkg"
    apt-cache policy "$kpkg" | awk '/Candidate/ {print $2}'
    dpkg-query -W -f='${Version}' crun
    sha256sum "$agent" "$here/build.sh" | awk '{print $1}'
    printf '%s\n' "${modules[@]}"
  } | sha256sum | cut -c1-16
)
if [[ -f "$out/.key" && "$(cat "$out/.key")" == "$key" && -f "$out/vmlinuz" && -f "$out/initrd.img" ]]; then
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
  for m in "${modules[@]}"; do add_module "$m"; done
  for p in "${order[@]}"; do
    mkdir -p "$root/lib/modules/$kver/$(dirname "$p")"
    cp "$work/k/lib/modules/$kver/$p" "$root/lib/modules/$kver/$p"
    echo "/lib/modules/$kver/$p" >> "$root/etc/peapod/modules"
  done

  # Programs and the shared libraries they load (the ldd closure, keeping paths).
  install -m 0755 "$agent" "$root/init"
  strip --strip-unneeded "$root/init"  # debug info stays in the build tree
  install -m 0755 "$crun" "$root/usr/bin/crun"
  for bin in "$agent" "$crun"; do
    ldd "$bin" | awk '/=> \// {print $3} /^[ \t]*\/lib/ {print $1}' | while read -r lib; do
      mkdir -p "$root$(dirname "$lib")"
      cp -L "$lib" "$root$lib"
    done
  done
  ln -s usr/bin "$root/bin"
  echo "root:x:0:0:root:/:/bin/sh" > "$root/etc/passwd"
  echo "root:x:0:" > "$root/etc/group"

  mkdir -p "$out"
  cp "$work/k/boot/vmlinuz-$kver" "$out/vmlinuz.tmp"
  (cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet -R 0:0) \
    > "$out/initrd.img.tmp"
  mv "$out/vmlinuz.tmp" "$out/vmlinuz"
  mv "$out/initrd.img.tmp" "$out/initrd.img"
  echo "$kver" > "$out/kernel-release"
  echo "$key" > "$out/.key"
fi
printf 'vm-images: kernel %s: %s bytes; initrd: %s bytes\n' "$(cat "$out/kernel-release")" \
  "$(stat -c %s "$out/vmlinuz")" "$(stat -c %s "$out/initrd.img")"
