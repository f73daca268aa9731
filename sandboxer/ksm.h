// Kernel samepage merging for pod VMs. QEMU marks guest RAM mergeable (libvirt leaves it so),
// so with KSM running, identical pages of VMs booted from one image (kernel, initrd, agent,
// crun) are stored once: bench/ measured idle pool VMs' PSS at about two thirds. KSM is
// host-wide and merging lets one guest time another's page faults (a known cross-VM side
// channel), so the sandboxer turns it on only when its config says "ksm": true.
#pragma once

#include <string>

#include "common/base/result.h"

namespace peapod::sandboxer {

inline constexpr char kKsmRunFile[] = "/sys/kernel/mm/ksm/run";

// Starts KSM if it is stopped (run_file reads 0). True if this call started it; an error says
// why it could not (no KSM in the kernel, a read-only /sys).
Result<bool> StartKsm(const std::string& run_file = kKsmRunFile);

}  // namespace peapod::sandboxer
