// The sandboxer's seams: what the pod code (pods.h) asks of the host's network, of its
// filesystem and of the time, as three narrow interfaces. Each has one real implementation,
// here, and a fake for the tests that can fail on cue (tests/sandboxer/fakes.h): a TAP that
// vanishes, a full disk, a mount that fails, a clock that jumps.
//
// The calls may block (netlink, mount, fsync): the pod code makes them on worker threads,
// never on its control loop, except Clock's, which are the loop's own.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "common/base/result.h"
#include "common/loop/event_loop.h"
#include "sandboxer/network.h"
#include "sandboxer/pod_share.h"
#include "sandboxer/state.h"

namespace peapod::sandboxer {

// A pod's network on the host (network.h has the real thing and its steps).
class Network {
 public:
  virtual ~Network() = default;
  virtual bool NetnsExists(const std::string& netns) = 0;
  // The CNI interface read in netns, and a TAP named for the pod in our netns.
  virtual Result<PodNetwork> PrepareTap(const std::string& pod_id, const std::string& netns) = 0;
  // The CNI interface alone (a pool VM's TAP exists already).
  virtual Result<PodNetwork> ReadPodNetwork(const std::string& netns) = 0;
  virtual Result<void> CreateTap(const std::string& tap) = 0;
  // The TAP moved into net.netns and joined to the CNI interface.
  virtual Result<void> AttachTap(const PodNetwork& net) = 0;
  // Wherever it is; missing is fine.
  virtual void RemoveTap(const std::string& tap, const std::string& netns) = 0;
};

// The host filesystem as pods use it: their records, run dirs and shares, scratch disks.
class Storage {
 public:
  virtual ~Storage() = default;
  // Pod records (state.h): written durably before the step they describe.
  virtual Result<void> InitRecords() = 0;
  virtual Result<void> SaveRecord(const PodRecord& rec) = 0;
  virtual Result<void> RemoveRecord(const std::string& id) = 0;
  virtual Result<std::vector<PodRecord>> LoadRecords() = 0;
  // A pod's record directory (its console log and, unconfined, its scratch disk live there).
  virtual std::string RecordDir(const std::string& id) const = 0;

  // <run_dir>/pods, the pods' run dirs' parent: run_dir and it made root's alone, and it a
  // private mount, so nothing mounted below reaches the host's mounts (docs/security.md).
  virtual Result<void> PrepareRunRoot(const std::string& run_dir) = 0;
  // A pod's run dir with its read-only share, and a file at the top of the share
  // (pod_share.h).
  virtual Result<void> PrepareShare(const std::string& run_dir) = 0;
  virtual Result<void> WriteShareFile(const std::string& run_dir, const std::string& name,
                                      const std::string& content) = 0;
  // Volumes bound into the share, all or nothing; and removed again (pod_share.h).
  virtual Result<SharedVolumes> ShareVolumes(const std::string& run_dir,
                                             const std::string& container, size_t first,
                                             const std::vector<VolumeRequest>& volumes,
                                             const std::string& skip_below) = 0;
  virtual Result<void> RemoveFromShare(const std::string& run_dir, const std::string& rel) = 0;

  // A file of ours outside the share (containerd's CRI pod files), atomically, mode 0644, its
  // directory made if missing.
  virtual Result<void> WriteFile(const std::string& path, const std::string& content) = 0;
  // Missing is fine.
  virtual void RemoveFile(const std::string& path) = 0;
  virtual Result<void> MakeDirs(const std::string& path) = 0;
  // Unmounts what is below path and removes the tree, never following or crossing anything
  // (storage.h: RemoveTreeSafely). Missing is fine.
  virtual Result<void> RemoveTree(const std::string& path) = 0;
  // from to to; a missing `from` is fine when `missing_ok`.
  virtual Result<void> Rename(const std::string& from, const std::string& to,
                              bool missing_ok = false) = 0;
  // The names in a directory (none if it does not exist).
  virtual std::vector<std::string> List(const std::string& dir) = 0;
  // A sparse ext4 image of size_mib (storage.h).
  virtual Result<void> MakeScratchDisk(const std::string& path, uint64_t size_mib) = 0;
};

// The time the pod code goes by: deadlines, retries and the timestamps it records. Loop thread.
class Clock {
 public:
  using TimePoint = EventLoop::Clock::time_point;
  virtual ~Clock() = default;
  virtual TimePoint Now() const = 0;
  // Wall time in ns since the epoch (what containerd gets as created_at, exited_at).
  virtual int64_t WallNs() const = 0;
  // Runs fn on the loop once `after` has passed by this clock.
  virtual void After(std::chrono::milliseconds after, std::function<void()> fn) = 0;
};

// The real ones.
class HostNetwork : public Network {
 public:
  bool NetnsExists(const std::string& netns) override;
  Result<PodNetwork> PrepareTap(const std::string& pod_id, const std::string& netns) override;
  Result<PodNetwork> ReadPodNetwork(const std::string& netns) override;
  Result<void> CreateTap(const std::string& tap) override;
  Result<void> AttachTap(const PodNetwork& net) override;
  void RemoveTap(const std::string& tap, const std::string& netns) override;
};

class HostStorage : public Storage {
 public:
  HostStorage(std::string state_dir, std::string mkfs_ext4);
  Result<void> InitRecords() override;
  Result<void> SaveRecord(const PodRecord& rec) override;
  Result<void> RemoveRecord(const std::string& id) override;
  Result<std::vector<PodRecord>> LoadRecords() override;
  std::string RecordDir(const std::string& id) const override;
  Result<void> PrepareRunRoot(const std::string& run_dir) override;
  Result<void> PrepareShare(const std::string& run_dir) override;
  Result<void> WriteShareFile(const std::string& run_dir, const std::string& name,
                              const std::string& content) override;
  Result<SharedVolumes> ShareVolumes(const std::string& run_dir, const std::string& container,
                                     size_t first, const std::vector<VolumeRequest>& volumes,
                                     const std::string& skip_below) override;
  Result<void> RemoveFromShare(const std::string& run_dir, const std::string& rel) override;
  Result<void> WriteFile(const std::string& path, const std::string& content) override;
  void RemoveFile(const std::string& path) override;
  Result<void> MakeDirs(const std::string& path) override;
  Result<void> RemoveTree(const std::string& path) override;
  Result<void> Rename(const std::string& from, const std::string& to, bool missing_ok) override;
  std::vector<std::string> List(const std::string& dir) override;
  Result<void> MakeScratchDisk(const std::string& path, uint64_t size_mib) override;

 private:
  StateStore store_;
  std::string mkfs_ext4_;
};

class LoopClock : public Clock {
 public:
  explicit LoopClock(EventLoop* loop) : loop_(loop) {}
  TimePoint Now() const override { return EventLoop::Clock::now(); }
  int64_t WallNs() const override;
  void After(std::chrono::milliseconds after, std::function<void()> fn) override;

 private:
  EventLoop* loop_;
};

// What a PodManager runs over (null members: the real ones).
struct Seams {
  Network* network = nullptr;
  Storage* storage = nullptr;
  Clock* clock = nullptr;
};

}  // namespace peapod::sandboxer
