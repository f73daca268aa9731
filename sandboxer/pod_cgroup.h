// Where a pod's VM is accounted on the host: the pod's cgroup.
//
// kubelet gives every pod a cgroup (PodSandboxConfig.linux.cgroup_parent) and containerd's CRI
// reads the pod's CPU and memory from it (ListPodSandboxStats, `crictl statsp`). With runc the
// containers' processes live below it; with peapod the pod's cost on the host is its QEMU, so
// once the VM runs the sandboxer moves QEMU into `<cgroup_parent>/peapod-<pod id>` in every
// hierarchy that accounts CPU, memory, pids or I/O (cgroup v2, or v1's cpu, cpuacct, memory,
// pids and blkio). Memory a pool VM touched before its pod adopted it stays charged where it
// was (v1 moves it with move_charge_at_immigrate; v2 never moves charges).
//
// Only the leaf is ours: it is removed after the VM is gone, with the parents the sandboxer
// made for it (a crictl pod's; kubelet makes and removes its own).
#pragma once

#include <string>
#include <vector>

#include "common/base/result.h"

namespace peapod::sandboxer {

struct PodCgroup {
  std::string leaf;  // relative to each hierarchy's root: "kubepods/pod123/peapod-<id>"
  std::string made;  // the topmost directory the sandboxer created ("" if only the leaf)
};

// The pod's leaf under cgroup_parent: a path ("/kubepods/burstable/pod123", cgroupfs driver)
// or a systemd slice name ("kubepods-burstable-pod123.slice", systemd driver). An empty parent
// is no cgroup (an empty leaf). Anything with "..", "." or empty components is refused.
Result<std::string> PodCgroupLeaf(const std::string& cgroup_parent, const std::string& pod_id);

// The mount points of the hierarchies a pod's VM is placed in (see above).
std::vector<std::string> AccountingHierarchies(
    const std::string& mountinfo = "/proc/self/mountinfo");

// Makes the leaf in every hierarchy and moves pid into it. On error, nothing is left made.
Result<PodCgroup> PlaceInPodCgroup(const std::string& leaf, int pid,
                                   const std::vector<std::string>& hierarchies);

// Removes the leaf (and what the sandboxer made above it, where empty) in every hierarchy.
// An error names the leaves that stay (one still holding a process: QEMU still exiting).
Result<void> RemovePodCgroup(const PodCgroup& cg, const std::vector<std::string>& hierarchies);

}  // namespace peapod::sandboxer
