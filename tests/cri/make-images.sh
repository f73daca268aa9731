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
tar --sort=name --owner=0 --group=0 --mtime=@0 -C "$root" -cf "$work/layer.tar" .

sha() { sha256sum "$1" | cut -d' ' -f1; }
size() { stat -c %s "$1"; }

# image REF CMD_JSON TARBALL
image() {
  local ref=$1 cmd=$2 tarball=$3 d=$work/oci l c m
  rm -rf "$d" && mkdir -p "$d/blobs/sha256"
  l=$(sha "$work/layer.tar")
  cp "$work/layer.tar" "$d/blobs/sha256/$l"
  printf '{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin"],"Cmd":%s},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
    "$cmd" "$l" > "$work/config.json"
  c=$(sha "$work/config.json")
  cp "$work/config.json" "$d/blobs/sha256/$c"
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' \
    "$c" "$(size "$work/config.json")" "$l" "$(size "$work/layer.tar")" > "$work/manifest.json"
  m=$(sha "$work/manifest.json")
  cp "$work/manifest.json" "$d/blobs/sha256/$m"
  printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"org.opencontainers.image.ref.name":"%s"},"platform":{"architecture":"amd64","os":"linux"}}]}' \
    "$m" "$(size "$work/manifest.json")" "$ref" > "$d/index.json"
  echo '{"imageLayoutVersion":"1.0.0"}' > "$d/oci-layout"
  tar -C "$d" -cf "$tarball" .
}

image docker.io/peapod/busybox:test '["sh"]' "$out/busybox.tar"
image registry.local/peapod/pause:test '["sleep","2147483647"]' "$out/pause.tar"
