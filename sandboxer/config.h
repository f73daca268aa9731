// peapod-sandboxer's configuration: a JSON file (default /etc/peapod/sandboxer.json); every key
// is optional and falls back to the documented default (docs/sandboxer.md).
#pragma once

#include <cstdint>
#include <string>

#include "common/base/result.h"

namespace peapod::sandboxer {

struct Config {
  std::string listen = "/run/peapod/sandboxer.sock";  // containerd's proxy plugin address
  std::string shim_listen = "/run/peapod/shim.sock";  // peapod.sandboxer.v1 (ttrpc) for shims
  std::string state_dir = "/var/lib/peapod";          // pod records (survive reboots of us)
  std::string run_dir = "/run/peapod";                // per-pod sockets, share dirs
  std::string libvirt_uri;                            // empty: embedded driver
  std::string libvirt_root;                           // empty: <state_dir>/libvirt
  std::string image_dir = "/usr/local/share/peapod";  // vmlinux, initrd.img, cmdline
  std::string kernel;                                 // empty: <image_dir>/vmlinux
  std::string initrd;                                 // empty: <image_dir>/initrd.img
  std::string cmdline;                                // empty: <image_dir>/cmdline's line
  // A pod with no resource limits gets vcpus / memory_mib. One with limits gets what they add
  // up to (CPUs rounded up, at most max_vcpus) plus memory_overhead_mib for the guest kernel
  // and agent.
  unsigned vcpus = 1;
  uint64_t memory_mib = 512;
  unsigned max_vcpus = 8;
  uint64_t memory_overhead_mib = 128;
  // Per-pod scratch disk (sparse; writable layers of containers live there).
  uint64_t scratch_size_mib = 10240;
  // Pre-booted VMs kept ready for pods of the default size (vcpus, memory_mib): a pod Start
  // adopts one instead of booting. 0: every pod boots its own VM.
  unsigned pool_size = 0;
  // How a pod's VM (and a pool VM) starts: "template" restores it from a VM booted and saved
  // once (template.h; pods of the default size with a network), "boot" boots each one.
  std::string start_from = "template";
  // Start the host's KSM (kernel samepage merging) so VMs share identical pages (see ksm.h for
  // what it saves and why it is off by default).
  bool ksm = false;
  // Layer images built by mkfs.erofs stay cached this long after their last user goes.
  unsigned layer_cache_keep_seconds = 3600;
  // containerd's CRI root: on the sandbox-API path containerd bind-mounts a pod's hostname,
  // hosts and resolv.conf into its containers only if <cri_root>/sandboxes/<id>/ has them, and
  // leaves writing them to the sandbox controller.
  std::string cri_root = "/var/lib/containerd/io.containerd.grpc.v1.cri";
  std::string mkfs_erofs = "mkfs.erofs";
  std::string mkfs_ext4 = "mkfs.ext4";
  // Under TCG, QEMU's translation cache per VM (MiB; 0: QEMU's default). bench/ measured the
  // default at ~208 MiB of host memory per idle pod.
  uint64_t tcg_tb_cache_mib = 64;
  // Whether QEMU may back guest RAM with transparent huge pages: "auto" (off under TCG, on
  // under KVM), "on" or "off". A 2 MiB huge page is resident as soon as the guest touches one
  // of its 4 KiB pages, so a guest using 58 MiB spread over its RAM held 116 MiB on the host;
  // under KVM huge pages also back the guest's own TLB reach, which TCG does not use.
  std::string guest_huge_pages = "auto";
  // Each pod's QEMU runs as a uid of its own, vm_uid_base + 1 to vm_uid_base + vm_uid_count,
  // with group vm_gid (0: vm_uid_base) and no capabilities; the share is served by
  // share_server (share_server.h). Pick a range no user or container uses on the node.
  // vm_uid_base 0: QEMU runs as root with the capabilities 9p needs (not confined).
  uint32_t vm_uid_base = 0x78000000;
  uint32_t vm_uid_count = 65536;
  uint32_t vm_gid = 0;
  std::string share_server = "/usr/lib/qemu/virtfs-proxy-helper";
  std::string accel = "auto";  // auto: kvm if /dev/kvm opens, else tcg; or "kvm" / "tcg"
  unsigned boot_timeout_seconds = 120;
  std::string log_level = "info";

  // Reads path (missing file: defaults, unless required) and fills derived defaults.
  static Result<Config> Load(const std::string& path, bool required);
};

}  // namespace peapod::sandboxer
