#!/usr/bin/env bash
# Copies the shared libraries that each dynamically linked BINARY needs (as ldd lists them,
# the loader included) into ROOT, at their host paths: for test images made from the host's
# Debian programs.
#
#   scripts/copy-libs.sh ROOT BINARY...
set -euo pipefail
root=${1:?usage: copy-libs.sh ROOT BINARY...}
shift
for bin in "$@"; do
  for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done
done
