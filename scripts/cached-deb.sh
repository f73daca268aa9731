#!/usr/bin/env bash
# Prints the path of Debian package NAME's .deb in the cache, downloading it the first time
# (apt-get download; the package registry is the only network the tests use).
#
#   scripts/cached-deb.sh NAME
#
# Cache: $PEAPOD_DEB_CACHE (default /var/cache/peapod/debs).
set -euo pipefail
name=${1:?usage: cached-deb.sh NAME}
cache=${PEAPOD_DEB_CACHE:-/var/cache/peapod/debs}
find_deb() { ls "$cache/${name}"_*_amd64.deb 2>/dev/null | head -n 1 || true; }
deb=$(find_deb)
if [[ -z $deb ]]; then
  mkdir -p "$cache"
  echo "cached-deb: apt-get download $name (once, into $cache)" >&2
  # _apt cannot write into root's directories: download in a world-writable temp dir.
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  chmod 777 "$tmp"
  (cd "$tmp" && apt-get download -q "$name" >&2) || {
    apt-get update -qq >&2 && (cd "$tmp" && apt-get download -q "$name" >&2)
  }
  mv "$tmp/${name}"_*_amd64.deb "$cache/"
  deb=$(find_deb)
  [[ -n $deb ]] || { echo "cached-deb: no .deb for $name after apt-get download" >&2; exit 1; }
fi
printf '%s\n' "$deb"
