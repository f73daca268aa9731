// /proc/<pid>/mountinfo, read: where things are mounted and how.
#pragma once

#include <string>
#include <vector>

namespace peapod {

struct MountPoint {
  std::string path;           // unescaped mount point
  bool readonly = false;      // the mount's own (per-mount) "ro" flag
  std::string fstype;         // "cgroup2", "ext4", ...
  std::string super_options;  // the filesystem's options (a cgroup v1 mount's controllers)
};

// Every mount in the table, in its order (parents before children). An unreadable table
// reads as empty.
std::vector<MountPoint> ReadMountTable(const std::string& table = "/proc/self/mountinfo");

// The mounts at `dir` itself (when below_only is false) and strictly below it.
std::vector<MountPoint> MountsUnder(const std::string& dir, bool below_only,
                                    const std::string& table = "/proc/self/mountinfo");

}  // namespace peapod
