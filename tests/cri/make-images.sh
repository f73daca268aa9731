#!/usr/bin/env bash
# Builds the test images as OCI image-layout tarballs that `ctr images import` takes, from
# Debian's busybox-static (no registry, no network):
#   OUT/busybox.tar  docker.io/peapod/busybox:test   Cmd ["sh"]
#   OUT/pause.tar    registry.local/peapod/pause:test   Cmd ["sleep", "2147483647"]
set -euo pipefail
out=${1:?usage: make-images.sh OUT_DIR}
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

root=$work/rootfs
mkdir -p "$root"/{bin,etc,proc,sys,dev,tmp,run}
cp /bin/busybox "$root/bin/"
for a in sh echo cat sleep ls hostname head uname ps ip wc true dd mkdir httpd nc wget sha256sum tee \
  tr sed rm touch nproc grep; do ln -s busybox "$root/bin/$a"; done

# image REF CMD_JSON TARBALL
image() { "$(dirname "$0")/../../scripts/oci-image.sh" "$root" "$1" "$2" "$3" /bin; }

image docker.io/peapod/busybox:test '["sh"]' "$out/busybox.tar"
image registry.local/peapod/pause:test '["sleep","2147483647"]' "$out/pause.tar"
