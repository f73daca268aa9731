#!/usr/bin/env bash
# `make demo`: runs the furthest real piece of peapod end to end.
#
# Today that is the transport every peapod process will speak: peapod's C++ ttrpc exchanging
# calls with the reference Go implementation (github.com/containerd/ttrpc, the version
# containerd's own shims use), in both directions, over a unix socket. When the pod path lands
# (guest image, sandboxer, shim), this script will start containerd 2.x and run a pod instead.
set -euo pipefail
build=${1:-build}
cd "$(dirname "$0")/.."

echo "== building the Go reference peer (github.com/containerd/ttrpc, pinned in tests/interop/go/go.mod)"
(cd "$build" && ctest -R interop_build_go --output-on-failure >/dev/null)

echo "== C++ client -> Go server, then Go client -> C++ server"
"$build/tests/interop/peapod_interop_tests" --gtest_color=no 2>&1 |
  grep -E '^(PASS|FAIL|go client:|\[ +(OK|FAILED|RUN) +\])'
