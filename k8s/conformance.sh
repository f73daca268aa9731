#!/usr/bin/env bash
# Kubernetes' node conformance suite (test/e2e_node of the pinned release, [NodeConformance]
# focus) on the one-node Kubernetes of k8s/node.sh, once with containerd's default runtime
# handler runc and once with peapod, side by side in docs/k8s-conformance.md. Long (hours under
# TCG): not part of `make test`.
#
#   k8s/conformance.sh [--focus REGEX] [--skip REGEX] [--handlers "runc peapod"] [--procs N]
#                      [--out FILE]
#
# Specs run in N ginkgo processes at once (default 3; the focus leaves out [Serial] ones, as
# Kubernetes' own node e2e jobs do when they run in parallel). The ginkgo CLI of the release's
# pinned version is built once next to the Kubernetes binaries.
#
# Images: the suite's test images are made here without a registry or network: busybox from
# Debian's busybox (cri-tests/make-images.sh), agnhost built from the release's own source
# (k8s/build.sh), nginx, httpd, nonewprivs and pause as critest's; each imported under the name
# the suite uses, so pods find them present and nothing is pulled.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
focus='\[NodeConformance\]'
skip='\[Serial\]|\[Slow\]|\[Flaky\]|\[Disruptive\]|\[Feature:|\[Alpha\]|\[LinuxOnly\].*Windows'
handlers="runc peapod"
procs=3
out=$repo/docs/k8s-conformance.md
while (($#)); do
  case $1 in
  --focus) focus=${2:?} && shift ;;
  --skip) skip=${2:?} && shift ;;
  --handlers) handlers=${2:?} && shift ;;
  --out) out=${2:?} && shift ;;
  --procs) procs=${2:?} && shift ;;
  -h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//' && exit 0 ;;
  *) echo "conformance.sh: unknown argument '$1'" >&2 && exit 2 ;;
  esac
  shift
done
log() { echo "conformance.sh: $*" >&2; }
kbin=$("$here/build.sh" --print-dir)
ctd=$("$repo/scripts/go-tools.sh" --print-path containerd)
# The ginkgo CLI runs specs in parallel processes; its version must be the suite's.
ginkgo_version=$({ grep -a -o -m1 'onsi/ginkgo/v2@v[0-9.]*[0-9]' "$kbin/e2e_node.test" || true; } | sed -n 1p)
ginkgo_version=${ginkgo_version#*@}
[[ -n $ginkgo_version ]] || { log "cannot tell e2e_node.test's ginkgo version"; exit 1; }
ginkgo_dir=$(dirname "$kbin")/ginkgo-$ginkgo_version
if ! [[ -x $ginkgo_dir/ginkgo ]]; then
  log "building the ginkgo CLI $ginkgo_version"
  GOTOOLCHAIN=local GOBIN=$ginkgo_dir go install "github.com/onsi/ginkgo/v2/ginkgo@$ginkgo_version"
fi
work=$(mktemp -d /tmp/ppconf-XXXXXX)
dir=/tmp/ppk8s-conf
trap '"$here/node.sh" down --dir "$dir" >/dev/null 2>&1; rm -rf "$work"' EXIT

# ---------------------------------------------------------------- images
log "building the test images"
"$repo/cri-tests/make-images.sh" "$work/cri" >/dev/null
# agnhost: the release's program on busybox (some tests run a shell in it).
mkdir -p "$work/agnhost/rootfs"
tar -C "$work/agnhost/rootfs" -xf <(python3 - "$work/cri/images.tar" <<'PY'
import json, sys, tarfile
t = tarfile.open(sys.argv[1])
names = set(t.getnames())
get = lambda n: t.extractfile(n if n in names else "./" + n)
idx = json.load(get("index.json"))
for m in idx["manifests"]:
    if m["annotations"]["org.opencontainers.image.ref.name"].endswith("busybox:1.29-2"):
        man = json.load(get("blobs/sha256/" + m["digest"].split(":")[1]))
        layer = man["layers"][0]["digest"].split(":")[1]
        sys.stdout.buffer.write(get("blobs/sha256/" + layer).read())
        break
PY
)
cp "$kbin/agnhost" "$work/agnhost/rootfs/agnhost"
"$repo/scripts/oci-image.sh" "$work/agnhost/rootfs" registry.k8s.io/e2e-test-images/agnhost:2.56 \
  '["pause"]' "$work/agnhost.tar" /bin:/usr/bin:/sbin:/usr/sbin '["/agnhost"]'

declare -A retag=(
  [registry.k8s.io/e2e-test-images/busybox:1.37.0-1]=registry.k8s.io/e2e-test-images/busybox:1.29-2
  [registry.k8s.io/e2e-test-images/nginx:1.14-4]=registry.k8s.io/e2e-test-images/nginx:1.14-2
  [registry.k8s.io/e2e-test-images/nginx:1.15-4]=registry.k8s.io/e2e-test-images/nginx:1.14-2
  [registry.k8s.io/e2e-test-images/httpd:2.4.38-4]=registry.k8s.io/e2e-test-images/httpd:2.4.39-4
  [registry.k8s.io/e2e-test-images/nonewprivs:1.3]=registry.k8s.io/e2e-test-images/nonewprivs:1.3
  [registry.k8s.io/pause:3.10.1]=registry.k8s.io/pause:3.10.1
)

import_images() {
  local ctr=("$ctd/ctr" -a "$dir/containerd.sock" -n k8s.io)
  "${ctr[@]}" images import "$work/cri/images.tar" >/dev/null
  "${ctr[@]}" images import "$work/agnhost.tar" >/dev/null
  for want in "${!retag[@]}"; do
    [[ $want == "${retag[$want]}" ]] || "${ctr[@]}" images tag --force "${retag[$want]}" "$want" >/dev/null
  done
}

# ---------------------------------------------------------------- runs
for h in $handlers; do
  log "=== handler $h"
  "$here/node.sh" down --dir "$dir" >/dev/null 2>&1 || true
  eval "$("$here/node.sh" up --dir "$dir" --default-runtime "$h" --stop-after 14400)"
  import_images
  mkdir -p "$work/report-$h"
  set +e
  "$ginkgo_dir/ginkgo" --procs="$procs" --focus="$focus" --skip="$skip" --no-color \
    --junit-report="$work/report-$h/junit.xml" --timeout=6h "$kbin/e2e_node.test" -- \
    --start-services=false --stop-services=false \
    --host=https://127.0.0.1:6443 --bearer-token="$(cut -d, -f1 "$dir/pki/tokens.csv")" \
    --node-name=peapod-node --kubectl-path="$kbin/kubectl" \
    --container-runtime-endpoint="unix://$dir/containerd.sock" \
    --prepull-images=false --report-dir="$work/report-$h" \
    >"$work/report-$h/e2e.log" 2>&1
  echo "rc $?" >>"$work/report-$h/e2e.log"
  set -e
  cp "$work/report-$h/junit.xml" "$repo/k8s/results-$h.xml" 2>/dev/null || true
  cp "$work/report-$h/e2e.log" "/tmp/ppconf-e2e-$h.log" 2>/dev/null || true
  tail -5 "$work/report-$h/e2e.log" >&2
  "$here/node.sh" down --dir "$dir" >/dev/null 2>&1 || true
done
python3 "$here/conformance_report.py" --out "$out" \
  $(for h in $handlers; do echo "$h=$repo/k8s/results-$h.xml"; done)
log "report: $out"
