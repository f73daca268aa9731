// A VmBackend for tests of the sandboxer's pod state machine: each "VM" is the real
// peapod-agent running as a local process (`--listen`), serving the socket where QEMU would
// serve the guest's agent port (VmSpec::agent_socket). No kernel, no disks, no network.
//
// The backend outlives the PodManagers a test builds over it, so a test can "restart the
// sandboxer" (a new PodManager, Recover) while the agents keep running.
#pragma once

#include <sys/types.h>

#include <condition_variable>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "sandboxer/vm_backend.h"

namespace peapod::sandboxer::testing {

class FakeBackend : public VmBackend {
 public:
  // agent_binary: peapod-agent; base_dir: each VM gets <base_dir>/<name> as the agent's run dir.
  FakeBackend(std::string agent_binary, std::string base_dir);
  // Kills every agent still running and joins the watchers.
  ~FakeBackend() override;
  FakeBackend(const FakeBackend&) = delete;
  FakeBackend& operator=(const FakeBackend&) = delete;

  // Spawns the agent and returns once its socket accepts connections.
  Result<VmInfo> Start(const VmSpec& spec) override;
  // SIGKILL and reap; a VM that is not running is fine.
  Result<void> Destroy(const std::string& name) override;
  Result<void> AttachDisk(const std::string& name, const DiskSpec& disk) override;
  Result<void> DetachDisk(const std::string& name, const DiskSpec& disk) override;
  bool SupportsDisks() const override { return false; }
  Result<std::vector<VmInfo>> List() override;
  // Replaces the callback; once this returns the previous one is no longer running nor called.
  void SetOnStopped(std::function<void(const std::string& name)> cb) override;

  // Test controls.
  // The next Start fails with e, spawning nothing.
  void FailNextStart(Error e);
  // The next Start spawns the agent, waits for its socket, then kills it before returning
  // success: a VM that dies while booting.
  void KillAfterNextStart();
  // The next Start runs `prefix... <agent command>` instead of the agent command: a program
  // that stands between the sandboxer and the agent (a hostile channel, say).
  void WrapNextAgent(std::vector<std::string> prefix);
  // Kills a running VM as a crash would (the stop callback fires); false if it is not running.
  bool Kill(const std::string& name);
  // The agent's pid, if running.
  std::optional<pid_t> PidOf(const std::string& name);
  size_t start_calls();
  // The next Destroy waits d first (a slow libvirt).
  void DelayNextDestroy(std::chrono::milliseconds d);
  // Destroy calls that have returned.
  size_t destroy_calls();
  // Where a VM's agent writes its log (the spec's console_log, else <base_dir>/<name>.log).
  std::string LogPath(const std::string& name);

 private:
  struct Proc;
  void Watch(std::shared_ptr<Proc> proc);
  // Signals the VM and waits until its watcher has reaped it. Does nothing if not running.
  bool KillAndReap(const std::string& name);

  const std::string agent_binary_;
  const std::string base_dir_;

  std::mutex mu_;
  std::condition_variable exited_cv_;
  std::map<std::string, std::shared_ptr<Proc>> procs_;  // running (not yet reaped)
  std::map<std::string, std::string> logs_;             // name -> log path, of every VM started
  std::vector<std::thread> watchers_;
  std::optional<Error> fail_next_;
  bool kill_next_ = false;
  std::vector<std::string> wrap_next_;
  size_t start_calls_ = 0;
  std::chrono::milliseconds destroy_delay_{0};
  size_t destroy_calls_ = 0;

  std::mutex cb_mu_;  // held while the callback runs
  std::function<void(const std::string&)> on_stopped_;
};

}  // namespace peapod::sandboxer::testing
