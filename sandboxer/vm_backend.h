// How the sandboxer starts and stops a pod's VM. One interface, two implementations: libvirt
// (the real one: QEMU through libvirt's embedded driver by default) and, for unit tests, a
// fake that runs peapod-agent as a local process.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "common/base/result.h"

namespace peapod::sandboxer {

// A disk on the pod's virtio-scsi controller (controller 0, bus 0, target 0): the guest finds
// it by SCSI address "0:<unit>" (agent Storage source).
struct DiskSpec {
  std::string path;  // a raw image file on the host
  unsigned unit = 0;
  bool readonly = true;
};

struct VmSpec {
  std::string name;  // the libvirt domain name: "peapod-<pod id>"
  std::string kernel;
  std::string initrd;
  std::string cmdline;
  unsigned vcpus = 1;
  uint64_t memory_mib = 512;
  bool kvm = false;  // domain type kvm, else qemu (TCG)
  // The QEMU binary libvirt runs (empty: libvirt's default for the architecture).
  std::string emulator;
  // TCG only: the size of QEMU's translated-code cache (0: QEMU's default, which grows to
  // hundreds of MiB per VM).
  uint64_t tcg_tb_cache_mib = 0;
  // QEMU listens here for the virtio-serial agent port (io.peapod.agent.0).
  std::string agent_socket;
  // Exported to the guest over 9p with mount tag "peapod-share" (empty: none).
  std::string share_dir;
  // QEMU's identity: a uid of this VM's own and the group all pod VMs share (layer images are
  // readable by it). The libvirt backend then serves the share through a 9p proxy that
  // listens on share_socket (share_server.h). uid 0: QEMU runs as root and serves 9p itself.
  uint32_t uid = 0;
  uint32_t gid = 0;
  std::string share_socket;
  // The pod NIC: a TAP that exists (in our netns) for QEMU to open, and the MAC the guest
  // NIC takes (the CNI interface's). Empty tap: no NIC (loopback only).
  std::string tap;
  std::string mac;
  // What the guest prints on its serial console.
  std::string console_log;
  // Disks present at boot (the pod's scratch disk).
  std::vector<DiskSpec> disks;
  // Not empty: the VM does not boot but is restored from this template state file (what
  // SaveState wrote of a VM with this same spec but for names, paths and MAC): QEMU loads the
  // saved device state and memory and the guest runs on from where the template stopped.
  std::string restore_from;
  // restore_from's FileIdentity (template.h) when it was checked: a file that changed since is
  // refused. A restore that fails for the state's sake fails with DATA_LOSS (the caller can
  // boot instead); other errors are the VM's.
  std::string restore_identity;
};

struct VmInfo {
  std::string name;
  pid_t pid = 0;  // QEMU's
};

class VmBackend {
 public:
  virtual ~VmBackend() = default;
  // Boots the VM; returns once QEMU runs (the agent may still be booting).
  virtual Result<VmInfo> Start(const VmSpec& spec) = 0;
  // Stops it hard (the guest has been asked to power off before, if it could be). A VM that
  // is already gone is fine.
  virtual Result<void> Destroy(const std::string& name) = 0;
  // Hot-adds / removes a disk of a running VM. Detaching a disk that is not attached is fine.
  virtual Result<void> AttachDisk(const std::string& name, const DiskSpec& disk) = 0;
  virtual Result<void> DetachDisk(const std::string& name, const DiskSpec& disk) = 0;
  // VM templates: pauses VM name and writes its device state and memory to path (created
  // 0600, replaced if it exists); the VM stays paused, to be destroyed. A VmSpec whose
  // restore_from names the file starts from it.
  virtual bool SupportsTemplates() const { return false; }
  virtual Result<void> SaveState(const std::string& name, const std::string& path) {
    (void)name;
    (void)path;
    return Error::Make(Code::kUnimplemented, "this VM backend cannot save a VM's state");
  }
  // False for a backend whose guests cannot see disks (the local-process fake): the pod then
  // has no scratch disk and containers write into the agent's own directory.
  virtual bool SupportsDisks() const { return true; }
  // True if the backend runs a VM as the uid its spec names (VmSpec::uid); the fake runs the
  // agent as root whatever the spec says.
  virtual bool ConfinesVms() const { return false; }
  // The running VMs this backend manages (for recovery after a restart).
  virtual Result<std::vector<VmInfo>> List() = 0;
  // Called, from any thread, when a VM stops for whatever reason (power-off, crash, kill).
  virtual void SetOnStopped(std::function<void(const std::string& name)> cb) = 0;
};

}  // namespace peapod::sandboxer
