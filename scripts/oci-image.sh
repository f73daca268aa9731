#!/usr/bin/env bash
# Packs a root filesystem directory into a one-layer OCI image layout tarball that
# `ctr images import` takes, named REF. The one packer of the test images (tests/cri, k8s).
#
#   scripts/oci-image.sh ROOTFS_DIR REF CMD_JSON OUT.tar [PATH] [ENTRYPOINT_JSON]
#
# PATH: the image's PATH (default /bin:/usr/bin:/sbin:/usr/sbin).
# ENTRYPOINT_JSON: the image's entrypoint; a pod's args then replace only CMD_JSON, as with
# agnhost, whose subcommand is the pod's first arg. Without it the config has no Entrypoint.
set -euo pipefail
root=${1:?usage: oci-image.sh ROOTFS_DIR REF CMD_JSON OUT.tar [PATH] [ENTRYPOINT_JSON]}
ref=${2:?} cmd=${3:?} out=${4:?} path=${5:-/bin:/usr/bin:/sbin:/usr/sbin} entrypoint=${6:-}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
sha() { sha256sum "$1" | cut -d' ' -f1; }
size() { stat -c %s "$1"; }
tar --sort=name --owner=0 --group=0 --mtime=@0 -C "$root" -cf "$work/layer.tar" .
d=$work/oci
mkdir -p "$d/blobs/sha256"
l=$(sha "$work/layer.tar")
cp "$work/layer.tar" "$d/blobs/sha256/$l"
printf '{"architecture":"amd64","os":"linux","config":{"Env":["PATH=%s"],%s"Cmd":%s},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
  "$path" "${entrypoint:+\"Entrypoint\":$entrypoint,}" "$cmd" "$l" >"$work/config.json"
c=$(sha "$work/config.json")
cp "$work/config.json" "$d/blobs/sha256/$c"
printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' \
  "$c" "$(size "$work/config.json")" "$l" "$(size "$work/layer.tar")" >"$work/manifest.json"
m=$(sha "$work/manifest.json")
cp "$work/manifest.json" "$d/blobs/sha256/$m"
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"org.opencontainers.image.ref.name":"%s"},"platform":{"architecture":"amd64","os":"linux"}}]}' \
  "$m" "$(size "$work/manifest.json")" "$ref" >"$d/index.json"
echo '{"imageLayoutVersion":"1.0.0"}' >"$d/oci-layout"
tar -C "$d" -cf "$out" .
