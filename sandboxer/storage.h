// Container storage on the host side: containerd's rootfs mounts turned into read-only layer
// disks (erofs blobs attached as they are or copied for confined VMs, layer directories
// converted once by mkfs.erofs and cached), the per-pod scratch disk, and volumes
// bind-mounted into the pod's 9p share.
#pragma once

#include <chrono>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "common/base/result.h"
#include "containerd/types/mount.pb.h"

namespace peapod::sandboxer {

class WorkerPool;

// One read-only layer of a rootfs.
struct LayerSource {
  std::string path;
  bool is_image = false;  // an EROFS image file (attach as is); else a directory to convert
};

// The layers of containerd's rootfs mounts, topmost first. Understands the overlayfs
// snapshotter (overlay with lowerdir=..., or a bind mount of a single layer) and the erofs
// snapshotter (erofs mounts of layer blobs, or overlay lowerdirs that have a layer.erofs next
// to them). The writable upper of an overlay mount is not used: writes go to the pod's scratch
// disk. Anything else is refused with what to change.
Result<std::vector<LayerSource>> LayersFromMounts(
    const google::protobuf::RepeatedPtrField<containerd::types::Mount>& mounts);

// EROFS images of layer directories, built once per layer (concurrent requests for the same
// layer share one mkfs.erofs run) and counted by user; images nobody has used for keep_for are
// deleted by Collect(). Loop thread only, except the builds, which run on the worker pool and
// post their results back through `post`.
class LayerCache {
 public:
  using Post = std::function<void(std::function<void()>)>;
  using Done = std::function<void(Result<std::string>)>;  // the image path

  LayerCache(std::string dir, std::string mkfs, std::chrono::seconds keep_for, WorkerPool* workers,
             Post post);

  // Creates the directory; images left from before count as unused from now.
  Result<void> Init();
  // The image of layer directory `dir`, built if needed; done gets its path, one reference
  // taken.
  void Acquire(const std::string& dir, Done done);
  // The same for an EROFS blob of containerd's (erofs snapshotter): copied once into the cache
  // (a reflink where the filesystem can), where a confined QEMU can open it; containerd's
  // own directories are root's alone.
  void AcquireCopy(const std::string& blob, Done done);
  // Re-takes a reference to an image recorded by a pod (recovery). False if it is gone.
  bool Adopt(const std::string& image);
  // Drops one reference.
  void Release(const std::string& image);
  // Deletes images unused for longer than keep_for (and orphaned temp files).
  void Collect();
  bool IsCached(const std::string& image) const;
  const std::string& dir() const { return dir_; }

 private:
  struct Entry {
    int refs = 0;
    std::chrono::steady_clock::time_point unused_since;
  };
  // Identifies a layer directory's content: containerd never changes a committed snapshot, so
  // its path plus the directory's identity (device, inode, birth time) names it; a directory
  // removed and recreated at the same path gets a new key.
  Result<std::string> KeyOf(const std::string& dir) const;
  // Acquire and AcquireCopy: make the image of `source` with `make(source, tmp)` unless cached.
  void AcquireWith(const std::string& source,
                   std::function<Result<void>(const std::string&, const std::string&)> make,
                   Done done);

  std::string dir_;
  std::string mkfs_;
  std::chrono::seconds keep_for_;
  WorkerPool* workers_;
  Post post_;
  std::map<std::string, Entry> images_;                // by image path
  std::map<std::string, std::vector<Done>> building_;  // by image path
};

// 8 hex digits naming a string (stable across runs): short unique-enough names for paths.
std::string ShortHash(const std::string& s);

// The pod's scratch disk: a sparse ext4 image (no journal: it dies with the pod).
Result<void> MakeScratchDisk(const std::string& mkfs_ext4, const std::string& path,
                             uint64_t size_mib);

// Unmounts everything mounted at or below `path` (a directory the host owns: a pod's run dir),
// then removes the tree, all by fd (common/base/beneath.h): nothing below `path` is followed
// or crossed, so a volume still mounted there is never deleted through.
Result<void> RemoveTreeSafely(const std::string& path);

}  // namespace peapod::sandboxer
