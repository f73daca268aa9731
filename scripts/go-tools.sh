#!/usr/bin/env bash
# Build the Go-based test tools (containerd, ctr, containerd-shim-runc-v2,
# crictl, critest) at the versions pinned in scripts/go-tools.versions, and
# pre-download the Go module deps of tests/interop/go.
#
# Usage: scripts/go-tools.sh [--print-path] NAME...|all
#        scripts/go-tools.sh --list
#
#   NAME          a tool from go-tools.versions; "all" means every tool.
#   --print-path  print each tool's bin dir on stdout (building it first if
#                 needed); all other output goes to stderr.
#   --list        print "name module version" for each pinned tool.
#
# Results are cached in $PEAPOD_GO_TOOLS_CACHE (default
# /var/cache/peapod/go-tools) as <name>-<version>/bin/; a .stamp file marks a
# finished build, and a re-run with the stamp in place does no work and does
# not even need go. Builds go to a temp dir and are renamed into place, under
# flock, so an interrupted or concurrent run never leaves a half-built cache.
#
# Environment: PEAPOD_GO_TOOLS_CACHE, PEAPOD_GO_TOOLS_VERSIONS (pin file),
# GO (go binary), GOTOOLCHAIN (default "local": never fetch a toolchain).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
VERSIONS_FILE=${PEAPOD_GO_TOOLS_VERSIONS:-$SCRIPT_DIR/go-tools.versions}
CACHE_ROOT=${PEAPOD_GO_TOOLS_CACHE:-/var/cache/peapod/go-tools}
INTEROP_DIR=$REPO_ROOT/tests/interop/go

# Bump when a recipe below changes (tags, ldflags, binaries) so that cached
# builds made by the old recipe are rebuilt.
RECIPE_REV=1

log() { printf 'go-tools: %s\n' "$*" >&2; }
die() {
  log "error: $*"
  exit 1
}

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}

# ---------------------------------------------------------------- pin file

declare -A MODULE=() VERSION=()
NAMES=()

