#!/usr/bin/env bash
# Builds the Kubernetes binaries of one pinned release from its Go module, for the one-node
# Kubernetes peapod is tested on (k8s/node.sh): kubelet, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, e2e_node.test (the node conformance suite, `go test -c`), agnhost
# (the e2e tests' own test image program) and etcd (a small main over etcd's embed package,
# k8s/etcd/main.go, built against the etcd release that Kubernetes release pins).
#
#   k8s/build.sh [--print-dir]      build what is missing; --print-dir: print the bin dir
#   k8s/build.sh --print-src        print the release's source dir in the Go module cache
#                                   (fetched if missing), e.g. for its test images' files
#
# The release is k8s/VERSION. Its module from the Go proxy has no ./staging tree (those are
# modules of their own), so a copy of it is built with the 31 `./staging` replaces dropped in
# favour of the published k8s.io/* modules of the same release (v0.<minor>.<patch>) and the
# k8s.io/sample-* requires (examples the proxy does not serve) dropped. Cached in
# $PEAPOD_K8S_CACHE (default /var/cache/peapod/k8s-<version>/bin); a .stamp marks a finished
# build, and a run with the stamp in place does nothing. About 15 minutes on 2 cores the first
# time (GOFLAGS=-p=2).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
version=$(tr -d ' \n' <"$here/VERSION")
[[ $version =~ ^v1\.([0-9]+)\.([0-9]+)$ ]] || { echo "k8s/build.sh: bad VERSION '$version'" >&2; exit 2; }
staging_version="v0.${BASH_REMATCH[1]}.${BASH_REMATCH[2]}"
cache=${PEAPOD_K8S_CACHE:-/var/cache/peapod/k8s-$version}
bin=$cache/bin
# Bump when the recipe changes, so a cache built by the old one is rebuilt.
recipe=2
stamp=$cache/.stamp-$recipe

log() { echo "k8s/build.sh: $*" >&2; }
print_dir=0
[[ ${1:-} == --print-dir ]] && print_dir=1
# The release's module source: go mod download prints where it is.
source_dir() {
  GOTOOLCHAIN=${GOTOOLCHAIN:-local} GOWORK=off go mod download -json "k8s.io/kubernetes@$version" |
    sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p'
}
if [[ ${1:-} == --print-src ]]; then
  src=$(source_dir)
  [[ -d $src ]] || { log "go mod download gave no directory"; exit 1; }
  echo "$src"
  exit 0
fi

if [[ -e $stamp ]]; then
  ((print_dir)) && echo "$bin"
  exit 0
fi
export GOTOOLCHAIN=${GOTOOLCHAIN:-local} GOWORK=off GOFLAGS="-mod=mod ${GOFLAGS:-}"
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9
if [[ -e $stamp ]]; then
  ((print_dir)) && echo "$bin"
  exit 0
fi

log "fetching k8s.io/kubernetes@$version"
src=$(source_dir)
[[ -d $src ]] || { log "go mod download gave no directory"; exit 1; }
work=$(mktemp -d /tmp/peapod-k8s-XXXXXX)
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT
cp -r "$src" "$work/k"
chmod -R u+w "$work/k"
cd "$work/k"
rm -f go.work go.work.sum
edits=()
while read -r mod; do
  edits+=("-dropreplace=$mod")
  case $mod in
  k8s.io/sample-*) edits+=("-droprequire=$mod") ;;
  *) edits+=("-require=$mod@$staging_version") ;;
  esac
done < <(sed -n 's/^[[:space:]]*\(k8s\.io\/[^ ]*\) => \.\/staging\/.*/\1/p' go.mod)
((${#edits[@]} > 60)) || { log "expected ~31 staging replaces, found $((${#edits[@]} / 2))"; exit 1; }
go mod edit "${edits[@]}"
# etcd: a main over its embed package, in the same module (etcd is already one of its deps).
mkdir -p cmd/peapod-etcd
cp "$here/etcd/main.go" cmd/peapod-etcd/main.go

mkdir -p "$work/bin"
log "building kubelet, kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, etcd"
go build -trimpath -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=$version \
  -X k8s.io/client-go/pkg/version.gitVersion=$version" -o "$work/bin/" \
  ./cmd/kubelet ./cmd/kube-apiserver ./cmd/kube-controller-manager ./cmd/kube-scheduler \
  ./cmd/kubectl ./cmd/peapod-etcd
mv "$work/bin/peapod-etcd" "$work/bin/etcd"
log "building e2e_node.test"
go test -c -trimpath -o "$work/bin/e2e_node.test" ./test/e2e_node
CGO_ENABLED=0 go build -trimpath -o "$work/bin/" ./test/images/agnhost
rm -rf "$bin"
mv "$work/bin" "$bin"
touch "$stamp"
log "done: $bin"
((print_dir)) && echo "$bin"
exit 0
