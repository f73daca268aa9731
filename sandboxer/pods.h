// The sandboxer's pods: one control loop owns every pod's state, VM handle, agent channel mux
// and waiters. Callers (gRPC threads) post requests and get answers through callbacks, which
// run on the loop thread. Nothing slow runs on the loop: libvirt calls and boots go to the VM
// workers, mounts, removals and cgroups to the filesystem workers, layer builds to their own,
// and records are written (fsync) in order by one writer; each posts back when done.
//
// Where things are: pods.cc, the state machine (Create, Start, Stop, Shutdown, Wait);
// vm_launcher.*, the one boot sequence; pod_storage.cc, layers, volumes and the per-pod
// storage queue; recovery.cc, a restarted sandboxer's Recover; pool.cc, the warm pool.
// The host is reached through seams.h (network, storage, clock), which tests fake.
//
// Lifecycle: Create (record + pod files) -> Start (VM boots, agent answers, pod READY) ->
// Stop (agent powers off, VM destroyed; Wait returns) -> Shutdown (everything removed).
// A VM that dies by itself makes the pod stopped at once. Records are saved before each step,
// so a restarted sandboxer re-adopts running VMs (Recover) and cleans what has no record.
#pragma once

#include <atomic>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include <google/protobuf/empty.pb.h>
#include "common/base/result.h"

#include "common/loop/event_loop.h"
#include "common/ttrpc/client.h"
#include "peapod/agent/v1/agent.pb.h"
#include "sandboxer/agent_mux.h"
#include "sandboxer/config.h"
#include "sandboxer/network.h"
#include "sandboxer/pod_cgroup.h"
#include "sandboxer/pod_share.h"
#include "sandboxer/seams.h"
#include "sandboxer/state.h"
#include "sandboxer/storage.h"
#include "sandboxer/template.h"
#include "sandboxer/vm_backend.h"
#include "sandboxer/vm_identity.h"
#include "sandboxer/vm_launcher.h"
#include "sandboxer/worker_pool.h"

namespace peapod::sandboxer {

// What a pod asks for at Create.
struct PodOptions {
  std::string netns;     // empty: loopback only
  std::string hostname;  // empty: the pod id (up to 63 characters)
  // The pod's resource limits when known (0: none); the VM is sized from them.
  int64_t memory_limit_bytes = 0;
  double cpus = 0;
  // The RuntimeClass overhead the pod was scheduled with (0: use the configured overhead).
  int64_t memory_overhead_bytes = 0;
  std::vector<std::string> dns_servers, dns_searches, dns_options;
  std::map<std::string, std::string> sysctls;
  // Also write the pod files where containerd's CRI looks for them (the sandbox-API path).
  bool cri_files = false;
  // kubelet's cgroup for the pod (PodSandboxConfig.linux.cgroup_parent): the VM's QEMU is
  // accounted below it (pod_cgroup.h). Empty: where the sandboxer runs.
  std::string cgroup_parent;
};

// Where a container's rootfs is in the guest: what goes into the agent's CreateContainer.
struct RootfsInfo {
  std::vector<peapod::agent::v1::Storage> layers;  // topmost first
  std::string upper_dir;  // empty: the agent's own directory (no scratch disk)
};

inline constexpr char kGuestScratchDir[] = "/run/peapod/scratch";
inline constexpr char kGuestLayersDir[] = "/run/peapod/layers";
// Layer disks a running pod keeps attached after their last container went (most recently used
// ones): the next container of that image starts without a hot-plug.
inline constexpr size_t kIdleLayerDisks = 4;

struct PodStatus {
  std::string id;
  bool ready = false;
  int pid = 0;
  int64_t created_at_ns = 0;
  int64_t exited_at_ns = 0;
  std::string address;  // the pod's agent socket, ttrpc+unix://... (containerd 2.x's form)
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

  // seams: the host as tests see it (null members: the real host).
  PodManager(EventLoop* loop, const Config& cfg, VmBackend* backend, Seams seams = {});
  ~PodManager();

  // Loads records, re-adopts running VMs, cleans leftovers. Loop thread, before serving.
  Result<void> Recover();

