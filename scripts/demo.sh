#!/usr/bin/env bash
# `make demo`: runs the furthest real piece of peapod end to end.
#
# Today that is the inside of a pod: the guest kernel + initrd built from Debian packages
# (vm-images/) booted in QEMU (TCG here), peapod-agent as its PID 1, and two crun containers
# from a locally built busybox EROFS layer running in that one VM, driven over the
# virtio-serial channel with peapod's C++ ttrpc. Then the transport check against the
# reference Go ttrpc. When the sandboxer and shim land, this script will start containerd 2.x
# and run a pod with crictl instead.
set -euo pipefail
build=${1:-build}
cd "$(dirname "$0")/.."

echo "== host kernel: $(uname -r)"
echo "== one VM, two containers (boot the guest, run c1 and c2, compare what they see)"
"$build/tests/vm/peapod_vm_tests" --gtest_color=no \
  --gtest_filter='AgentContainersTest.TwoContainers*:AgentVmTest.*' 2>&1 |
  grep -E '^(agent ready|c1:|c2:|\[ +(OK|FAILED|SKIPPED) +\]|.*Failure)'

echo "== C++ ttrpc <-> Go reference ttrpc (github.com/containerd/ttrpc, pinned)"
(cd "$build" && ctest -R interop_build_go --output-on-failure >/dev/null)
"$build/tests/interop/peapod_interop_tests" --gtest_color=no 2>&1 |
  grep -E '^(PASS|FAIL|go client:|\[ +(OK|FAILED) +\])'
