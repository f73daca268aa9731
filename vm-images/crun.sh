#!/usr/bin/env bash
# Builds the crun that runs inside the guest: Debian's own source for the crun package this
# host has installed (same version, same Debian patches), configured without systemd, built
# with Debian's hardening flags and linked static-pie. Prints the binary's path.
#
#   vm-images/crun.sh
#
# Why not the packaged binary: under TCG a program's start-up is paid in emulated page faults
# and first-run code, and Debian's crun loads 11 shared libraries (libsystemd brings lzma, zstd,
# lz4, gcrypt and gpg-error). The guest has no systemd, so that support is dead weight there.
# In a TCG guest `crun --version` took 15 ms packaged and 4-5 ms static, as long as a static
# program that does nothing (docs/guest-image.md; docs/performance.md for container start).
#
# The source comes through apt from the host's own Debian mirrors (deb-src entries made from
# its deb entries, in a private apt directory), so apt checks it against the signed Sources
# index. The result is cached in $PEAPOD_CRUN_CACHE (default /var/cache/peapod/crun) under the
# package version and a hash of this script and of the versions of what is linked in.
# PEAPOD_GUEST_CRUN=/path/to/crun skips all of this and puts that binary in the guest instead
# (the packaged /usr/bin/crun works, only slower).
set -euo pipefail

die() { echo "vm-images/crun: $*" >&2; exit 1; }

if [[ -n "${PEAPOD_GUEST_CRUN:-}" ]]; then
  [[ -f "$PEAPOD_GUEST_CRUN" && -x "$PEAPOD_GUEST_CRUN" ]] || die "PEAPOD_GUEST_CRUN=$PEAPOD_GUEST_CRUN is not an executable file"
  printf '%s\n' "$PEAPOD_GUEST_CRUN"
  exit 0
fi

[[ "$(dpkg-query -W -f='${db:Status-Abbrev}' crun 2>/dev/null)" == "ii " ]] ||
  die "the crun package is not installed (scripts/install-deps.sh installs it)"
ver=$(dpkg-query -W -f='${Version}' crun)
here=$(cd "$(dirname "$0")" && pwd)
cache=${PEAPOD_CRUN_CACHE:-/var/cache/peapod/crun}
# What goes into the binary: crun's source, this script, and the libraries and toolchain linked
# in statically (a security update to any of them builds crun again).
linked=(libc6-dev libseccomp-dev libgcrypt20-dev libgpg-error-dev libcap-dev libyajl-dev gcc-12)
key=$(
  {
    cat "$here/crun.sh"
    dpkg --print-architecture
    dpkg-query -W -f='${Package}=${Version}\n' "${linked[@]}" 2>/dev/null || true
  } | sha256sum | cut -c1-12
)
dir="$cache/$ver-$key"
if [[ -f "$dir/crun" && -x "$dir/crun" ]] && "$dir/crun" --version >/dev/null 2>&1; then
  printf '%s\n' "$dir/crun"
  exit 0
fi
for tool in dpkg-source dpkg-buildflags dpkg-architecture gperf pkg-config readelf; do
  command -v "$tool" >/dev/null || die "$tool is missing (scripts/install-deps.sh installs it)"
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"

# A private apt directory whose sources are the host's deb entries as deb-src.
apt="$work/apt"
mkdir -p "$apt/sources.list.d" "$apt/lists/partial" "$apt/cache/archives/partial"
: > "$apt/sources.list"
if [[ -f /etc/apt/sources.list ]]; then
  sed -nE 's/^[[:space:]]*deb([[:space:]])/deb-src\1/p' /etc/apt/sources.list > "$apt/sources.list"
fi
for f in /etc/apt/sources.list.d/*.sources; do
  [[ -f "$f" ]] || continue
  sed -E 's/^types:.*/Types: deb-src/I' "$f" > "$apt/sources.list.d/$(basename "$f")"
done
for f in /etc/apt/sources.list.d/*.list; do
  [[ -f "$f" ]] || continue
  sed -nE 's/^[[:space:]]*deb([[:space:]])/deb-src\1/p' "$f" > "$apt/sources.list.d/$(basename "$f")"
done
opts=(-q -o "Dir::Etc::SourceList=$apt/sources.list" -o "Dir::Etc::SourceParts=$apt/sources.list.d"
      -o "Dir::State::Lists=$apt/lists" -o "Dir::Cache=$apt/cache" -o APT::Sandbox::User=root)
echo "vm-images/crun: fetching Debian's source of crun $ver (once, cached in $cache)" >&2
# A third-party entry without source packages may fail its update; apt-get source below
# decides whether crun's source was found (and refuses one from an unauthenticated source).
apt-get "${opts[@]}" update >&2 || echo "vm-images/crun: some deb-src lists failed to update" >&2
(cd "$work" && apt-get "${opts[@]}" source --download-only "crun=$ver" >&2) ||
  die "apt-get source crun=$ver failed (is that version still on the mirror?)"
(cd "$work" && dpkg-source -x crun_*.dsc src >&2) || die "dpkg-source -x failed"

# Static: crun's libraries from their -dev packages' archives (yajl's is libyajl_s.a).
mkdir -p "$work/lib"
yajl_a="/usr/lib/$(dpkg-architecture -qDEB_HOST_MULTIARCH)/libyajl_s.a"
[[ -f "$yajl_a" ]] || die "$yajl_a is missing (package libyajl-dev)"
ln -s "$yajl_a" "$work/lib/libyajl.a"
(
  cd "$work/src"
  # Debian's hardening flags, as the package has them (stack protector, fortify, relro, now).
  eval "$(DEB_BUILD_MAINT_OPTIONS=hardening=+all dpkg-buildflags --export=sh)"
  ./configure -q --disable-systemd --disable-criu --disable-dl >&2
  # The whole tree first (generated headers, libocispec), then crun linked again: static and
  # position-independent (static-pie), so it keeps address randomization where it runs with it.
  { make -j"$(nproc)" && rm -f crun &&
    make crun LDFLAGS="$LDFLAGS -Xcompiler -static-pie -L$work/lib" \
      LIBS="-Wl,-Bstatic -lseccomp -lgcrypt -lgpg-error -lcap -lyajl"
  } >"$work/make.log" 2>&1 || { grep -v warning "$work/make.log" | tail -20 >&2; exit 1; }
  # glibc warns that getpwuid_r and friends in a static binary need its NSS modules at run
  # time: crun calls them only for rootless user namespaces (subuid ranges), not in the guest.
  grep -i 'warning:' "$work/make.log" | grep -v 'in statically linked applications requires' >&2 || true
) || die "building crun $ver failed (build log above)"
hdr=$(readelf -hlW "$work/src/crun") || die "readelf cannot read the crun built"
[[ "$hdr" != *"program interpreter"* ]] || die "the crun built is not statically linked"
[[ "$hdr" == *"Position-Independent Executable"* ]] || die "the crun built is not position-independent"
"$work/src/crun" --version >/dev/null || die "the crun built does not run"
mkdir -p "$dir"
strip -o "$dir/crun.tmp" "$work/src/crun"
sync "$dir/crun.tmp"
mv "$dir/crun.tmp" "$dir/crun"
# Builds for older inputs are never used again.
for old in "$cache"/*/; do
  [[ "${old%/}" == "$dir" ]] || rm -rf "${old%/}"
done
printf '%s\n' "$dir/crun"
