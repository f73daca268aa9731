// The sandboxer's pods: one control loop owns every pod's state, VM handle, agent channel mux
// and waiters. Callers (gRPC threads) post requests and get answers through callbacks, which
// run on the loop thread. Slow work (libvirt calls) runs on worker threads and posts back.
//
// Lifecycle: Create (record + pod files) -> Start (VM boots, agent answers, pod READY) ->
// Stop (agent powers off, VM destroyed; Wait returns) -> Shutdown (everything removed).
// A VM that dies by itself makes the pod stopped at once. Records are saved before each step,
// so a restarted sandboxer re-adopts running VMs (Recover) and cleans what has no record.
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/base/result.h"
#include "common/loop/event_loop.h"
#include "common/ttrpc/client.h"
#include "sandboxer/agent_mux.h"
#include "sandboxer/config.h"
#include "sandboxer/state.h"
#include "sandboxer/vm_backend.h"

namespace peapod::sandboxer {

// A few threads for blocking work (libvirt, filesystem), so the control loop never blocks.
class WorkerPool {
 public:
  explicit WorkerPool(size_t threads);
  ~WorkerPool();
  void Run(std::function<void()> job);

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> jobs_;
  bool quit_ = false;
  std::vector<std::thread> threads_;
};

struct PodStatus {
  std::string id;
  bool ready = false;
  int pid = 0;
  int64_t created_at_ns = 0;
  int64_t exited_at_ns = 0;
  std::string address;  // the pod's agent socket, unix://...
  std::string phase;
};

struct PodExit {
  uint32_t exit_status = 0;
  int64_t exited_at_ns = 0;
};

class PodManager {
 public:
  template <typename T>
  using Reply = std::function<void(Result<T>)>;

  PodManager(EventLoop* loop, const Config& cfg, VmBackend* backend);
  ~PodManager();

  // Loads records, re-adopts running VMs, cleans leftovers. Loop thread, before serving.
  Result<void> Recover();

  // All on the loop thread.
  void Create(const std::string& id, const std::string& netns, Reply<void> reply);
  void Start(const std::string& id, Reply<PodStatus> reply);
  void Stop(const std::string& id, uint32_t timeout_secs, Reply<void> reply);
  void Wait(const std::string& id, Reply<PodExit> reply);
  Result<PodStatus> Status(const std::string& id);
  void Shutdown(const std::string& id, Reply<void> reply);
  // Answers every pending Wait with UNAVAILABLE (the sandboxer is going away; pods are not).
  void CancelWaiters();
  // Called (any thread) by the backend when a VM stops.
  void VmStopped(const std::string& domain);

  // <run_dir>/pods/<id>: the pod's sockets and share.
  std::string RunDir(const std::string& id) const;
  std::string AgentSocket(const std::string& id) const;

 private:
  struct Pod;
  Pod* Find(const std::string& id);
  Result<void> Save(Pod& pod);
  Result<void> PreparePodFiles(const std::string& id);
  Result<void> AttachChannel(Pod& pod);
  // Undoes a Start that failed (destroying the VM and TAP if they exist) and answers reply.
  void FailStart(const std::string& id, Error e, bool vm_started, Reply<PodStatus> reply);
  void WaitForAgent(const std::string& id, EventLoop::Clock::time_point deadline,
                    Reply<PodStatus> reply);
  void MarkStopped(Pod& pod, uint32_t status);
  PodStatus StatusOf(const Pod& pod) const;
  VmSpec SpecFor(const Pod& pod) const;
  bool UseKvm() const;

  EventLoop* loop_;
  Config cfg_;
  VmBackend* backend_;
  StateStore store_;
  WorkerPool workers_{2};
  std::map<std::string, std::unique_ptr<Pod>> pods_;
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
};

}  // namespace peapod::sandboxer
