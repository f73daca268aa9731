#!/usr/bin/env bash
# Prints a containerd config that runs pods with peapod: the one template every script, test and
# benchmark here uses.
#
#   scripts/containerd-config.sh --containerd 2|1.6 --dir DIR [options] > containerd.toml
#
#   --containerd 2|1.6        containerd 2.x (config version 3, sandbox API) or 1.6 (version 2,
#                             classic CRI: the pause container's shim makes the pod)
#   --dir DIR                 root, state and sockets (containerd.sock, containerd.sock.ttrpc)
#   --root DIR, --state DIR   elsewhere than DIR/ctd-root and DIR/ctd-state
#   --sandboxer SOCK          containerd 2.x: peapod-sandboxer's sandbox API socket
#                             ([proxy_plugins.peapod]; the peapod runtime then names it)
#   --pause IMAGE             the pod's pause image (pinned sandbox image)
#   --cni-conf DIR            CNI network configs (plugins in /usr/lib/cni)
#   --runc BINARY             also a runc runtime, with this runc (2.x: and --runc-root DIR)
#   --default-runtime NAME    CRI's default runtime (2.x)
#   --debug LEVEL             containerd's log level
#   --streaming-on-loopback   exec/attach/port-forward server on 127.0.0.1, a free port
#   --netns-under-state       2.x: pod netns bind mounts under the state dir, not /run/netns
#   --restrict-oom true|false restrict_oom_score_adj (true inside a container without
#                             CAP_SYS_RESOURCE)
#   --registry-config DIR     2.x: hosts.toml directory for registries
#   --drain-exec-io DURATION  2.x: drain_exec_sync_io_timeout (runc's pods get the same)
#   --imports GLOB            2.x: read drop-ins (`make install` puts peapod's in
#                             /etc/containerd/conf.d); the peapod runtime then comes from there
set -euo pipefail

die() { echo "containerd-config: $*" >&2; exit 2; }

version="" dir="" root="" state="" sandboxer="" pause="" cni="" runc="" runc_root="" default_runtime=""
debug="" loopback=0 netns_state=0 restrict_oom="" registry="" drain="" imports=""
while (($#)); do
  case $1 in
  --containerd) version=${2:?} && shift ;;
  --dir) dir=${2:?} && shift ;;
  --root) root=${2:?} && shift ;;
  --state) state=${2:?} && shift ;;
  --sandboxer) sandboxer=${2:?} && shift ;;
  --pause) pause=${2:?} && shift ;;
  --cni-conf) cni=${2:?} && shift ;;
  --runc) runc=${2:?} && shift ;;
  --runc-root) runc_root=${2:?} && shift ;;
  --default-runtime) default_runtime=${2:?} && shift ;;
  --debug) debug=${2:?} && shift ;;
  --streaming-on-loopback) loopback=1 ;;
  --netns-under-state) netns_state=1 ;;
  --restrict-oom) restrict_oom=${2:?} && shift ;;
  --registry-config) registry=${2:?} && shift ;;
  --drain-exec-io) drain=${2:?} && shift ;;
  --imports) imports=${2:?} && shift ;;
  -h | --help) sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//' && exit 0 ;;
  *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done
