// What the agent mounts for containers: layer disks, scratch disks, the pod's 9p share, tmpfs,
// bind mounts, and each container's overlayfs rootfs on top of its layers.
#pragma once

#include <chrono>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "common/base/result.h"
#include "peapod/agent/v1/agent.pb.h"

namespace peapod::agent {

// The block device (/dev/sdX) of the disk at SCSI address "target:lun" on the pod's
// virtio-scsi controller, waiting up to timeout for a hot-added disk to show up.
Result<std::string> FindScsiDisk(const std::string& address, std::chrono::milliseconds timeout);

// Splits mount(8)-style options into MS_* flags and the filesystem's data string.
struct MountOptions {
  unsigned long flags = 0;
  std::string data;
};
MountOptions ParseMountOptions(const std::vector<std::string>& options);

// Mounts shared by containers (a layer used by two containers is mounted once), counted by
// mount point.
class StorageManager {
 public:
  Result<void> Acquire(const peapod::agent::v1::Storage& storage);
  // Unmounts once the last user is gone.
  void Release(const std::string& mount_point);
  // Unmounts everything (sandbox teardown).
  void ReleaseAll();
  // Loads the modules mounting fstype needs, once (Acquire does it before a mount).
  Result<void> LoadFilesystemModules(const std::string& fstype);

 private:
  std::map<std::string, int> refs_;
  std::set<std::string> loaded_fs_;
};

// Creates the rootfs of a container at `target`: overlayfs with `lower_dirs` (topmost first)
// under upper_dir/work_dir, which are created.
Result<void> MountOverlay(const std::vector<std::string>& lower_dirs, const std::string& upper_dir,
                          const std::string& work_dir, const std::string& target);

// mkdir -p.
Result<void> MakeDirs(const std::string& path);
// Detaches a mount (MNT_DETACH); a path that is not mounted is fine.
void Unmount(const std::string& target);

}  // namespace peapod::agent