  // All on the loop thread.
  void Create(const std::string& id, const PodOptions& opts, Reply<void> reply);
  void Start(const std::string& id, Reply<PodStatus> reply);
  void Stop(const std::string& id, uint32_t timeout_secs, Reply<void> reply);
  void Wait(const std::string& id, Reply<PodExit> reply);
  Result<PodStatus> Status(const std::string& id);
  void Shutdown(const std::string& id, Reply<void> reply);
  // The pod's cgroup v2 statistics, read by the agent (all its containers together).
  void Metrics(const std::string& id, Reply<std::string> reply);
  // Answers every pending Wait (and Stop, Metrics) with UNAVAILABLE (the sandboxer is going
  // away; pods are not).
  void CancelWaiters();
  // The sandboxer is exiting: new Creates, Starts and Waits are refused, pending calls
  // answered, the pool removed and every record written, then done runs (on the loop).
  void Quit(std::function<void()> done);
  // Called (any thread) by the backend when a VM stops.
  void VmStopped(const std::string& domain);

  // Storage, serialized per pod. AttachRootfs turns containerd's rootfs mounts into layer
  // disks on the pod's VM (idempotent per container); ShareVolumes binds host paths into the
  // pod's 9p share and answers their guest paths (each bind is not recursive: every mount below
  // a volume's path is bound on its own, so the host can still unmount and remove those mount
  // points while the pod runs, as it can with runc); ReleaseContainer undoes both once the
  // container is gone from the guest (idempotent).
  void AttachRootfs(const std::string& id, const std::string& container,
                    google::protobuf::RepeatedPtrField<containerd::types::Mount> mounts,
                    Reply<RootfsInfo> reply);
  void ShareVolumes(const std::string& id, const std::string& container,
                    std::vector<VolumeRequest> volumes, Reply<std::vector<SharedVolume>> reply);
  void ReleaseContainer(const std::string& id, const std::string& container, Reply<void> reply);
  LayerCache& layer_cache() { return cache_; }

  // The VM template (pod_template.cc, template.h): loads the one for the default VM size, or
  // builds it on the VM workers (a VM booted, prepared and saved); pods boot until it is
  // ready, and FillPool runs once it is settled either way. Loop thread, after Recover.
  void PrepareTemplate();
  bool template_ready() const { return tmpl_.ready.has_value(); }

  // Boots pool VMs until cfg.pool_size are ready or booting (loop thread, after Recover; also
  // called when one is taken or dies).
  void FillPool();
  // Pool VMs ready to be adopted.
  size_t pool_ready() const;
  // Stops and removes every pool VM, waiting (on a worker, at most a minute) for boots in
  // flight, then runs done on the loop (the sandboxer is exiting; a pool VM belongs to no
  // pod). Loop thread. The pool stays empty afterwards.
  void DestroyPool(std::function<void()> done);

  // <run_dir>/pods/<id>: the pod's sockets and share.
  std::string RunDir(const std::string& id) const;
  std::string AgentSocket(const std::string& id) const;

 private:
  struct Pod;
  Pod* Find(const std::string& id);
  // Records go to the one writer thread, in order; SaveThen's done runs on the loop once the
  // record is durable, SaveLater's failure is only logged.
  void SaveThen(Pod& pod, std::function<void(Result<void>)> done);
  void SaveLater(Pod& pod);
  void SaveRecordThen(const PodRecord& rec, std::function<void(Result<void>)> done);
  // Runs work on a worker pool, then `then` on the loop with its result (unless the manager
  // is gone by then).
  void Off(WorkerPool& pool, std::function<Result<void>()> work,
           std::function<void(Result<void>)> then);
  // The pod files in its share (and for containerd's CRI); blocking: workers.
  Result<void> PreparePodFiles(const PodRecord& rec);
  // Runs op after the pod's earlier storage ops; op calls its argument when done. Ops still
  // queued when the pod goes away run anyway (and find it gone).
  void Enqueue(const std::string& id, std::function<void(std::function<void()>)> op);
  RootfsInfo RootfsOf(const Pod& pod, const std::string& container) const;
  // ReleaseContainer's second half: container's records dropped, and the layer disks no
  // other container stacks detached.
  void DetachUnused(Pod& pod, const std::string& container,
                    std::function<void(Result<void>)> finish);
  void AttachImages(const std::string& id, const std::string& container,
                    std::vector<std::pair<std::string, bool>> images, Reply<RootfsInfo> reply);
  // <cri_root>/sandboxes/<id>: where containerd's CRI looks for the pod files.
  std::string CriSandboxDir(const std::string& id) const;
  void RemoveCriFiles(const PodRecord& rec);
  // Create's second half, once the pod files and record are written (or not).
  void Created(const std::string& id, Result<void> r, Reply<void> reply);
  // Start once its record says "starting": a VM of its own booted on a worker.
  void LaunchOwnVm(const std::string& id, Clock::TimePoint deadline, Reply<PodStatus> reply);
  // Shutdown once the pod is stopped: host resources, then the record, then the pod.
  void RemovePod(const std::string& id, Reply<void> reply);
  // A VM's agent channel: connects to <dir>/vm-agent.sock, serves <dir>/agent.sock.
  struct Channel {
    std::unique_ptr<AgentMux> mux;
    std::shared_ptr<ttrpc::Client> agent;
  };
  Result<Channel> ConnectAgent(const std::string& dir);
  Result<void> AttachChannel(Pod& pod);