load_versions() {
  [[ -r $VERSIONS_FILE ]] || die "cannot read pin file $VERSIONS_FILE"
  local name module version extra lineno=0
  while read -r name module version extra || [[ -n ${name:-} ]]; do
    lineno=$((lineno + 1))
    [[ -z ${name:-} || $name == \#* ]] && continue
    if [[ -z ${version:-} || -n ${extra:-} && $extra != \#* ]]; then
      die "$VERSIONS_FILE:$lineno: expected 'name module version'"
    fi
    [[ $name =~ ^[a-z0-9][a-z0-9-]*$ ]] || die "$VERSIONS_FILE:$lineno: bad tool name '$name'"
    [[ $version =~ ^v[0-9][A-Za-z0-9.+-]*$ ]] || die "$VERSIONS_FILE:$lineno: bad version '$version'"
    [[ -z ${MODULE[$name]:-} ]] || die "$VERSIONS_FILE:$lineno: '$name' pinned twice"
    MODULE[$name]=$module
    VERSION[$name]=$version
    NAMES+=("$name")
  done <"$VERSIONS_FILE"
  ((${#NAMES[@]})) || die "no tools pinned in $VERSIONS_FILE"
}

# Binaries each tool must produce (ttrpc-interop produces none).
tool_binaries() {
  case $1 in
  containerd) echo containerd ctr containerd-shim-runc-v2 ;;
  crictl) echo crictl ;;
  critest) echo critest ;;
  ttrpc-interop) ;;
  *) die "no recipe for tool '$1' (pinned in $VERSIONS_FILE but unknown to $0)" ;;
  esac
}

# ---------------------------------------------------------------- go

GO_READY=0
require_go() {
  ((GO_READY)) && return 0
  GO=${GO:-}
  if [[ -z $GO ]]; then
    if command -v go >/dev/null 2>&1; then
      GO=$(command -v go)
    elif [[ -x /usr/local/go/bin/go ]]; then
      GO=/usr/local/go/bin/go
    else
      die "go not found in PATH or /usr/local/go/bin; install Go (>= 1.25) first"
    fi
  fi
  "$GO" version >/dev/null 2>&1 || die "'$GO version' failed; is Go installed correctly?"
  export GOTOOLCHAIN=${GOTOOLCHAIN:-local}
  export CGO_ENABLED=0
  log "using $("$GO" version) (GOTOOLCHAIN=$GOTOOLCHAIN CGO_ENABLED=0)"
  GO_READY=1
}

# Run a go command with its output going to stderr and to the build log.
run_go() {
  local rc=0 cmd
  printf -v cmd ' %q' "$@"
  log "+ go$cmd"
  "$GO" "$@" 2>&1 | tee -a "$BUILD_LOG" >&2 || rc=${PIPESTATUS[0]}
  return "$rc"
}

# Copy the source of MODULE@VERSION from the module cache into DEST (writable).
copy_module_source() {
  local module=$1 version=$2 dest=$3 json dir
  json=$("$GO" mod download -json "$module@$version" 2>>"$BUILD_LOG") || {
    printf '%s\n' "$json" >&2
    return 1
  }
  dir=$(sed -n 's/^[[:space:]]*"Dir":[[:space:]]*"\(.*\)",\{0,1\}[[:space:]]*$/\1/p' <<<"$json")
  [[ -n $dir && -d $dir ]] || {
    log "go mod download gave no source dir for $module@$version"
    printf '%s\n' "$json" >&2
    return 1
  }
  mkdir -p "$dest"
  cp -r "$dir/." "$dest/"
  chmod -R u+w "$dest"
}

# go_install BIN TAGS LDFLAGS MODULE VERSION PKG...
# Preferred: `go install MODULE/PKG@VERSION`. That refuses modules whose
# go.mod has replace/exclude directives; then build inside a copy of the
# module source instead, where its go.mod is the main module.
go_install() {
  local bin=$1 tags=$2 ldflags=$3 module=$4 version=$5
  shift 5
  local targets=() pkg mark
  for pkg; do targets+=("$module/$pkg@$version"); done
  mark=$(wc -l <"$BUILD_LOG")
  if GOBIN=$bin run_go install -trimpath -tags "$tags" -ldflags "$ldflags" "${targets[@]}"; then
    return 0
  fi
  if ! tail -n +"$((mark + 1))" "$BUILD_LOG" | grep -qE '(replace|exclude) directives'; then
    return 1
  fi
  log "go install refused $module@$version (replace/exclude directives); building from a copy of its source"
  local src=$STAGING/src
  [[ -d $src ]] || copy_module_source "$module" "$version" "$src" || return 1
  for pkg; do
    (cd "$src" && run_go build -mod=mod -trimpath -tags "$tags" -ldflags "$ldflags" \
      -o "$bin/${pkg##*/}" "./$pkg") || return 1
  done
}

# ---------------------------------------------------------------- recipes

build_containerd() {
  local bin=$1 module=$2 version=$3
  # Same tags as containerd's Makefile. CGO_ENABLED=0 drops the btrfs
  # snapshotter (it is "cgo && !no_btrfs"), so no libbtrfs-dev is needed and
  # the binaries are static. The shim gets no_grpc like upstream's.
  local ldflags="-s -w -X $module/version.Version=$version -X $module/version.Package=$module"
  go_install "$bin" "urfave_cli_no_docs" "$ldflags" "$module" "$version" \
    cmd/containerd cmd/ctr || return 1
  go_install "$bin" "urfave_cli_no_docs no_grpc" "$ldflags" "$module" "$version" \
    cmd/containerd-shim-runc-v2
}

build_crictl() {
  local bin=$1 module=$2 version=$3
  go_install "$bin" "" "-s -w -X $module/pkg/version.Version=${version#v}" \
    "$module" "$version" cmd/crictl
}

build_critest() {
  local bin=$1 module=$2 version=$3
  # critest's main is a test binary (cmd/critest/cri_test.go), so it is made
  # with `go test -c`, which takes no @version: build in a copy of the module.
  local src=$STAGING/src
  copy_module_source "$module" "$version" "$src" || return 1
  (cd "$src" && run_go test -c -mod=mod -trimpath \
    -ldflags "-s -w -X $module/pkg/version.Version=${version#v}" \
    -o "$bin/critest" ./cmd/critest)
}

build_ttrpc-interop() {
  local module=$2 version=$3
  interop_check_pin "$module" "$version"
  (cd "$INTEROP_DIR" && run_go mod download -x) || return 1
  # Prove the CMake step (GOFLAGS=-mod=readonly go build) now works offline;
  # this also warms the build cache.
  (cd "$INTEROP_DIR" && GOPROXY=off GOFLAGS=-mod=readonly run_go build -o /dev/null .)
}

# ---------------------------------------------------------------- ttrpc-interop helpers

interop_check_pin() {
  local module=$1 version=$2 have
  [[ -f $INTEROP_DIR/go.mod ]] || die "$INTEROP_DIR/go.mod not found"
  have=$(awk -v m="$module" '$1 == m { print $2; exit } $1 == "require" && $2 == m { print $3; exit }' \
    "$INTEROP_DIR/go.mod")
  [[ $have == "$version" ]] ||
    die "tests/interop/go/go.mod requires $module ${have:-(none)} but $VERSIONS_FILE pins $version; make them agree"
}

interop_fingerprint() {
  cat "$INTEROP_DIR/go.mod" "$INTEROP_DIR/go.sum" 2>/dev/null | sha256sum | cut -d' ' -f1
}

# Module cache path of MODULE@VERSION's zip (module paths escape upper case).
modcache_zip() {
  local modcache=$1 module=$2 version=$3
  local c escaped=
  while [[ -n $module ]]; do
    c=${module:0:1}
    module=${module:1}
    [[ $c == [A-Z] ]] && c="!${c,}"
    escaped+=$c
  done
  module=$escaped
  printf '%s/cache/download/%s/@v/%s.zip\n' "$modcache" "$module" "$version"
}

# ---------------------------------------------------------------- cache

stamp_text() {
  local name=$1
  printf 'name=%s module=%s version=%s recipe=%s' \
    "$name" "${MODULE[$name]}" "${VERSION[$name]}" "$RECIPE_REV"
  if [[ $name == ttrpc-interop ]]; then
    printf ' gomod=%s' "$(interop_fingerprint)"
  fi
  printf '\n'
}

tool_dir() { printf '%s/%s-%s\n' "$CACHE_ROOT" "$1" "${VERSION[$1]}"; }

# Is NAME's cached build complete and current?
is_cached() {
  local name=$1 dir stamp want bin modcache
  dir=$(tool_dir "$name")
  stamp=$dir/.stamp
  [[ -f $stamp ]] || return 1
  want=$(stamp_text "$name")
  [[ $(head -n 1 "$stamp") == "$want" ]] || return 1
  for bin in $(tool_binaries "$name"); do
    [[ -x $dir/bin/$bin ]] || return 1
  done
  if [[ $name == ttrpc-interop ]]; then
    # The downloads live in the Go module cache, not here: check they remain.
    modcache=$(sed -n 's/^modcache=//p' "$stamp")
    [[ -n $modcache && -f $(modcache_zip "$modcache" "${MODULE[$name]}" "${VERSION[$name]}") ]] || return 1
  fi
  return 0
}

STAGING=
BUILD_LOG=/dev/null
cleanup() {
  if [[ -n $STAGING && -d $STAGING ]]; then
    chmod -R u+w "$STAGING" 2>/dev/null || true
    rm -rf "$STAGING"
  fi
}
trap cleanup EXIT

ensure_tool() {
  local name=$1 module=${MODULE[$1]} version=${VERSION[$1]} dir lockfd start secs bin
  is_cached "$name" && return 0

  require_go
  if ! mkdir -p "$CACHE_ROOT" 2>/dev/null || [[ ! -w $CACHE_ROOT ]]; then
    die "cache dir $CACHE_ROOT is not writable (run as root or set PEAPOD_GO_TOOLS_CACHE)"
  fi
  dir=$(tool_dir "$name")
  exec {lockfd}>"$CACHE_ROOT/.$name-$version.lock"
  if ! flock -n "$lockfd"; then
    log "waiting for another go-tools run building $name $version"
    flock "$lockfd"
  fi
  if is_cached "$name"; then
    exec {lockfd}>&-
    return 0
  fi

  STAGING=$(mktemp -d "$CACHE_ROOT/.$name-$version.XXXXXX")
  mkdir -p "$STAGING/bin"
  BUILD_LOG=$STAGING/build.log
  : >"$BUILD_LOG"
  log "building $name $version ($module)"
  start=$(date +%s)
  if ! "build_$name" "$STAGING/bin" "$module" "$version"; then
    die "building $name $version failed (see the go output above)"
  fi
  for bin in $(tool_binaries "$name"); do
    [[ -x $STAGING/bin/$bin ]] || die "building $name $version produced no $bin"
  done
  secs=$(($(date +%s) - start))

  if [[ -d $STAGING/src ]]; then
    chmod -R u+w "$STAGING/src"
    rm -rf "$STAGING/src"
  fi
  {
    stamp_text "$name"
    printf 'built=%s seconds=%s go=%s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$secs" "$("$GO" env GOVERSION)"
    [[ $name != ttrpc-interop ]] || printf 'modcache=%s\n' "$("$GO" env GOMODCACHE)"
  } >"$STAGING/.stamp"
  chmod 755 "$STAGING"
  if [[ -e $dir ]]; then
    chmod -R u+w "$dir" 2>/dev/null || true
    rm -rf "$dir"
  fi
  mv "$STAGING" "$dir"
  STAGING=
  exec {lockfd}>&-

  log "built $name $version in ${secs}s"
  for bin in $(tool_binaries "$name"); do
    log "  $(du -h "$dir/bin/$bin" | cut -f1)  $dir/bin/$bin"
  done
}

# ---------------------------------------------------------------- main

main() {
  local print_path=0 list=0 names=() name
  while (($#)); do
    case $1 in
    --print-path) print_path=1 ;;
    --list) list=1 ;;
    -h | --help)
      usage
      return 0
      ;;
    --) shift && names+=("$@") && break ;;
    -*) die "unknown option '$1' (see --help)" ;;
    *) names+=("$1") ;;
    esac
    shift
  done

  load_versions
  if ((list)); then
    for name in "${NAMES[@]}"; do
      printf '%s %s %s\n' "$name" "${MODULE[$name]}" "${VERSION[$name]}"
    done
    return 0
  fi
  if ((${#names[@]} == 0)); then
    usage >&2
    die "no tool named (tools: ${NAMES[*]}, or all)"
  fi

  local wanted=()
  for name in "${names[@]}"; do
    if [[ $name == all ]]; then
      wanted+=("${NAMES[@]}")
    elif [[ -n ${MODULE[$name]:-} ]]; then
      wanted+=("$name")
    else
      die "unknown tool '$name' (tools: ${NAMES[*]}, or all)"
    fi
  done

  for name in "${wanted[@]}"; do
    tool_binaries "$name" >/dev/null # fail early on a pin with no recipe
  done
  for name in "${wanted[@]}"; do
    ensure_tool "$name"
    if ((print_path)); then
      printf '%s/bin\n' "$(tool_dir "$name")"
    fi
  done
}

main "$@"
