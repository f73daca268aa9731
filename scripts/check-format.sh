#!/usr/bin/env bash
# Fails, listing the files, if any tracked C++ file differs from clang-format's output.
set -euo pipefail
cd "$(dirname "$0")/.."
bad=()
while IFS= read -r f; do
  if ! clang-format --style=file "$f" | cmp -s - "$f"; then bad+=("$f"); fi
done < <(git ls-files '*.h' '*.cc')
if ((${#bad[@]})); then
  echo "check-format: these files are not clang-formatted (run 'make format'):"
  printf '  %s\n' "${bad[@]}"
  exit 1
fi
echo "check-format: all C++ files formatted"
