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
# busybox's layer from the critest image: the base of the suite's busybox and agnhost.
mkdir -p "$work/busybox/rootfs"
tar -C "$work/busybox/rootfs" -xf <(python3 - "$work/cri/images.tar" <<'PY'
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
# The suite's busybox has every applet in /bin (tests run /bin/top and /bin/sysctl, which
# Debian puts in /usr/bin and /sbin) and nmeter, which Debian's build lacks: the lifecycle tests
# take the time with milliseconds from `nmeter -d0 '%3t'`; a stand-in prints that line (from
# adjtimex's clock) until its reader goes.
bb=$work/busybox/rootfs
[[ -x $bb/bin/busybox ]] || { log "no busybox in the critest busybox image"; exit 1; }
for applet in $(chroot "$bb" /bin/busybox --list); do
  [[ -e $bb/bin/$applet ]] || ln "$bb/bin/busybox" "$bb/bin/$applet"
done
cat >"$bb/bin/nmeter" <<'SH'
#!/bin/sh
# nmeter stand-in: only `nmeter -d0 '%3t'`, the e2e suite's use: HH:MM:SS.mmm, a line at a time.
while :; do
  set -- $(adjtimex | awk '/time.tv_sec/ {s = $2} /time.tv_usec/ {u = $2} END {print s, int(u / 1000)}')
  printf '%s.%03d\n' "$(date -u -d "@$1" +%H:%M:%S)" "$2" || exit 0
done
SH
chmod 755 "$bb/bin/nmeter"
"$repo/scripts/oci-image.sh" "$bb" registry.k8s.io/e2e-test-images/busybox:1.37.0-1 '["sh"]' \
  "$work/busybox.tar"
# agnhost: the release's program on that busybox, laid out as its image is: /agnhost-2 (the
# entrypoint tests), porter's localhost certificate and key in / (netexec's TLS), /uploads,
# curl and nc, and the user and group the image defines.
ksrc=$("$here/build.sh" --print-src)
[[ -d $ksrc/test/images/agnhost/porter ]] || { log "no agnhost sources in $ksrc"; exit 1; }
ag=$work/agnhost/rootfs
mkdir -p "$ag"
cp -a "$bb/." "$ag/"
cp "$kbin/agnhost" "$ag/agnhost"
ln -s agnhost "$ag/agnhost-2"
install -m 644 "$ksrc/test/images/agnhost/porter/localhost.crt" \
  "$ksrc/test/images/agnhost/porter/localhost.key" "$ag/"
mkdir -p "$ag/uploads"
# curl and netcat-openbsd's nc, which the networking specs run inside agnhost pods (`nc -u`:
# busybox's nc has no UDP), Debian's, with their libraries.
dpkg-deb -x "$("$repo/scripts/cached-deb.sh" netcat-openbsd)" "$work/netcat"
cp /usr/bin/curl "$ag/usr/bin/curl"
cp "$work/netcat/bin/nc.openbsd" "$ag/bin/nc.openbsd"
for nc in "$ag/bin/nc" "$ag/usr/bin/nc"; do rm -f "$nc" && ln -s /bin/nc.openbsd "$nc"; done
"$repo/scripts/copy-libs.sh" "$ag" /usr/bin/curl "$work/netcat/bin/nc.openbsd"
echo 'user-defined-in-image:x:1000:1000::/home/user-defined-in-image:/bin/sh' >>"$ag/etc/passwd"
printf '%s\n' 'user-defined-in-image:x:1000:' \
  'group-defined-in-image:x:50000:user-defined-in-image' >>"$ag/etc/group"
"$repo/scripts/oci-image.sh" "$ag" registry.k8s.io/e2e-test-images/agnhost:2.56 \
  '["pause"]' "$work/agnhost.tar" /bin:/usr/bin:/sbin:/usr/sbin '["/agnhost"]'

declare -A retag=(
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
  "${ctr[@]}" images import "$work/busybox.tar" >/dev/null
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
    --node-name=peapod-node --kubectl-path="$kbin/kubectl" --dns-domain=cluster.local \
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
# The report compares every handler with the first: runc, when it ran, is the baseline.
report=()
for h in $handlers; do
  if [[ $h == runc ]]; then report=("$h=$repo/k8s/results-$h.xml" "${report[@]}"); else report+=("$h=$repo/k8s/results-$h.xml"); fi
done
python3 "$here/conformance_report.py" --out "$out" "${report[@]}"
log "report: $out"
