// Fakes of the sandboxer's seams (sandboxer/seams.h) and of its VM backend, for fast tests of
// the pod state machine without root, QEMU or a kernel (tests/sandboxer/pod_states_test.cc).
//
// Each fake keeps what it "made" so a test can see what a failure left behind, and fails on
// cue: FailNext("Op", error) makes the next call of Op fail with that error. They are
// thread-safe (the pod code calls them from its workers) and outlive the PodManagers a test
// builds over them, so a test can restart the sandboxer and see what it recovers.
#pragma once

#include <atomic>
#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "common/loop/event_loop.h"
#include "common/ttrpc/server.h"
#include "peapod/agent/v1/agent.pb.h"
#include "sandboxer/seams.h"
#include "sandboxer/vm_backend.h"

namespace peapod::sandboxer::testing {

// Errors queued per operation name.
class Faults {
 public:
  // The call of op after `after` more successful ones fails with e.
  void FailNext(const std::string& op, Error e, int after = 0);
  // The error queued for op, if any (taken).
  std::optional<Error> Take(const std::string& op);

 private:
  std::mutex mu_;
  std::map<std::string, std::deque<std::pair<int, Error>>> next_;
};

// TAPs as names, each in our netns ("") or a pod's. Ops: PrepareTap, ReadPodNetwork,
// CreateTap, AttachTap.
class FakeNetwork : public Network, public Faults {
 public:
  // A netns path that "exists" (Create checks).
  void AddNetns(const std::string& path);
  // Someone deletes the TAP behind our back (AttachTap then finds no such device).
  void VanishTap(const std::string& tap);
  // TAP name -> where it is.
  std::map<std::string, std::string> taps();

  bool NetnsExists(const std::string& netns) override;
  Result<PodNetwork> PrepareTap(const std::string& pod_id, const std::string& netns) override;
  Result<PodNetwork> ReadPodNetwork(const std::string& netns) override;
  Result<void> CreateTap(const std::string& tap) override;
  Result<void> AttachTap(const PodNetwork& net) override;
  void RemoveTap(const std::string& tap, const std::string& netns) override;

 private:
  std::mutex mu_;
  std::set<std::string> netns_;
  std::map<std::string, std::string> taps_;
};

// Records, files and binds in memory; only directories are real (run dirs, where the pod code
// and the fake guests put their sockets). Ops: SaveRecord, RemoveRecord, PrepareShare,
// WriteShareFile, ShareVolumes, RemoveFromShare, WriteFile, RemoveTree, Rename,
// MakeScratchDisk.
class FakeStorage : public Storage, public Faults {
 public:
  explicit FakeStorage(std::string state_dir) : state_dir_(std::move(state_dir)) {}

  std::map<std::string, PodRecord> records();
  std::set<std::string> dirs();  // made by MakeDirs and not removed since
  std::set<std::string> scratch_disks();
  // Share paths bound, <run_dir>/share/<rel>.
  std::set<std::string> binds();
  // Files written (share files and others) by path.
  std::map<std::string, std::string> files();
  // Every record saved, in order.
  std::vector<PodRecord> history();
  // Writes a record as if a previous sandboxer had (for recovery tests).
  void PutRecord(const PodRecord& rec);
  // Blocks the saves of records in phase `phase` until ReleaseSaves (a slow disk at that step).
  void HoldSaves(PodRecord::Phase phase);
  void ReleaseSaves();
  // Blocks every ShareVolumes until Release (a slow mount).
  void HoldShares();
  void ReleaseShares();

  Result<void> InitRecords() override { return Ok(); }
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
  void ErasePrefix(const std::string& prefix);

  std::string state_dir_;
  std::mutex mu_;
  std::condition_variable shares_cv_;
  bool hold_shares_ = false;
  std::optional<PodRecord::Phase> hold_saves_;
  std::map<std::string, PodRecord> records_;
  std::vector<PodRecord> history_;
  std::set<std::string> scratch_, binds_, dirs_;
  std::map<std::string, std::string> files_;
};

// The loop's clock plus an offset a test moves: Jump makes deadlines pass at once (timers due
// by the jumped clock fire), JumpWall moves wall time (a host clock set back or forth).
class FakeClock : public Clock {
 public:
  explicit FakeClock(EventLoop* loop) : loop_(loop) {}
  ~FakeClock() override { *alive_ = false; }
  TimePoint Now() const override;
  int64_t WallNs() const override;
  void After(std::chrono::milliseconds after, std::function<void()> fn) override;
  // Any thread.
  void Jump(std::chrono::milliseconds d);
  void JumpWall(std::chrono::milliseconds d);

