// Container statistics from the guest's cgroup v2 files, in containerd's cgroups v2 Metrics.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "common/base/result.h"
#include "containerd/cgroups/v2/metrics.pb.h"

namespace peapod::agent {

// Fills metrics from the cgroup directory dir (cpu.stat, memory.*, pids.*, io.stat).
// Missing files (a controller that is not enabled) leave their part empty.
Result<void> ReadCgroupMetrics(const std::string& dir, io::containerd::cgroups::v2::Metrics* m);

// The oom_kill counter of a memory.events file.
std::optional<uint64_t> ReadOOMKills(const std::string& memory_events);

}  // namespace peapod::agent
