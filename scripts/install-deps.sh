#!/usr/bin/env bash
# Installs everything peapod needs on a Debian 12 machine. Idempotent: a second run
# installs nothing and returns in a second or two. Run as root (CI and the dev machines are).
#
#   scripts/install-deps.sh            # Debian packages + the Go tools the tests need
#   scripts/install-deps.sh --apt-only # Debian packages only
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)

# Grouped by what needs them; every name is a Debian 12 package.
pkgs=(
  # toolchain
  build-essential cmake ninja-build pkg-config git ca-certificates
  clang clang-format libclang-rt-14-dev libfuzzer-14-dev
  # wire protocols
  libprotobuf-dev protobuf-compiler libgrpc++-dev protobuf-compiler-grpc libssl-dev
  # libraries the programs link
  libnl-3-dev libnl-route-3-dev nlohmann-json3-dev libspdlog-dev libfmt-dev libcap-ng-dev
  libvirt-dev libxml2-dev
  # tests
  libgtest-dev libgmock-dev googletest
  # VM and guest tooling (issues 5 and 6 use them; cheap to have from day one)
  qemu-system-x86 libvirt-daemon libvirt-daemon-driver-qemu erofs-utils crun
  cpio xz-utils zstd busybox-static iproute2 iputils-ping kmod
  # vm-images/crun.sh: the guest's crun, built from Debian's source without systemd, static
  dpkg-dev gperf libyajl-dev libseccomp-dev libcap-dev libgcrypt20-dev libgpg-error-dev
  # containerd 1.6 (classic CRI and plain ctr paths), runc (the baseline runtime), CNI plugins
  # for the CRI tests' pod network
  containerd runc containernetworking-plugins
  # cri-tests/run.sh: the loopback image registry, and its report and readiness checks
  docker-registry python3 curl
  # bench/run.sh: plots (Debian's python3 has matplotlib; pip's does not) and callgrind
  python3-matplotlib valgrind
)

missing=()
for p in "${pkgs[@]}"; do
  # dpkg-query answers "install ok installed" only for fully installed packages.
  if [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" != "install ok installed" ]]; then
    missing+=("$p")
  fi
done

if ((${#missing[@]})); then
  echo "install-deps: installing ${#missing[@]} Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Lists may be absent on a fresh machine; refresh them once per run when we need to install.
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "install-deps: Debian packages already present"
fi

# docker-registry's package enables a system-wide registry on :5000; cri-tests/run.sh starts its
# own on loopback and wants none running.
if [[ -d /run/systemd/system ]] && systemctl is-enabled --quiet docker-registry 2>/dev/null; then
  echo "install-deps: disabling the docker-registry service (cri-tests runs its own)"
  systemctl disable --now docker-registry
fi

# libvirt's QEMU driver looks up its build-time default user before it reads qemu.conf, so the
# embedded driver fails to start ("Failed to parse user 'libvirt-qemu'") unless it exists.
# libvirt-daemon-system would create it along with a daemon we do not want.
if ! getent passwd libvirt-qemu >/dev/null; then
  echo "install-deps: creating system user libvirt-qemu"
  useradd --system --user-group --no-create-home --home-dir /var/lib/libvirt \
    --shell /usr/sbin/nologin libvirt-qemu
fi

if [[ "${1:-}" == "--apt-only" ]]; then
  exit 0
fi

# The interop tests' Go deps, and containerd 2.x + crictl for the CRI tests (minutes the first
# time on a fresh machine, then cached).
"$here/go-tools.sh" ttrpc-interop containerd crictl
