// The one boot sequence of a VM, for a pod's cold start and for a warm-pool VM alike: its
// uid and scratch disk, its TAP, define and start through the backend, the TAP joined to the
// pod network. Each step is timed; a failure undoes the steps before it, so no scratch disk,
// TAP or uid is left. Worker threads (every step may block); nothing here touches pod state.
#pragma once

#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "common/base/result.h"
#include "sandboxer/config.h"
#include "sandboxer/network.h"
#include "sandboxer/seams.h"
#include "sandboxer/vm_backend.h"
#include "sandboxer/vm_identity.h"

namespace peapod::sandboxer {

// Whether VMs run under KVM for the configured accel ("kvm", "tcg", or "auto": KVM if /dev/kvm
// works, asked once per process).
bool UsesKvm(const Config& cfg);

class VmLauncher {
 public:
  VmLauncher(const Config& cfg, VmBackend* backend, Network* net, Storage* storage,
             VmIdentities* ids)
      : cfg_(cfg), backend_(backend), net_(net), storage_(storage), ids_(ids) {}

  // The VM all pods and pool VMs share: image, accel, and the sockets, share, console log and
  // scratch disk under run_dir / state_dir.
  VmSpec BaseSpec(const std::string& domain, const std::string& run_dir,
                  const std::string& state_dir, unsigned vcpus, uint64_t memory_mib) const;

  struct Launch {
    VmSpec spec;  // its tap and mac are filled in
    // A pod's TAP is made in its netns and joined to the CNI interface once QEMU opened it; a
    // pool VM's is made on the host (spec.tap) and joined when a pod adopts the VM.
    enum class Tap { kNone, kPodNetns, kHost } tap = Tap::kNone;
    std::string pod_id, netns;                          // kPodNetns
    std::optional<PodNetwork> net;                      // out (kPodNetns)
    std::vector<std::pair<std::string, double>> steps;  // out: ms per step
    // out: why the restore from spec.restore_from failed (DATA_LOSS: the state would not load).
    // The VM then booted instead, and spec.restore_from is empty.
    std::string restore_failed;
  };
  Result<VmInfo> Run(Launch& l);

  // Undoes what a launch made of a VM's files: its scratch disk and uid (if confined). uid (if
  // not 0): only while domain's files are still that uid's.
  void DiscardVmFiles(const std::string& domain, const std::string& scratch, uint32_t uid = 0);

 private:
  bool UseKvm() const;
  // The VM's uid and directories (if confined) and its scratch disk, given to it.
  Result<void> PrepareVmFiles(VmSpec& spec);

  const Config& cfg_;
  VmBackend* backend_;
  Network* net_;
  Storage* storage_;
  VmIdentities* ids_;
};

}  // namespace peapod::sandboxer
