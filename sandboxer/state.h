// Pod records: what the sandboxer must remember across its own restarts. Written atomically
// (temp file, fsync, rename, fsync of the directory) before the action they describe.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "common/base/result.h"

namespace peapod::sandboxer {

// A disk attached to the pod's VM.
struct DiskRecord {
  unsigned unit = 0;  // SCSI LUN on the pod's controller
  std::string path;   // host image file
  bool readonly = true;
  bool cached = false;  // a LayerCache image (one reference held while attached)
};

struct PodRecord {
  enum class Phase { kCreated, kStarting, kRunning, kStopped };
  std::string id;
  std::string netns;
  std::string domain;  // libvirt domain name
  Phase phase = Phase::kCreated;
  int64_t created_at_ns = 0;
  int64_t exited_at_ns = 0;
  uint32_t exit_status = 0;
  int pid = 0;  // QEMU's
  // What the pod asked for, and the VM size the sandboxer derived from it.
  std::string hostname;
  int64_t memory_limit_bytes = 0;
  double cpus = 0;
  unsigned vcpus = 0;
  uint64_t memory_mib = 0;
  std::vector<std::string> dns_servers, dns_searches, dns_options;
  std::map<std::string, std::string> sysctls;
  bool cri_files = false;
  // The pod's cgroup (pod_cgroup.h): asked for, and where QEMU was put ("" until then).
  std::string cgroup_parent, cgroup_leaf, cgroup_made;
  std::string tap;                // the pod's TAP when not TapName(id) (a pool VM's)
  bool scratch = false;           // the scratch disk (unit 0) exists
  std::vector<DiskRecord> disks;  // hot-added layer disks
  // Per container: the units of its rootfs layers, topmost first.
  std::map<std::string, std::vector<unsigned>> rootfs;
  // Per container: the share paths of its volumes (host bind mounts).
  std::map<std::string, std::vector<std::string>> volumes;
};

std::string PhaseName(PodRecord::Phase p);

class StateStore {
 public:
  explicit StateStore(std::string dir) : dir_(std::move(dir)) {}
  Result<void> Init();
  Result<void> Save(const PodRecord& rec);
  Result<void> Remove(const std::string& id);
  // Every record; unreadable ones are reported and skipped (never deleted: a person may want
  // to look at them).
  Result<std::vector<PodRecord>> LoadAll();
  std::string PodDir(const std::string& id) const { return dir_ + "/pods/" + id; }

 private:
  std::string dir_;
};

// Writes data to path atomically: path never holds a partial file, even after a crash.
Result<void> WriteFileAtomic(const std::string& path, const std::string& data);

}  // namespace peapod::sandboxer
