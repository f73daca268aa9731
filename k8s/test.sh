#!/usr/bin/env bash
# kubectl workloads on a real one-node Kubernetes whose pods run in peapod VMs (CTest label
# k8s; `make test` runs it). Installs peapod from the build (`cmake --install`, as `make install`
# does), builds or reuses the Kubernetes binaries (k8s/build.sh), brings the node up
# (k8s/node.sh), runs each workload, and always takes the node down.
#
#   k8s/test.sh BUILD_DIR [WORKLOAD...]     (all workloads by default)
#
# Exit 77 (CTest: skipped) where this host cannot run it, saying why.
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
build=$(cd "${1:?usage: k8s/test.sh BUILD_DIR [WORKLOAD...]}" && pwd)
shift
skip() { echo "k8s/test.sh: SKIPPED: $*"; exit 77; }
[[ $(id -u) == 0 ]] || skip "needs root (a kubelet, containerd and VMs)"
[[ -x $build/sandboxer/peapod-sandboxer ]] || skip "$build is not built"
command -v go >/dev/null || skip "no Go toolchain (scripts/install-deps.sh installs it)"

dir=/tmp/ppk8s-test
passed=0 failed=0
failures=()
log() { echo "k8s/test.sh: $*"; }

cleanup() { "$here/node.sh" down --dir "$dir" >/dev/null 2>&1 || true; }
trap cleanup EXIT

log "installing peapod from $build"
cmake --install "$build" --prefix /usr/local --strip >/dev/null || { log "install failed"; exit 1; }
"$here/node.sh" down --dir "$dir" >/dev/null 2>&1 || true
env_line=$("$here/node.sh" up --dir "$dir" --stop-after 3600) || { log "the node did not come up"; exit 1; }
eval "$env_line"
guest_kernel=$(cat /usr/local/share/peapod/kernel-release)

# --------------------------------------------------------------- helpers

k() { kubectl "$@"; }
# wait_pod NAME PHASE|Ready SECONDS
wait_pod() {
  k wait --for="$2" "pod/$1" --timeout="${3:-300}s" >/dev/null
}
fail() { echo "  FAIL: $*"; return 1; }
expect_eq() { [[ $1 == "$2" ]] || fail "$3: got '$1', want '$2'"; }

# --------------------------------------------------------------- workloads

# A pod of two containers and an init container sharing an emptyDir, in one VM.
w_shared_volume_pod() {
  k apply -f - <<'YAML' >/dev/null
apiVersion: v1
kind: Pod
metadata: {name: shared}
spec:
  runtimeClassName: peapod
  terminationGracePeriodSeconds: 2
  volumes: [{name: work, emptyDir: {}}]
  initContainers:
  - {name: init, image: docker.io/peapod/busybox:test, imagePullPolicy: Never,
     command: [sh, -c, "echo from-init > /work/init.txt"],
     volumeMounts: [{name: work, mountPath: /work}]}
  containers:
  - {name: a, image: docker.io/peapod/busybox:test, imagePullPolicy: Never,
     command: [sh, -c, "echo from-a > /work/a.txt; exec sleep 3600"],
     volumeMounts: [{name: work, mountPath: /work}]}
  - {name: b, image: docker.io/peapod/busybox:test, imagePullPolicy: Never,
     command: [sh, -c, "exec sleep 3600"],
     volumeMounts: [{name: work, mountPath: /work}]}
YAML
  wait_pod shared condition=Ready 300 || return 1
  expect_eq "$(k exec shared -c b -- cat /work/init.txt)" from-init "init's file seen by b" || return 1
  expect_eq "$(k exec shared -c b -- cat /work/a.txt)" from-a "a's file seen by b" || return 1
  expect_eq "$(k exec shared -c a -- uname -r)" "$guest_kernel" "a's kernel" || return 1
  expect_eq "$(k exec shared -c b -- cat /proc/sys/kernel/random/boot_id)" \
    "$(k exec shared -c a -- cat /proc/sys/kernel/random/boot_id)" "one VM for both" || return 1
  [[ $(k exec shared -c a -- cat /proc/sys/kernel/random/boot_id) != $(cat /proc/sys/kernel/random/boot_id) ]] ||
    fail "the pod shares the host's kernel" || return 1
  k delete pod shared --wait=true --timeout=120s >/dev/null
}

# kubectl logs -f and exec -i with stdin.
w_logs_and_stdin() {
  k run talk --image=docker.io/peapod/busybox:test --image-pull-policy=Never \
    --overrides='{"spec":{"runtimeClassName":"peapod","terminationGracePeriodSeconds":2}}' \
    --command -- sh -c 'i=0; while true; do echo line-$i; i=$((i+1)); sleep 0.2; done' >/dev/null
  wait_pod talk condition=Ready 300 || return 1
  local lines
  lines=$(timeout 10 kubectl logs -f talk | head -5 | tr '\n' ' ')
  expect_eq "$lines" "line-0 line-1 line-2 line-3 line-4 " "logs -f" || return 1
  local sum want
  want=$(head -c 1048576 /dev/urandom | tee /tmp/ppk8s-stdin | sha256sum | cut -d' ' -f1)
  sum=$(k exec -i talk -- sha256sum </tmp/ppk8s-stdin | cut -d' ' -f1)
  rm -f /tmp/ppk8s-stdin
  expect_eq "$sum" "$want" "1 MiB through exec -i" || return 1
  k delete pod talk --wait=true --timeout=120s >/dev/null
}

# A Job that runs to completion.
w_job() {
  k apply -f - <<'YAML' >/dev/null
apiVersion: batch/v1
kind: Job
metadata: {name: once}
spec:
  backoffLimit: 0
  template:
    spec:
      runtimeClassName: peapod
      restartPolicy: Never
      containers:
      - {name: c, image: docker.io/peapod/busybox:test, imagePullPolicy: Never,
         command: [sh, -c, "uname -r; exit 0"]}
YAML
  k wait --for=condition=complete job/once --timeout=300s >/dev/null || return 1
  expect_eq "$(k logs job/once)" "$guest_kernel" "the job's output" || return 1
  k delete job once --cascade=foreground --wait=true --timeout=120s >/dev/null
}

# Deleting the pods leaves nothing of them on the node.
w_nothing_left() {
  local qemus records
  for _ in $(seq 60); do
    qemus=$(pgrep -fc 'qemu-system.*peapod-' || true)
    records=$(find /var/lib/peapod/pods -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
    ((qemus == 0 && records == 0)) && break
    sleep 1
  done
  expect_eq "$qemus" 0 "QEMUs left" || return 1
  expect_eq "$records" 0 "pod records left" || return 1
  expect_eq "$(find /run/peapod/pods -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)" 0 "run dirs left"
}

all=(shared_volume_pod logs_and_stdin job nothing_left)
want=("${@:-${all[@]}}")
for w in "${want[@]}"; do
  log "--- $w"
  if "w_$w"; then
    passed=$((passed + 1))
    log "ok   $w"
  else
    failed=$((failed + 1))
    failures+=("$w")
    log "FAIL $w"
    k get pods -A -o wide 2>&1 | sed 's/^/  /'
    # What it left goes, so the next workload starts clean.
    k delete jobs,pods --all --wait=true --timeout=120s >/dev/null 2>&1
  fi
done
log "$passed passed, $failed failed${failures:+: ${failures[*]}}"
((failed == 0))