  // The warm pool (pool.cc). A pool VM is booted with no identity: its own name, run dir (the
  // pod run dir layout, under a pool name), scratch disk, console log, and a TAP left in our
  // netns. A pod adopts it once: the run dir is renamed to the pod's, the TAP moved into the pod
  // netns, and the agent then gets the pod's network (with the CNI MAC), hostname and storage.
  struct PoolVm {
    std::string name;  // pool-<hex>
    std::string domain, tap, mac;
    int pid = 0;
    bool ready = false;
    bool restored = false;  // from the template: Resumed is sent before anything else
    Channel channel;
  };
  std::string PoolStateDir(const std::string& name) const;
  PoolVm* FindPoolVm(const std::string& name);
  // Destroys pool VM name's domain ("peapod-<name>") and removes its TAP and directories.
  // Blocking (libvirt): a worker, or the destructor.
  void RemovePoolVmNow(const std::string& name, const std::string& tap);
  void BootPoolVm();
  void PoolVmUp(const std::string& name, Clock::TimePoint deadline);
  void PoolVmMounted(const std::string& name, Result<google::protobuf::Empty> r);
  void DropPoolVm(const std::string& name, const std::string& why);
  // Stops a pool VM that is out of pool_ and removes its TAP and directories.
  void DestroyPoolVm(std::unique_ptr<PoolVm> vm);
  // Takes a ready pool VM for pod if one fits it (the default VM size); else null.
  std::unique_ptr<PoolVm> TakePoolVm(const Pod& pod);
  void AdoptPoolVm(const std::string& id, std::unique_ptr<PoolVm> vm, Reply<PodStatus> reply);
  // Adoption's host side (a worker): the TAP joined to the pod network (net, read before),
  // the pool VM's run dir, console log and scratch disk renamed to the pod's, the pod files
  // written.
  Result<void> AdoptOnHost(const PodRecord& rec, const std::string& name,
                           const std::optional<PodNetwork>& net);
  // Destroys pool VMs a previous sandboxer left (they have no pod record) and their TAPs.
  void CleanPoolLeftovers();
  // The template (pod_template.cc).
  struct TemplateState {
    std::optional<TemplateInfo> ready;  // loaded and checked: VMs restore from it
    uint64_t generations = 0;           // loads so far (TemplateInfo::generation)
    bool building = false;
    bool broke_before = false;  // a restore from it failed once already
    std::string build_key, build_mac;
    std::chrono::steady_clock::time_point build_started;
    Channel build_channel;
  };
  std::string TemplatesDir() const;
  // The template VM's spec (in dir; the key is computed from it with dir empty).
  VmSpec TemplateSpec(const std::string& domain, const std::string& dir) const;
  // The template a VM of spec's size restores from (its state, identity and MAC go into the
  // spec; the returned generation is TemplateBroken's), or 0 and spec unchanged: boot it.
  uint64_t UseTemplate(VmSpec& spec) const;
  // A template is ready (generation counted); then FillPool.
  void TemplateReady(TemplateInfo t);
  void BuildTemplate(const std::string& key);
  void TemplateVmUp(Clock::TimePoint deadline);
  void SaveTemplateVm();
  void TemplateBuildFailed(const Error& why);
  // A restore from generation's template failed for the state's sake (DATA_LOSS): it is
  // dropped, removed and built again (once). Reports about an older generation are ignored.
  void TemplateBroken(uint64_t generation, const std::string& why);
  // Recover: the build VM's TAP and half-written states a crash left.
  void CleanTemplateLeftovers();
  // Blocking (libvirt): the template-building VM, its TAP, run dir and files gone.
  void RemoveTemplateVmNow(const std::string& key);
  // Fresh randomness and the host's time into a VM restored from the template, first thing.
  void SendResumed(const std::shared_ptr<ttrpc::Client>& client,
                   std::function<void(Result<void>)> done);
  // Serves CRI PortForward for a ready pod with a netns (a warning if it cannot).
  void StartPortForwarder(Pod& pod);
  void LogStartSteps(const Pod& pod);
  // Undoes a Start that failed (destroying the VM and TAP if they exist) and answers reply.
  void FailStart(const std::string& id, Error e, bool vm_started, Reply<PodStatus> reply);
  void WaitForAgent(const std::string& id, Clock::TimePoint deadline, Reply<PodStatus> reply);
  // Once the agent answers: the pod network, then its hostname, DNS, sysctls and mounts, sent
  // one behind the other; then FinishStart.
  void SetUpGuest(const std::string& id, Reply<PodStatus> reply);
  // The guest is set up: the record says running, and the Start is answered.
  void FinishStart(const std::string& id, Reply<PodStatus> reply);
  // The pod stopped: records, waiters, Stops and Metrics in flight answered.
  void MarkStopped(Pod& pod, uint32_t status);
  void AnswerStops(Pod& pod, Result<void> r);
  // The pod's QEMU into the pod's cgroup once it runs; the cgroup removed once it stopped
  // (pod_cgroup.h).
  void PlaceVm(Pod& pod);
  void UnplaceVm(Pod& pod);
  // Removes the cgroup, again every 100 ms while QEMU is still exiting (50 attempts).
  void RemoveCgroup(const std::string& id, const PodCgroup& cg, int attempt);
  PodStatus StatusOf(const Pod& pod) const;
  VmSpec SpecFor(const Pod& pod) const;