[[ $version == 2 || $version == 1.6 ]] || die "--containerd must be 2 or 1.6"
[[ $dir == /* ]] || die "--dir must be an absolute path"
root=${root:-$dir/ctd-root}
state=${state:-$dir/ctd-state}
[[ -z $restrict_oom || $restrict_oom == true || $restrict_oom == false ]] ||
  die "--restrict-oom must be true or false"
if [[ $version == 1.6 ]]; then
  for opt in sandboxer runc_root default_runtime registry drain imports; do
    [[ -z ${!opt} ]] || die "--${opt//_/-} is for containerd 2.x only"
  done
  ((netns_state == 0)) || die "--netns-under-state is for containerd 2.x only"
fi

common() {
  cat <<EOF
root = "$root"
state = "$state"
[grpc]
  address = "$dir/containerd.sock"
[ttrpc]
  address = "$dir/containerd.sock.ttrpc"
EOF
  if [[ -n $debug ]]; then printf '[debug]\n  level = "%s"\n' "$debug"; fi
}

[[ -z $imports || -z $sandboxer ]] || die "--imports and --sandboxer: the drop-in names the sandboxer"
if [[ $version == 2 ]]; then
  echo "version = 3"
  if [[ -n $imports ]]; then printf 'imports = ["%s"]\n' "$imports"; fi
  common
  if [[ -n $sandboxer ]]; then
    printf '[proxy_plugins.peapod]\n  type = "sandbox"\n  address = "%s"\n' "$sandboxer"
  fi
  if ((loopback)); then
    printf "[plugins.'io.containerd.grpc.v1.cri']\n"
    printf '  stream_server_address = "127.0.0.1"\n  stream_server_port = "0"\n'
  fi
  if [[ -n $pause ]]; then
    printf "[plugins.'io.containerd.cri.v1.images'.pinned_images]\n  sandbox = \"%s\"\n" "$pause"
  fi
  if [[ -n $registry ]]; then
    printf "[plugins.'io.containerd.cri.v1.images'.registry]\n  config_path = \"%s\"\n" "$registry"
  fi
  if ((netns_state)) || [[ -n $restrict_oom || -n $drain ]]; then
    printf "[plugins.'io.containerd.cri.v1.runtime']\n"
    if ((netns_state)); then echo "  netns_mounts_under_state_dir = true"; fi
    if [[ -n $restrict_oom ]]; then echo "  restrict_oom_score_adj = $restrict_oom"; fi
    if [[ -n $drain ]]; then echo "  drain_exec_sync_io_timeout = \"$drain\""; fi
  fi
  if [[ -n $cni ]]; then
    printf "[plugins.'io.containerd.cri.v1.runtime'.cni]\n"
    printf '  bin_dirs = ["/usr/lib/cni"]\n  conf_dir = "%s"\n' "$cni"
  fi
  if [[ -n $default_runtime ]]; then
    printf "[plugins.'io.containerd.cri.v1.runtime'.containerd]\n"
    printf '  default_runtime_name = "%s"\n' "$default_runtime"
  fi
  if [[ -n $runc ]]; then
    printf "[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]\n"
    printf '  runtime_type = "io.containerd.runc.v2"\n'
    printf "[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]\n"
    printf '  BinaryName = "%s"\n' "$runc"
    if [[ -n $runc_root ]]; then printf '  Root = "%s"\n' "$runc_root"; fi
  fi
  if [[ -z $imports ]]; then
    printf "[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.peapod]\n"
    printf '  runtime_type = "io.containerd.peapod.v2"\n'
    if [[ -n $sandboxer ]]; then printf '  sandboxer = "peapod"\n'; fi
  fi
else
  echo "version = 2"
  common
  printf '[plugins."io.containerd.grpc.v1.cri"]\n'
  if [[ -n $pause ]]; then printf '  sandbox_image = "%s"\n' "$pause"; fi
  if [[ -n $restrict_oom ]]; then echo "  restrict_oom_score_adj = $restrict_oom"; fi
  if ((loopback)); then
    printf '  stream_server_address = "127.0.0.1"\n  stream_server_port = "0"\n'
  fi
  if [[ -n $cni ]]; then
    printf '  [plugins."io.containerd.grpc.v1.cri".cni]\n'
    printf '    bin_dir = "/usr/lib/cni"\n    conf_dir = "%s"\n' "$cni"
  fi
  if [[ -n $runc ]]; then
    printf '  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]\n'
    printf '    runtime_type = "io.containerd.runc.v2"\n'
    printf '  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]\n'
    printf '    BinaryName = "%s"\n' "$runc"
  fi
  printf '  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.peapod]\n'
  printf '    runtime_type = "io.containerd.peapod.v2"\n'
fi
