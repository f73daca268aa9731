#!/usr/bin/env bash
# The test suite behind `make test` (and CI's .ci/run). Builds and runs, in order:
#   format  clang-format check of every tracked C++ file
#   unit    the regular build: CTest labels unit, interop (Go reference ttrpc), root (the agent
#           in local mode with real crun, the sandboxer's state machine), vm (the guest image
#           and the sandboxer in QEMU under TCG), cri (containerd 2.x, 1.6 and ctr) and k8s
#           (kubectl workloads on a one-node Kubernetes: k8s/test.sh)
#   asan    unit, interop and root built with AddressSanitizer + UndefinedBehaviorSanitizer
#   fuzz    libFuzzer targets (clang), PEAPOD_FUZZ_SECONDS each (default 60)
# Tests that need what this host lacks (root, a VM, containerd) print why they skip.
# Ends with one line: "make test: N passed, N failed, N skipped".
#
#   scripts/test.sh                 all suites
#   scripts/test.sh --only fuzz     one suite (format, unit, asan, fuzz)
set -uo pipefail
cd "$(dirname "$0")/.."

only=""
if [[ "${1:-}" == "--only" ]]; then only="${2:?--only needs a suite name}"; fi
fuzz_seconds="${PEAPOD_FUZZ_SECONDS:-60}"
labels='unit|interop|root|vm|cri|k8s'
asan_labels='unit|interop|root'

passed=0 failed=0 skipped=0
failed_suites=()

want() { [[ -z "$only" || "$only" == "$1" ]]; }

# Runs ctest in a build dir and adds its counts to the totals.
run_ctest() {
  local suite=$1 dir=$2 label=$3
  local log="$dir/ctest-$suite.log"
  (cd "$dir" && ctest -L "$label" --output-on-failure -j2 --timeout 900) 2>&1 | tee "$log"
  local summary total nfail nskip
  summary=$(grep -E 'tests passed, [0-9]+ tests? failed out of [0-9]+' "$log" | tail -1)
  if [[ -z "$summary" ]]; then
    echo "test.sh: $suite: ctest printed no summary (did the build fail?)"
    failed=$((failed + 1)); failed_suites+=("$suite"); return
  fi
  nfail=$(sed -E 's/.* ([0-9]+) tests? failed out of ([0-9]+).*/\1/' <<<"$summary")
  total=$(sed -E 's/.* failed out of ([0-9]+).*/\1/' <<<"$summary")
  nskip=$(grep -cE '\(Skipped\)$' "$log" || true)
  passed=$((passed + total - nfail - nskip)); failed=$((failed + nfail)); skipped=$((skipped + nskip))
  ((nfail == 0)) || failed_suites+=("$suite")
}

build() {
  local suite=$1 dir=$2; shift 2
  echo "=== $suite: configure and build in $dir"
  if ! { [[ -f "$dir/build.ninja" ]] || cmake -S . -B "$dir" -G Ninja "$@"; } ||
     ! cmake --build "$dir"; then
    echo "test.sh: $suite: build failed"
    failed=$((failed + 1)); failed_suites+=("$suite-build"); return 1
  fi
}

if want format; then
  echo "=== format"
  if scripts/check-format.sh; then passed=$((passed + 1)); else
    failed=$((failed + 1)); failed_suites+=(format); fi
fi

if want unit; then
  build unit build && run_ctest unit build "$labels"
fi

if want asan; then
  build asan build-asan -DPEAPOD_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug &&
    ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1 \
      run_ctest asan build-asan "$asan_labels"
fi

if want fuzz; then
  CC=clang CXX=clang++ build fuzz build-fuzz -DPEAPOD_FUZZ=ON &&
    cmake -S . -B build-fuzz -DPEAPOD_FUZZ_SECONDS="$fuzz_seconds" >/dev/null &&
    run_ctest fuzz build-fuzz fuzz
fi

echo
if ((${#failed_suites[@]})); then echo "failing suites: ${failed_suites[*]}"; fi
echo "make test: $passed passed, $failed failed, $skipped skipped"
((failed == 0))
