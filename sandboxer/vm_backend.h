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

struct VmSpec {
  std::string name;  // the libvirt domain name: "peapod-<pod id>"
  std::string kernel;
  std::string initrd;
  std::string cmdline;
  unsigned vcpus = 1;
  uint64_t memory_mib = 512;
  bool kvm = false;  // domain type kvm, else qemu (TCG)
  // QEMU listens here for the virtio-serial agent port (io.peapod.agent.0).
  std::string agent_socket;
  // Exported to the guest over 9p with mount tag "peapod-share" (empty: none).
  std::string share_dir;
  // The pod NIC: a TAP that exists (in our netns) for QEMU to open, and the MAC the guest
  // NIC takes (the CNI interface's). Empty tap: no NIC (loopback only).
  std::string tap;
  std::string mac;
  // What the guest prints on its serial console.
  std::string console_log;
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
  // The running VMs this backend manages (for recovery after a restart).
  virtual Result<std::vector<VmInfo>> List() = 0;
  // Called, from any thread, when a VM stops for whatever reason (power-off, crash, kill).
  virtual void SetOnStopped(std::function<void(const std::string& name)> cb) = 0;
};

}  // namespace peapod::sandboxer