 private:
  void FireDue();
  EventLoop* loop_;
  std::atomic<int64_t> offset_ns_{0}, wall_offset_ns_{0};
  std::multimap<TimePoint, std::function<void()>> timers_;  // loop thread
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
};

// A VM backend whose guests are fake agents on a loop thread of its own: each "VM" serves the
// agent API on its spec's agent socket, with what the pod code needs (Check, ConfigureNetwork,
// CreateSandbox, DestroySandbox, which powers it off, StatsContainer). Disks are recorded per
// VM. Ops: Start, Destroy, AttachDisk, DetachDisk, ConfigureNetwork (the agent's answer to a
// pod's, not to a pool VM's standby one).
class FakeVms : public VmBackend, public Faults {
 public:
  FakeVms();
  ~FakeVms() override;

  Result<VmInfo> Start(const VmSpec& spec) override;
  Result<void> Destroy(const std::string& name) override;
  Result<void> AttachDisk(const std::string& name, const DiskSpec& disk) override;
  Result<void> DetachDisk(const std::string& name, const DiskSpec& disk) override;
  Result<std::vector<VmInfo>> List() override;
  void SetOnStopped(std::function<void(const std::string& name)> cb) override;
  // Templates, once EnableTemplates: SaveState writes a small file; a Start whose restore_from
  // holds a file beginning "bad" fails with DATA_LOSS, as a state QEMU cannot load.
  bool SupportsTemplates() const override { return templates_; }
  Result<void> SaveState(const std::string& name, const std::string& path) override;

  // Test controls.
  void EnableTemplates() { templates_ = true; }
  // The agent calls a VM got, in order (Resumed, ConfigureNetwork, CreateSandbox,
  // PrepareTemplate), and whether it was restored.
  std::vector<std::string> CallsOf(const std::string& name);
  bool Restored(const std::string& name);
  // The next VM started never answers its agent's Check (a guest that does not boot).
  void HangNextBoot();
  // From now on ConfigureNetwork is answered only once the same VM's CreateSandbox arrives: a
  // start that waits for the first answer before sending the second never ends.
  void HoldNetworkUntilSandbox() { hold_network_ = true; }
  // StatsContainer calls go unanswered from now on (a guest that hangs on them).
  void HoldStats() { hold_stats_ = true; }
  // The VM dies (the stop callback fires); false if it was not running.
  bool Kill(const std::string& name);
  std::set<std::string> running();
  std::optional<VmSpec> SpecOf(const std::string& name);
  // Units of the disks attached to a VM after boot.
  std::set<unsigned> DisksOf(const std::string& name);
  // The last CreateSandbox / ConfigureNetwork a VM's agent got.
  std::optional<peapod::agent::v1::CreateSandboxRequest> SandboxOf(const std::string& name);
  std::optional<peapod::agent::v1::ConfigureNetworkRequest> NetworkOf(const std::string& name);
  size_t start_calls();

 private:
  struct Vm;
  // Stops a VM's guest (its sockets close) and forgets it; the callback then fires.
  bool StopVm(const std::string& name, bool on_loop = false);
  void Serve(const std::shared_ptr<Vm>& vm);

  std::unique_ptr<EventLoop> loop_;
  std::thread thread_;
  std::mutex mu_;
  std::map<std::string, std::shared_ptr<Vm>> vms_;
  std::map<std::string, std::set<unsigned>> disks_;
  std::map<std::string, VmSpec> specs_;
  bool hang_next_ = false;
  bool templates_ = false;
  std::map<std::string, std::vector<std::string>> calls_;
  std::set<std::string> restored_;
  std::atomic<bool> hold_stats_{false};
  std::atomic<bool> hold_network_{false};
  size_t start_calls_ = 0;
  int next_pid_ = 100000;
  std::mutex cb_mu_;
  std::function<void(const std::string&)> on_stopped_;
};

}  // namespace peapod::sandboxer::testing
