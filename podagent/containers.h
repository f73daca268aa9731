// The pod's containers inside the guest, run with crun on the VM's one kernel.
//
// Every container of the pod shares the VM's network, IPC and UTS namespaces (the VM is the
// pod's sandbox, so there is no pause process) and gets its own mount, PID and cgroup
// namespaces. The host's spec is rewritten for the guest: rootfs (overlayfs over the layer
// disks), cgroup path (/peapod/<id> on the guest's cgroup v2), no host namespace paths, no host
// hooks or LSM labels.
//
// crun runs as a short-lived helper (create/start/exec --detach/delete...) on the event loop;
// its container processes are reparented to the agent, which reaps them and reports their
// exit. Requests for one container are not serialized: one that arrives while the container
// is still being created gets FAILED_PRECONDITION.
#pragma once

#include <sys/types.h>
#include <chrono>

#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "common/base/result.h"
#include "common/loop/event_loop.h"
#include "common/oci/spec.h"
#include "peapod/agent/v1/agent.pb.h"
#include "podagent/process.h"
#include "podagent/storage.h"
#include "podagent/stream.h"

namespace peapod::agent {

struct ContainerOptions {
  std::string crun = "/usr/bin/crun";
  // Bundles, rootfs mount points, console sockets, default writable layers.
  std::string run_dir = "/run/peapod";
  // cgroup v2 mount, and the subtree (under it) for containers. Empty cgroup_root: containers
  // get no cgroup limits, stats, pause or OOM events (local mode on a host without cgroup v2).
  std::string cgroup_root = "/sys/fs/cgroup";
  std::string cgroup_parent = "/peapod";
  // crun --no-pivot: needed when the agent's root is the initramfs itself (see pid1.h).
  bool no_pivot = false;
  // crun runs without address randomization (SpawnOptions::fixed_addresses); the containers'
  // processes get it back (RewriteSpec sets a personality crun applies before their exec).
  bool fixed_helper_addresses = false;
  // Exec processes are started by the agent where it can (exec.h), by crun otherwise.
  bool agent_exec = true;
};

class ContainerManager {
 public:
  template <typename T>
  using Reply = std::function<void(Result<T>)>;

  ContainerManager(EventLoop* loop, Reaper* reaper, ContainerOptions opts);
  ~ContainerManager();

  // Enables the cgroup controllers for the container subtree. Once, before any container.
  Result<void> Init();

  // Mounts the pod-wide storages (the 9p share, the scratch disk) for the pod's lifetime.
  Result<void> AcquirePodStorage(const google::protobuf::RepeatedPtrField<v1::Storage>& storages);
  // Loads what mounting a filesystem of this type needs (a template VM, before it is saved).
  Result<void> LoadFilesystemModules(const std::string& fstype) {
    return storage_.LoadFilesystemModules(fstype);
  }
  void Create(v1::CreateContainerRequest req, Reply<v1::CreateContainerResponse> reply);
  void Start(const std::string& id, Reply<v1::StartContainerResponse> reply);
  void Exec(v1::ExecProcessRequest req, Reply<v1::ExecProcessResponse> reply);
  Result<void> Signal(const v1::SignalProcessRequest& req);
  void Wait(const std::string& id, const std::string& exec_id, std::function<bool()> waiting,
            Reply<v1::WaitProcessResponse> reply);
  Result<void> DeleteProcess(const std::string& id, const std::string& exec_id);
  void Pause(const std::string& id, Reply<void> reply);
  void Resume(const std::string& id, Reply<void> reply);
  void Update(const std::string& id, const std::string& resources_json, Reply<void> reply);
  Result<v1::StatsContainerResponse> Stats(const std::string& id);
  Result<v1::ListProcessesResponse> ListProcesses(const std::string& id);
  Result<v1::StateContainerResponse> State(const std::string& id);
  void Remove(const std::string& id, bool force, Reply<void> reply);
  // Answers with the next container OOM kill (waiting if there is none yet).
  // Only container_id's, unless it is empty.
  void NextOOMEvent(const std::string& container_id, std::function<bool()> waiting,
                    Reply<v1::OOMEvent> reply);

  // stdio of a process (exec_id empty: the container's init).
  Result<OutputStream*> Output(const std::string& id, const std::string& exec_id, bool stderr);
  Result<InputStream*> Input(const std::string& id, const std::string& exec_id);
  Result<void> ResizePty(const v1::ResizePtyRequest& req);

  // SIGKILLs every container process (sandbox teardown).
  void KillAll();
  size_t size() const { return containers_.size(); }

 private:
  struct Process;
  struct Container;
  using ContainerPtr = std::shared_ptr<Container>;

  Result<ContainerPtr> Find(const std::string& id) const;
  Result<Process*> FindProcess(const std::string& id, const std::string& exec_id) const;
  // Rewrites the host's spec for the guest (see the top of this file).
  Result<void> RewriteSpec(const std::string& id, oci::Spec& spec, const std::string& rootfs) const;
  Result<void> PrepareStdio(Process& p, const std::string& console_socket, bool stdin,
                            bool terminal, std::vector<UniqueFd>& child_fds);
  Result<void> FinishStdio(Process& p, const std::string& console_socket);
  void Track(const ContainerPtr& c, Process* p);
  void CleanupFailedCreate(const ContainerPtr& c);
  // What `crun start` does, done in the agent (see containers.cc); false: no fifo to do it with.
  Result<bool> ReleaseInit(const std::string& id);
  // A crun command line (crun's root and cgroup manager, then args), run as a helper.
  SpawnOptions Crun(std::initializer_list<std::string> args) const;
  // Runs a crun command that starts a process (create, exec) with child_fds as its stdio and
  // crun's --log at log; on failure the error carries what crun logged.
  void RunCrun(std::vector<std::string> args, const std::string& log,
               const std::vector<UniqueFd>& child_fds,
               std::function<void(Result<std::string>)> done);
  std::string CgroupDir(const std::string& id) const;
  // Signal handling of a freshly started init (see Signal).
  static constexpr std::chrono::milliseconds kSignalGrace{2000};
  static bool Catches(pid_t pid, int sig);
  void DeferSignal(const std::string& id, pid_t pid, int sig,
                   std::chrono::steady_clock::time_point until);
  void WatchOOM(const ContainerPtr& c);
  void OnInotify();

  EventLoop* loop_;
  Reaper* reaper_;
  ContainerOptions opts_;
  std::map<std::string, ContainerPtr> containers_;
  StorageManager storage_;

  UniqueFd inotify_;
  EventLoop::WatchId inotify_watch_ = 0;
  std::map<int, std::string> oom_watches_;  // inotify wd -> container id
  void DeliverOOMEvents();
  std::deque<std::string> oom_events_;
  struct OOMWaiter {
    std::string container_id;  // empty: any container
    std::function<bool()> waiting;
    Reply<v1::OOMEvent> reply;
  };
  std::deque<OOMWaiter> oom_waiters_;
};

}  // namespace peapod::agent