  // Recover's parts: one record's pod rebuilt (re-adopted, or marked stopped/created with what
  // it held given back); what no record names removed (run dirs, VM files, VMs).
  void RecoverPod(const PodRecord& rec, const std::map<std::string, VmInfo>& live);
  void SweepLeftovers(const std::set<std::string>& known,
                      const std::map<std::string, VmInfo>& live);

  EventLoop* loop_;
  Config cfg_;
  VmBackend* backend_;
  // The seams: ours unless the caller gave its own.
  std::unique_ptr<Network> own_network_;
  std::unique_ptr<Storage> own_storage_;
  std::unique_ptr<Clock> own_clock_;
  Network* net_;
  Storage* storage_;
  Clock* clock_;
  // Expires when the manager goes: callbacks posted from workers check it. Declared before
  // cache_, which is built with it.
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
  VmIdentities ids_;
  VmLauncher launcher_;
  std::map<std::string, std::unique_ptr<Pod>> pods_;
  bool quitting_ = false;
  std::vector<std::unique_ptr<PoolVm>> pool_;  // booting and ready
  TemplateState tmpl_;
  std::vector<std::string> cgroup_roots_ = AccountingHierarchies();  // where pods' VMs go
  // Shared with boot workers, which outlive nothing but may finish after DestroyPool began.
  std::shared_ptr<std::atomic<int>> pool_booting_ = std::make_shared<std::atomic<int>>(0);
  std::shared_ptr<std::atomic<bool>> pool_closed_ = std::make_shared<std::atomic<bool>>(false);
  // The workers, by kind, so that one kind of slow work never waits behind another (a
  // tenant's big layer build behind nobody's Start): libvirt and boots; mounts, removals and
  // cgroups; layer builds; and the one record writer, whose order is the records' order.
  // Destroyed before everything above (their jobs use it, and only copies otherwise); cache_
  // goes first, its builds holding only copies.
  WorkerPool vm_workers_{4};
  WorkerPool fs_workers_{2};
  WorkerPool build_workers_{2};
  WorkerPool records_{1};
  LayerCache cache_;
};

}  // namespace peapod::sandboxer
