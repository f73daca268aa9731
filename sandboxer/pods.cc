#include "sandboxer/pods.h"
#include "sandboxer/pods_internal.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <optional>
#include <set>

#include <fmt/ranges.h>
#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

#include "common/agentapi/agent_client.h"
#include "common/base/ids.h"
#include "common/base/mountinfo.h"
#include "peapod/agent/v1/agent.pb.h"
#include "sandboxer/network.h"
#include "sandboxer/port_forward.h"

namespace peapod::sandboxer {

namespace fs = std::filesystem;
namespace v1 = peapod::agent::v1;
using namespace std::chrono_literals;
using agentapi::Empty;
using Phase = PodRecord::Phase;

namespace {

std::string TapOf(const PodRecord& r) { return r.tap.empty() ? TapName(r.id) : r.tap; }
bool HasTap(const PodRecord& r) { return !r.tap.empty() || !r.netns.empty(); }

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

}  // namespace

PodManager::PodManager(EventLoop* loop, const Config& cfg, VmBackend* backend)
    : loop_(loop),
      cfg_(cfg),
      backend_(backend),
      store_(cfg.state_dir),
      cache_(cfg.state_dir + "/layers", cfg.mkfs_erofs,
             std::chrono::seconds(cfg.layer_cache_keep_seconds), &workers_,
             [loop, alive = std::weak_ptr<bool>(alive_)](std::function<void()> fn) {
               loop->Post([alive, fn = std::move(fn)] {
                 if (!alive.expired()) fn();
               });
             }),
      ids_(cfg.state_dir, cfg.run_dir, backend->ConfinesVms() ? cfg.vm_uid_base : 0,
           cfg.vm_uid_count, cfg.vm_gid) {}

// Callbacks posted by workers and clients hold a weak_ptr to alive_: dropping it first makes
// every one of them a no-op, even those that run while members are being destroyed.
PodManager::~PodManager() {
  // Pool VMs belong to no pod: they go with us (a crash leaves them to CleanPoolLeftovers).
  DestroyPool();
  alive_.reset();
}

std::string PodManager::RunDir(const std::string& id) const { return cfg_.run_dir + "/pods/" + id; }

std::string PodManager::CriSandboxDir(const std::string& id) const {
  return cfg_.cri_root + "/sandboxes/" + id;
}

std::string PodManager::AgentSocket(const std::string& id) const {
  return RunDir(id) + "/agent.sock";
}

PodManager::Pod* PodManager::Find(const std::string& id) {
  auto it = pods_.find(id);
  return it == pods_.end() ? nullptr : it->second.get();
}

Result<void> PodManager::Save(Pod& pod) { return store_.Save(pod.rec); }

bool PodManager::UseKvm() const {
  if (cfg_.accel == "kvm") return true;
  if (cfg_.accel == "tcg") return false;
  UniqueFd fd(::open("/dev/kvm", O_RDWR | O_CLOEXEC));
  return fd.valid();
}

VmSpec PodManager::BaseSpec(const std::string& domain, const std::string& run_dir,
                            const std::string& state_dir, unsigned vcpus,
                            uint64_t memory_mib) const {
  VmSpec s;
  s.name = domain;
  s.kernel = cfg_.kernel;
  s.initrd = cfg_.initrd;
  s.cmdline = cfg_.cmdline;
  s.vcpus = vcpus;
  s.memory_mib = memory_mib;
  s.kvm = UseKvm();
  s.tcg_tb_cache_mib = cfg_.tcg_tb_cache_mib;
  s.agent_socket = run_dir + "/vm-agent.sock";
  s.share_dir = run_dir + "/share";
  s.console_log = state_dir + "/console.log";
  if (ids_.enabled()) {
    s.gid = ids_.gid();  // the uid comes with PrepareVmFiles
    s.share_socket = ids_.SocketPath(domain);
  }
  if (backend_->SupportsDisks()) {
    std::string scratch = ids_.enabled() ? ids_.ScratchPath(domain) : state_dir + "/scratch.img";
    s.disks.push_back({scratch, 0, /*readonly=*/false});
  }
  return s;
}

Result<void> PodManager::PrepareVmFiles(VmSpec& spec) {
  if (ids_.enabled()) {
    PP_ASSIGN_OR_RETURN(spec.uid, ids_.Acquire(spec.name));
  }
  for (const auto& d : spec.disks) {
    if (d.readonly) continue;
    auto made = MakeScratchDisk(cfg_.mkfs_ext4, d.path, cfg_.scratch_size_mib);
    if (made.ok() && ids_.enabled()) made = ids_.GiveFile(d.path, spec.uid);
    if (!made.ok()) {
      DiscardVmFiles(spec.name, d.path, spec.uid);
      return made;
    }
  }
  return Ok();
}

void PodManager::DiscardVmFiles(const std::string& domain, const std::string& scratch,
                                uint32_t uid) {
  if (!scratch.empty() && (uid == 0 || ids_.UidOf(domain) == uid)) ::unlink(scratch.c_str());
  ids_.Release(domain, uid);
}

VmSpec PodManager::SpecFor(const Pod& pod) const {
  return BaseSpec(pod.rec.domain, RunDir(pod.rec.id), store_.PodDir(pod.rec.id),
                  pod.rec.vcpus ? pod.rec.vcpus : cfg_.vcpus,
                  pod.rec.memory_mib ? pod.rec.memory_mib : cfg_.memory_mib);
}

Result<void> PodManager::PreparePodFiles(const PodRecord& rec) {
  // containerd bind-mounts the pod's /etc/hosts, resolv.conf, hostname and /dev/shm into
  // containers only if they exist on the host; they live in the share the guest sees.
  PP_TRY(PrepareShare(RunDir(rec.id)));
  std::string hostname = rec.hostname.empty() ? rec.id.substr(0, 63) : rec.hostname;
  std::string resolv;
  for (const auto& s : rec.dns_servers) resolv += "nameserver " + s + "\n";
  if (!rec.dns_searches.empty())
    resolv += fmt::format("search {}\n", fmt::join(rec.dns_searches, " "));
  if (!rec.dns_options.empty())
    resolv += fmt::format("options {}\n", fmt::join(rec.dns_options, " "));
  std::string hosts =
      fmt::format("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n");
  const std::pair<const char*, std::string> files[] = {
      {"hosts", hosts}, {"resolv.conf", resolv}, {"hostname", hostname + "\n"}};
  for (const auto& [name, text] : files) PP_TRY(WriteShareFile(RunDir(rec.id), name, text));
  if (rec.cri_files) {
    std::string dir = CriSandboxDir(rec.id);
    std::error_code ec;
    fs::create_directories(dir, ec);
    if (ec) return Error::Errno("mkdir " + dir, ec.value());
    for (const auto& [name, text] : files) {
      PP_TRY(WriteFileAtomic(dir + "/" + name, text));
      ::chmod((dir + "/" + name).c_str(), 0644);
    }
  }
  return Ok();
}

Result<void> PodManager::Recover() {
  PP_TRY(store_.Init());
  PP_TRY(PrepareRunDir());
  PP_TRY(cache_.Init());
  // Confined QEMUs pass through state_dir and run_dir to their own files and read the cached
  // layer images (vm_identity.h).
  PP_TRY(ids_.Init({cache_.dir()}, {cfg_.kernel, cfg_.initrd}));
  PP_ASSIGN_OR_RETURN(auto records, store_.LoadAll());
  PP_ASSIGN_OR_RETURN(auto running, backend_->List());
  std::map<std::string, VmInfo> live;
  for (auto& vm : running) live[vm.name] = vm;
  std::set<std::string> known;
  for (auto& rec : records) {
    known.insert(rec.domain);
    RecoverPod(rec, live);
  }
  SweepLeftovers(known, live);
  return Ok();
}

Result<void> PodManager::PrepareRunDir() {
  // Root's alone: the pods' sockets and shares (docs/security.md).
  std::error_code ec;
  fs::create_directories(cfg_.run_dir + "/pods", ec);
  if (ec) return Error::Errno("mkdir " + cfg_.run_dir + "/pods", ec.value());
  for (const auto& d : {cfg_.run_dir, cfg_.run_dir + "/pods"}) {
    if (::chmod(d.c_str(), 0700) < 0) return Error::Errno("chmod " + d);
  }
  // The pods' shares and volume binds stay in this namespace and never reach the host's
  // mounts (docs/security.md).
  return MakePrivateMount(cfg_.run_dir + "/pods");
}

void PodManager::RecoverPod(const PodRecord& rec, const std::map<std::string, VmInfo>& live) {
  auto pod = std::make_unique<Pod>();
  pod->rec = rec;
  auto vm = live.find(rec.domain);
  bool alive = vm != live.end();
  if (rec.phase == Phase::kRunning && alive) {
    if (vm->second.pid) pod->rec.pid = vm->second.pid;
    if (auto r = AttachChannel(*pod); !r.ok()) {
      // A VM nobody can reach is no pod: stop it rather than report it ready.
      spdlog::error("pod {}: cannot reattach its agent channel ({}); stopping its VM", rec.id,
                    r.error().ToString());
      alive = false;
    } else {
      spdlog::info("pod {}: re-adopted running VM {} (pid {})", rec.id, rec.domain, pod->rec.pid);
      (void)Save(*pod);
      StartPortForwarder(*pod);
    }
  }
  if ((rec.phase == Phase::kRunning && !alive) || rec.phase == Phase::kStarting) {
    // It died (or never finished starting, or cannot be reached) while we were away.
    if (vm != live.end()) (void)backend_->Destroy(rec.domain);
    pod->rec.phase = rec.phase == Phase::kStarting ? Phase::kCreated : Phase::kStopped;
    if (pod->rec.phase == Phase::kStopped) {
      pod->rec.exited_at_ns = NowNs();
      pod->rec.exit_status = 255;
    }
    (void)Save(*pod);
    spdlog::warn("pod {}: its VM is gone; now {}", rec.id, PhaseName(pod->rec.phase));
  }
  if (pod->rec.phase != Phase::kRunning) UnplaceVm(*pod);  // a crash before it went
  // A stopped VM holds no disk and no TAP any more: give them back now rather than at
  // Shutdown, which may never come if containerd forgot the pod. (RemoveTap looks in our
  // netns too, where a Start interrupted between creating and moving the TAP left it.)
  if (pod->rec.phase == Phase::kRunning) {
    for (const auto& d : pod->rec.disks) {
      if (d.cached && !cache_.Adopt(d.path)) {
        spdlog::warn("pod {}: layer image {} is gone", rec.id, d.path);
      }
    }
  } else {
    pod->rec.disks.clear();
    pod->rec.rootfs.clear();
    if (HasTap(pod->rec)) RemoveTap(TapOf(pod->rec), pod->rec.netns);
    pod->rec.tap.clear();
    // A pool VM it was adopting is gone: its next Start boots (or adopts) afresh.
    if (pod->rec.phase == Phase::kCreated) pod->rec.domain = "peapod-" + rec.id;
    (void)Save(*pod);
  }
  pods_[rec.id] = std::move(pod);
}

void PodManager::SweepLeftovers(const std::set<std::string>& known,
                                const std::map<std::string, VmInfo>& live) {
  // Run dirs (share mounts, sockets) of pods that have no record: a crash between removing the
  // record and the dir, or a record deleted by hand.
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(cfg_.run_dir + "/pods", ec)) {
    std::string id = e.path().filename().string();
    if (pods_.count(id)) continue;
    spdlog::warn("recover: removing {} (no pod record)", e.path().string());
    if (auto r = RemoveTreeSafely(e.path().string()); !r.ok()) {
      spdlog::error("recover: {}", r.error().ToString());
    }
  }
  cache_.Collect();
  CleanPoolLeftovers();
  // The files of VMs that are gone (a crash between a VM's end and their removal).
  std::set<std::string> running_domains;
  for (const auto& [id, pod] : pods_) {
    if (pod->rec.phase == Phase::kRunning) running_domains.insert(pod->rec.domain);
  }
  ids_.Sweep(running_domains);
  for (const auto& [name, vm] : live) {
    if (!known.count(name)) {
      spdlog::warn("recover: destroying VM {} that has no pod record", name);
      (void)backend_->Destroy(name);
    }
  }
}

Result<PodManager::Channel> PodManager::ConnectAgent(const std::string& dir) {
  Channel ch;
  PP_ASSIGN_OR_RETURN(auto upstream, ConnectUnix(dir + "/vm-agent.sock"));
  PP_TRY(SetNonBlocking(upstream.get()));
  ch.mux = std::make_unique<AgentMux>(loop_);
  ch.mux->set_name(fs::path(dir).filename());  // the pod id, or the pool VM's name
  PP_TRY(ch.mux->AttachUpstream(std::move(upstream)));
  PP_ASSIGN_OR_RETURN(auto listener, ListenUnix(dir + "/agent.sock"));
  ::chmod((dir + "/agent.sock").c_str(), 0600);  // root only: it drives the whole pod
  PP_TRY(ch.mux->ServeListener(std::move(listener)));
  PP_ASSIGN_OR_RETURN(auto pair, SocketPair());
  PP_TRY(SetNonBlocking(pair.first.get()));
  PP_TRY(ch.mux->AddClient(std::move(pair.first)));
  PP_ASSIGN_OR_RETURN(ch.agent, ttrpc::Client::Create(loop_, std::move(pair.second)));
  return ch;
}

Result<void> PodManager::AttachChannel(Pod& pod) {
  PP_ASSIGN_OR_RETURN(Channel ch, ConnectAgent(RunDir(pod.rec.id)));
  pod.mux = std::move(ch.mux);
  pod.agent = std::move(ch.agent);
  return Ok();
}

void PodManager::Create(const std::string& id, const PodOptions& opts, Reply<void> reply) {
  const std::string& netns = opts.netns;
  if (!IsValidId(id)) {
    return reply(Error::Invalid("sandbox id '{}' is invalid: use {}", id, kIdRule));
  }
  if (Find(id)) return reply(Error::Make(Code::kAlreadyExists, "sandbox {} already exists", id));
  if (!netns.empty() && !fs::exists(netns)) {
    return reply(Error::NotFound(
        "sandbox {}: network namespace {} does not exist (did CNI setup fail?)", id, netns));
  }
  auto pod = std::make_unique<Pod>();
  pod->rec.id = id;
  pod->rec.netns = netns;
  pod->rec.domain = "peapod-" + id;
  pod->rec.created_at_ns = NowNs();
  pod->rec.hostname = opts.hostname;
  if (opts.memory_limit_bytes < 0 || opts.cpus < 0) {
    return reply(Error::Invalid("sandbox {}: negative resource limits (memory {} bytes, {} CPUs)",
                                id, opts.memory_limit_bytes, opts.cpus));
  }
  pod->rec.memory_limit_bytes = opts.memory_limit_bytes;
  pod->rec.cpus = opts.cpus;
  if (auto leaf = PodCgroupLeaf(opts.cgroup_parent, id); !leaf.ok()) {
    return reply(std::move(leaf).error().Wrap("sandbox " + id));
  }
  pod->rec.cgroup_parent = opts.cgroup_parent;
  // The VM gets the pod's limits plus room for the guest kernel and agent; no limits, the
  // configured default size.
  pod->rec.vcpus = opts.cpus > 0 ? std::min<unsigned>(cfg_.max_vcpus,
                                                      static_cast<unsigned>(std::ceil(opts.cpus)))
                                 : cfg_.vcpus;
  auto mib = [](int64_t bytes) { return (static_cast<uint64_t>(bytes) + (1 << 20) - 1) >> 20; };
  uint64_t overhead = opts.memory_overhead_bytes > 0
                          ? std::max<uint64_t>(mib(opts.memory_overhead_bytes), 64)
                          : cfg_.memory_overhead_mib;
  pod->rec.memory_mib =
      opts.memory_limit_bytes > 0 ? mib(opts.memory_limit_bytes) + overhead : cfg_.memory_mib;
  pod->rec.dns_servers = opts.dns_servers;
  pod->rec.dns_searches = opts.dns_searches;
  pod->rec.dns_options = opts.dns_options;
  pod->rec.sysctls = opts.sysctls;
  pod->rec.cri_files = opts.cri_files;
  if (auto r = PreparePodFiles(pod->rec); !r.ok()) {
    (void)RemoveTreeSafely(RunDir(id));
    RemoveCriFiles(pod->rec);
    return reply(std::move(r).error().Wrap("create sandbox " + id));
  }
  if (auto r = Save(*pod); !r.ok()) {
    (void)RemoveTreeSafely(RunDir(id));
    (void)store_.Remove(id);
    return reply(std::move(r).error().Wrap("create sandbox " + id));
  }
  spdlog::info("pod {}: created", id);
  pods_[id] = std::move(pod);
  reply(Ok());
}

Result<VmInfo> PodManager::LaunchVm(VmLaunch& l) {
  VmSpec& spec = l.spec;
  auto at = std::chrono::steady_clock::now();
  auto step = [&](const char* name) {
    auto now = std::chrono::steady_clock::now();
    l.steps.emplace_back(name, std::chrono::duration<double, std::milli>(now - at).count());
    at = now;
  };
  auto discard = [&] {
    std::string scratch;
    for (const auto& d : spec.disks) {
      if (!d.readonly) scratch = d.path;
    }
    DiscardVmFiles(spec.name, scratch, spec.uid);
  };
  Result<void> files = PrepareVmFiles(spec);
  step("scratch_disk");
  if (!files.ok()) {
    discard();
    return std::move(files).error();
  }
  if (l.tap == VmLaunch::Tap::kPodNetns) {
    auto n = PrepareTap(l.pod_id, l.netns);
    if (!n.ok()) {
      discard();
      return std::move(n).error().Wrap("pod network");
    }
    l.net = std::move(*n);
    spec.tap = l.net->tap;
    spec.mac = l.net->mac;
  } else if (l.tap == VmLaunch::Tap::kHost) {
    if (auto t = CreateTap(spec.tap); !t.ok()) {
      discard();
      return std::move(t).error();
    }
  }
  step("tap_create");
  auto remove_tap = [&] {
    if (l.net) RemoveTap(l.net->tap, l.netns);
    if (l.tap == VmLaunch::Tap::kHost) RemoveTap(spec.tap, "");
  };
  Result<VmInfo> vm = backend_->Start(spec);
  step("vm_define_start");
  if (vm.ok() && l.net) {
    if (auto a = AttachTap(*l.net); !a.ok()) {
      (void)backend_->Destroy(spec.name);
      vm = std::move(a).error().Wrap("pod network");
    }
  }
  step("tap_attach");
  if (!vm.ok()) {
    remove_tap();
    l.net.reset();
    discard();
  }
  return vm;
}

void PodManager::Start(const std::string& id, Reply<PodStatus> reply) {
  Pod* pod = Find(id);
  if (!pod) return reply(UnknownPod(id));
  if (pod->rec.phase == Phase::kRunning) return reply(StatusOf(*pod));  // idempotent
  if (pod->busy || pod->rec.phase != Phase::kCreated) {
    return reply(Error::Make(Code::kFailedPrecondition, "sandbox {} is {}: it cannot be started",
                             id, pod->busy ? "busy" : PhaseName(pod->rec.phase)));
  }
  pod->busy = true;
  pod->rec.phase = Phase::kStarting;
  auto pooled = TakePoolVm(*pod);
  if (pooled) {
    // Recorded before anything moves: a crash from here on leaves a record naming the pool VM,
    // which Recover then destroys with the pod back in "created".
    pod->rec.domain = pooled->domain;
    pod->rec.tap = pooled->tap;
  }
  if (auto r = Save(*pod); !r.ok()) {
    pod->busy = false;
    pod->rec.phase = Phase::kCreated;
    pod->rec.domain = "peapod-" + id;
    pod->rec.tap.clear();
    if (pooled) DestroyPoolVm(std::move(pooled));
    return reply(r.error());
  }
  if (pooled) {
    auto deadline = EventLoop::Clock::now() + std::chrono::seconds(cfg_.boot_timeout_seconds);
    pod->start_steps.clear();
    pod->step_at = std::chrono::steady_clock::now();
    return AdoptPoolVm(id, std::move(pooled), deadline, reply);
  }
  // The share QEMU will export must be the read-only one (a run dir from before it, or one
  // a reboot emptied, is laid out again here; one that cannot be is refused, never exported).
  if (auto r = PreparePodFiles(pod->rec); !r.ok()) {
    pod->busy = false;
    pod->rec.phase = Phase::kCreated;
    (void)Save(*pod);
    return reply(std::move(r).error().Wrap("start sandbox " + id + ": prepare its share"));
  }
  VmSpec spec = SpecFor(*pod);
  std::string netns = pod->rec.netns;
  std::weak_ptr<bool> alive = alive_;
  auto deadline = EventLoop::Clock::now() + std::chrono::seconds(cfg_.boot_timeout_seconds);
  pod->start_steps.clear();
  pod->step_at = std::chrono::steady_clock::now();
  workers_.Run([this, alive, spec, id, netns, reply, deadline]() mutable {
    VmLaunch l;
    l.spec = std::move(spec);
    if (!netns.empty()) {
      l.tap = VmLaunch::Tap::kPodNetns;
      l.pod_id = id;
      l.netns = netns;
    }
    Result<VmInfo> vm = LaunchVm(l);
    auto net = std::move(l.net);
    auto steps = std::move(l.steps);
    loop_->Post([this, alive, vm = std::move(vm), net = std::move(net), id, reply, deadline,
                 steps = std::move(steps)]() mutable {
      if (alive.expired()) return;
      Pod* pod = Find(id);
      if (!pod) return reply(UnknownPod(id));
      pod->start_steps = std::move(steps);
      pod->step_at = std::chrono::steady_clock::now();
      // The worker already undid its own steps when the VM did not start.
      if (!vm.ok()) return FailStart(id, vm.error(), /*vm_started=*/false, reply);
      pod->rec.pid = vm->pid;
      pod->rec.scratch = backend_->SupportsDisks();
      pod->net = std::move(net);
      if (auto r = AttachChannel(*pod); !r.ok()) {
        return FailStart(id, r.error(), /*vm_started=*/true, reply);
      }
      WaitForAgent(id, deadline, reply);
    });
  });
}

void PodManager::FailStart(const std::string& id, Error e, bool vm_started,
                           Reply<PodStatus> reply) {
  Pod* p = Find(id);
  if (!p) return reply(UnknownPod(id));
  // Back to "created", as if Start had not been called: a failed request changes nothing.
  std::string domain = p->rec.domain;
  std::string netns = p->rec.netns;
  std::string tap = TapOf(p->rec);
  bool has_tap = HasTap(p->rec);
  p->net.reset();
  p->busy = false;
  p->rec.phase = Phase::kCreated;
  p->rec.pid = 0;
  p->rec.scratch = false;
  p->rec.domain = "peapod-" + id;  // a pool VM it was adopting is destroyed below
  p->rec.tap.clear();
  p->forwarder.reset();
  p->mux.reset();
  p->agent.reset();
  (void)Save(*p);
  Error why = std::move(e).Wrap("start sandbox " + id);
  if (!vm_started) return reply(std::move(why));
  // The answer waits for the cleanup, and the pod stays busy meanwhile: a Start retried at once
  // would otherwise make a VM, TAP and scratch disk of the same names for this cleanup to
  // remove.
  p->busy = true;
  // Where an unconfined VM has it; a confined one's goes with its uid's directories.
  std::string scratch = ids_.enabled() ? "" : store_.PodDir(id) + "/scratch.img";
  uint32_t uid = ids_.UidOf(domain);
  std::weak_ptr<bool> alive = alive_;
  workers_.Run([this, alive, id, domain, tap, has_tap, netns, scratch, uid, why, reply] {
    (void)backend_->Destroy(domain);
    if (has_tap) RemoveTap(tap, netns);
    DiscardVmFiles(domain, scratch, uid);
    loop_->Post([this, alive, id, why, reply] {
      if (alive.expired()) return;
      if (Pod* p = Find(id)) p->busy = false;
      reply(why);
    });
  });
}

void PodManager::WaitForAgent(const std::string& id, EventLoop::Clock::time_point deadline,
                              Reply<PodStatus> reply) {
  Pod* pod = Find(id);
  if (!pod || !pod->agent) return reply(UnknownPod(id));
  auto fail = [this, id, reply](Error e) { FailStart(id, std::move(e), true, reply); };
  if (EventLoop::Clock::now() >= deadline) {
    return fail(Error::Make(Code::kDeadlineExceeded,
                            "the guest agent did not answer within {} s (see {}/console.log)",
                            cfg_.boot_timeout_seconds, store_.PodDir(id)));
  }
  if (!pod->mux || !pod->mux->upstream_attached()) {
    return fail(Error(Code::kUnavailable, "the VM went away while booting (see " +
                                              store_.PodDir(id) + "/console.log)"));
  }
  std::weak_ptr<bool> alive = alive_;
  agentapi::AgentClient::Over(pod->agent)
      .Check(
          v1::CheckRequest(),
          [this, alive, id, deadline, reply, fail](Result<v1::CheckResponse> r) {
            if (alive.expired()) return;
            Pod* pod = Find(id);
            if (!pod) return reply(UnknownPod(id));
            if (!r.ok()) {
              // Not up yet: the agent answers once it has opened its end of the channel.
              loop_->AddTimer(200ms, [this, alive, id, deadline, reply] {
                if (!alive.expired()) WaitForAgent(id, deadline, reply);
              });
              return;
            }
            if (std::none_of(pod->start_steps.begin(), pod->start_steps.end(),
                             [](const auto& st) { return st.first == "boot_to_agent"; })) {
              pod->Step("boot_to_agent");  // the first answer: kernel, initrd, agent start
            }
            SetUpGuest(id, deadline, reply);
          },
          1s);
}

void PodManager::SetUpGuest(const std::string& id, EventLoop::Clock::time_point deadline,
                            Reply<PodStatus> reply) {
  Pod* pod = Find(id);
  if (!pod || !pod->agent) return reply(UnknownPod(id));
  auto fail = [this, id, reply](Error e) { FailStart(id, std::move(e), true, reply); };
  std::weak_ptr<bool> alive = alive_;
  auto agent = agentapi::AgentClient::Over(pod->agent);
  if (pod->net) {
    // Addresses and routes first: containers must find the pod network up.
    v1::ConfigureNetworkRequest net = pod->net->guest;
    pod->net.reset();
    agent.ConfigureNetwork(
        net,
        [this, alive, id, deadline, reply, fail](Result<Empty> r) {
          if (alive.expired()) return;
          if (!r.ok()) return fail(std::move(r).error().Wrap("configure guest network"));
          if (Pod* p = Find(id)) p->Step("guest_network");
          WaitForAgent(id, deadline, reply);  // Check again, then set up
        },
        30s);
    return;
  }
  v1::CreateSandboxRequest sb;
  sb.set_sandbox_id(id);
  sb.set_hostname(pod->rec.hostname.empty() ? id.substr(0, 63) : pod->rec.hostname);
  for (const auto& d : pod->rec.dns_servers) sb.add_dns_servers(d);
  for (const auto& d : pod->rec.dns_searches) sb.add_dns_searches(d);
  for (const auto& d : pod->rec.dns_options) sb.add_dns_options(d);
  for (const auto& [k, v] : pod->rec.sysctls) (*sb.mutable_sysctls())[k] = v;
  AddPodStorages(sb, pod->rec.scratch);
  agent.CreateSandbox(
      sb,
      [this, alive, id, reply, fail](Result<Empty> r) {
        if (alive.expired()) return;
        Pod* pod = Find(id);
        if (!pod) return reply(UnknownPod(id));
        if (!r.ok()) return fail(std::move(r).error().Wrap("set up guest"));
        pod->busy = false;
        pod->rec.phase = Phase::kRunning;
        PlaceVm(*pod);
        (void)Save(*pod);
        pod->Step("guest_setup");
        StartPortForwarder(*pod);
        pod->Step("port_forwarder");
        LogStartSteps(*pod);
        spdlog::info("pod {}: ready (QEMU pid {})", id, pod->rec.pid);
        reply(StatusOf(*pod));
      },
      30s);
}

void AddPodStorages(v1::CreateSandboxRequest& sb, bool scratch) {
  // Pod-wide mounts: the share (volumes, pod files) and the scratch disk.
  auto* share = sb.add_storages();
  share->set_driver(v1::Storage::VIRTIO_9P);
  share->set_source("peapod-share");
  share->set_fstype("9p");
  share->set_mount_point(kGuestShareDir);
  if (scratch) {
    auto* disk = sb.add_storages();
    disk->set_driver(v1::Storage::SCSI);
    disk->set_source("0:0");
    disk->set_fstype("ext4");
    disk->set_mount_point(kGuestScratchDir);
  }
}

void PodManager::LogStartSteps(const Pod& pod) {
  // One line a benchmark can parse: "pod <id>: start steps ms {json}".
  nlohmann::json steps = nlohmann::json::object();
  double total = 0;
  for (const auto& [name, ms] : pod.start_steps) {
    steps[name] = std::round(ms * 10) / 10;
    total += ms;
  }
  steps["total"] = std::round(total * 10) / 10;
  spdlog::info("pod {}: start steps ms {}", pod.rec.id, steps.dump());
}

void PodManager::StartPortForwarder(Pod& pod) {
  if (pod.rec.netns.empty() || !pod.agent) return;
  // Never in our own netns: the program would take every connection to the host's 127.0.0.1.
  struct stat ours {
  }, theirs{};
  if (::stat("/proc/self/ns/net", &ours) < 0 || ::stat(pod.rec.netns.c_str(), &theirs) < 0 ||
      (ours.st_dev == theirs.st_dev && ours.st_ino == theirs.st_ino)) {
    spdlog::warn("pod {}: no port forwarding: netns {} is the sandboxer's own", pod.rec.id,
                 pod.rec.netns);
    return;
  }
  auto f = PortForwarder::Start(loop_, pod.rec.id, pod.rec.netns, pod.agent);
  if (!f.ok()) {
    // The pod works without it; only CRI PortForward into it fails (containerd says so).
    spdlog::warn("pod {}: no port forwarding: {}", pod.rec.id, f.error().ToString());
    return;
  }
  pod.forwarder = std::move(*f);
}

void PodManager::MarkStopped(Pod& pod, uint32_t status) {
  if (pod.rec.phase == Phase::kStopped) return;
  pod.rec.phase = Phase::kStopped;
  pod.rec.exit_status = status;
  pod.rec.exited_at_ns = NowNs();
  pod.forwarder.reset();
  pod.agent.reset();
  pod.mux.reset();
  std::error_code ec;
  fs::remove(AgentSocket(pod.rec.id), ec);
  UnplaceVm(pod);
  (void)Save(pod);
  spdlog::info("pod {}: stopped (status {})", pod.rec.id, status);
  auto waiters = std::move(pod.waiters);
  pod.waiters.clear();
  for (auto& w : waiters) w(PodExit{pod.rec.exit_status, pod.rec.exited_at_ns});
}

void PodManager::PlaceVm(Pod& pod) {
  if (pod.rec.cgroup_parent.empty() || pod.rec.pid <= 0) return;
  auto leaf = PodCgroupLeaf(pod.rec.cgroup_parent, pod.rec.id);
  auto placed = leaf.ok() ? PlaceInPodCgroup(*leaf, pod.rec.pid, cgroup_roots_)
                          : Result<PodCgroup>(leaf.error());
  if (!placed.ok()) {
    // The pod runs; its VM is counted where the sandboxer runs, and statsp cannot see it.
    spdlog::warn("pod {}: its VM stays out of the pod's cgroup: {}", pod.rec.id,
                 placed.error().ToString());
    return;
  }
  pod.rec.cgroup_leaf = placed->leaf;
  pod.rec.cgroup_made = placed->made;
}

void PodManager::UnplaceVm(Pod& pod) {
  if (pod.rec.cgroup_leaf.empty()) return;
  PodCgroup cg{pod.rec.cgroup_leaf, pod.rec.cgroup_made};
  std::weak_ptr<bool> alive = alive_;
  workers_.Run([this, alive, id = pod.rec.id, cg, roots = cgroup_roots_] {
    Result<void> r = Ok();
    for (int i = 0; i < 50; ++i) {  // QEMU may still be exiting (up to 5 s)
      if ((r = RemovePodCgroup(cg, roots)).ok()) break;
      std::this_thread::sleep_for(100ms);
    }
    if (!r.ok()) spdlog::warn("pod {}: {}", id, r.error().ToString());
    loop_->Post([this, alive, id, leaf = cg.leaf, ok = r.ok()] {
      if (alive.expired() || !ok) return;
      Pod* p = Find(id);
      if (!p || p->rec.cgroup_leaf != leaf) return;
      p->rec.cgroup_leaf.clear();
      p->rec.cgroup_made.clear();
      (void)Save(*p);
    });
  });
}

void PodManager::CancelWaiters() {
  for (auto& [id, pod] : pods_) {
    auto waiters = std::move(pod->waiters);
    pod->waiters.clear();
    for (auto& w : waiters) {
      w(Error(Code::kUnavailable, "peapod-sandboxer is restarting; the pod keeps running"));
    }
  }
}

void PodManager::VmStopped(const std::string& domain) {
  std::weak_ptr<bool> alive = alive_;
  loop_->Post([this, alive, domain] {
    if (alive.expired()) return;
    for (const auto& vm : pool_) {
      if (vm->domain == domain) return DropPoolVm(vm->name, "its VM stopped");
    }
    for (auto& [id, pod] : pods_) {
      if (pod->rec.domain != domain) continue;
      if (pod->rec.phase == Phase::kRunning) {
        MarkStopped(*pod, pod->stopping ? 0 : 255);
      }
    }
  });
}

void PodManager::Stop(const std::string& id, uint32_t timeout_secs, Reply<void> reply) {
  Pod* pod = Find(id);
  if (!pod) {
    spdlog::info("pod {}: Stop of an unknown sandbox: nothing to do", id);
    return reply(Ok());
  }
  if (pod->rec.phase != Phase::kRunning) {
    if (pod->busy) {
      return reply(Error::Make(Code::kFailedPrecondition, "sandbox {} is starting; retry", id));
    }
    return reply(Ok());
  }
  pod->stopping = true;
  std::string domain = pod->rec.domain;
  std::weak_ptr<bool> alive = alive_;
  auto destroy = [this, alive, id, domain, reply](const std::string& why) {
    if (!why.empty()) spdlog::warn("pod {}: clean power-off failed ({}); destroying", id, why);
    workers_.Run([this, alive, id, domain, reply] {
      auto r = backend_->Destroy(domain);
      loop_->Post([this, alive, id, r, reply] {
        if (alive.expired()) return;
        if (!r.ok()) return reply(r.error());
        if (Pod* p = Find(id)) MarkStopped(*p, 0);
        reply(Ok());
      });
    });
  };
  if (!pod->agent) return destroy("no agent channel");
  v1::DestroySandboxRequest req;
  uint32_t grace = timeout_secs ? timeout_secs : 10;
  req.set_grace_seconds(grace);
  agentapi::AgentClient::Over(pod->agent)
      .DestroySandbox(
          req,
          [destroy](Result<Empty> r) {
            // Powered off or not, make sure the domain is gone (and wait for it).
            destroy(r.ok() ? "" : r.error().ToString());
          },
          std::chrono::seconds(grace + 5));
}

void PodManager::Wait(const std::string& id, Reply<PodExit> reply) {
  Pod* pod = Find(id);
  if (!pod) return reply(UnknownPod(id));
  if (pod->rec.phase == Phase::kStopped) {
    return reply(PodExit{pod->rec.exit_status, pod->rec.exited_at_ns});
  }
  pod->waiters.push_back(std::move(reply));
}

void PodManager::Metrics(const std::string& id, Reply<std::string> reply) {
  Pod* pod = Find(id);
  if (!pod) return reply(UnknownPod(id));
  if (pod->rec.phase != Phase::kRunning || !pod->agent) {
    return reply(Error::Make(Code::kFailedPrecondition, "sandbox {} is {}: no metrics", id,
                             PhaseName(pod->rec.phase)));
  }
  v1::ContainerRequest req;  // no container: the pod
  agentapi::AgentClient::Over(pod->agent)
      .StatsContainer(
          req,
          [reply, id](Result<v1::StatsContainerResponse> r) {
            if (!r.ok()) return reply(std::move(r).error().Wrap("metrics of " + id));
            reply(r->metrics().SerializeAsString());
          },
          10s);
}

PodStatus PodManager::StatusOf(const Pod& pod) const {
  PodStatus s;
  s.id = pod.rec.id;
  s.ready = pod.rec.phase == Phase::kRunning;
  s.pid = pod.rec.pid;
  s.created_at_ns = pod.rec.created_at_ns;
  s.exited_at_ns = pod.rec.exited_at_ns;
  // containerd 2.x wants <protocol>+<transport>://: the agent mux speaks ttrpc.
  s.address = "ttrpc+unix://" + AgentSocket(pod.rec.id);
  s.phase = PhaseName(pod.rec.phase);
  return s;
}

Result<PodStatus> PodManager::Status(const std::string& id) {
  Pod* pod = Find(id);
  if (!pod) return UnknownPod(id);
  return StatusOf(*pod);
}

void PodManager::Shutdown(const std::string& id, Reply<void> reply) {
  Pod* pod = Find(id);
  if (!pod) {
    spdlog::info("pod {}: Shutdown of an unknown sandbox: nothing to do", id);
    return reply(Ok());
  }
  if (pod->busy) {
    return reply(Error::Make(Code::kFailedPrecondition, "sandbox {} is starting; retry", id));
  }
  std::weak_ptr<bool> alive = alive_;
  Stop(id, 0, [this, alive, id, reply](Result<void> r) {
    if (alive.expired()) return;
    if (!r.ok()) return reply(std::move(r).error().Wrap("shutdown sandbox " + id));
    Pod* pod = Find(id);
    if (!pod) return reply(Ok());
    // Anyone still waiting learns the pod is gone.
    MarkStopped(*pod, pod->rec.exit_status);
    if (auto r = RemoveTreeSafely(RunDir(id)); !r.ok()) {
      // Something under the share would not unmount: keep the record so a retry (or a
      // restart's recovery) finishes the job; nothing was deleted through a mount.
      return reply(std::move(r).error().Wrap("shutdown sandbox " + id));
    }
    ReleaseHostResources(*pod);
    RemoveCriFiles(pod->rec);
    if (auto s = store_.Remove(id); !s.ok()) return reply(s.error());
    auto ops = std::move(pod->ops);
    pods_.erase(id);
    for (auto& op : ops) op([] {});  // each finds the pod gone and says so
    cache_.Collect();
    spdlog::info("pod {}: shut down and removed", id);
    reply(Ok());
  });
}

void PodManager::RemoveCriFiles(const PodRecord& rec) {
  if (!rec.cri_files) return;
  // Only what we wrote: the directory is containerd's.
  for (const char* name : {"hosts", "resolv.conf", "hostname"}) {
    ::unlink((CriSandboxDir(rec.id) + "/" + name).c_str());
  }
}

void PodManager::ReleaseHostResources(Pod& pod) {
  // The VM is gone: its uid and files (the scratch disk) go too.
  ids_.Release(pod.rec.domain);
  for (const auto& d : pod.rec.disks) {
    if (d.cached) cache_.Release(d.path);
  }
  pod.rec.disks.clear();
  pod.rec.rootfs.clear();
  pod.rec.volumes.clear();
  if (HasTap(pod.rec)) RemoveTap(TapOf(pod.rec), pod.rec.netns);
}

void PodManager::Enqueue(const std::string& id, std::function<void(std::function<void()>)> op) {
  Pod* pod = Find(id);
  if (!pod) return op([] {});
  pod->ops.push_back(std::move(op));
  if (pod->op_running) return;
  std::weak_ptr<bool> alive = alive_;
  // Runs the queue's head; its completion runs the next one (from the loop, never nested).
  // The runner holds itself only weakly: the op in flight keeps it alive through its
  // completion, and it is freed once the queue is empty (a strong self-reference was a cycle).
  auto run_next = std::make_shared<std::function<void()>>();
  std::weak_ptr<std::function<void()>> weak = run_next;
  *run_next = [this, alive, id, weak] {
    Pod* p = Find(id);
    if (!p || p->ops.empty()) {
      if (p) p->op_running = false;
      return;
    }
    p->op_running = true;
    auto next = std::move(p->ops.front());
    p->ops.pop_front();
    next([this, alive, self = weak.lock()] {
      loop_->Post([alive, self] {
        if (!alive.expired()) (*self)();
      });
    });
  };
  (*run_next)();
}

RootfsInfo PodManager::RootfsOf(const Pod& pod, const std::string& container) const {
  RootfsInfo info;
  auto it = pod.rec.rootfs.find(container);
  if (it == pod.rec.rootfs.end()) return info;
  for (unsigned unit : it->second) {
    for (const auto& d : pod.rec.disks) {
      if (d.unit != unit) continue;
      v1::Storage st;
      st.set_driver(v1::Storage::SCSI);
      st.set_source(fmt::format("0:{}", unit));
      st.set_fstype("erofs");
      st.add_options("ro");
      // Named by unit and image, so a unit reused for another image is another mount.
      st.set_mount_point(fmt::format("{}/{}-{}", kGuestLayersDir, unit, ShortHash(d.path)));
      info.layers.push_back(std::move(st));
    }
  }
  if (pod.rec.scratch) info.upper_dir = std::string(kGuestScratchDir) + "/" + container;
  return info;
}

void PodManager::AttachRootfs(const std::string& id, const std::string& container,
                              google::protobuf::RepeatedPtrField<containerd::types::Mount> mounts,
                              Reply<RootfsInfo> reply) {
  if (!IsValidId(container)) {
    return reply(Error::Invalid("container id '{}' is invalid: use {}", container, kIdRule));
  }
  if (!Find(id)) return reply(UnknownPod(id));
  auto sources = LayersFromMounts(mounts);
  if (!sources.ok()) {
    return reply(std::move(sources).error().Wrap("attach rootfs of container " + container));
  }
  Enqueue(id, [this, id, container, sources = std::move(*sources),
               reply](std::function<void()> done) {
    auto finish = [reply, done](Result<RootfsInfo> r) {
      reply(std::move(r));
      done();
    };
    Pod* pod = Find(id);
    if (!pod) return finish(UnknownPod(id));
    if (pod->rec.phase != Phase::kRunning) {
      return finish(Error::Make(Code::kFailedPrecondition,
                                "sandbox {} is {}: containers need a running pod", id,
                                PhaseName(pod->rec.phase)));
    }
    if (pod->rec.rootfs.count(container)) return finish(RootfsOf(*pod, container));
    if (!backend_->SupportsDisks()) {
      return finish(Error::Make(Code::kUnimplemented,
                                "this VM backend cannot attach disks (container {})", container));
    }
    // Every layer's image: erofs blobs as they are, directories through the cache (builds run
    // in parallel on the workers). Collected in order, then attached.
    struct Gather {
      std::vector<Result<std::pair<std::string, bool>>> images;
      size_t pending = 0;
    };
    auto g = std::make_shared<Gather>();
    g->images.assign(sources.size(), Error(Code::kUnknown, "pending"));
    g->pending = sources.size();
    auto one_done = [this, g, id, container, finish](size_t i,
                                                     Result<std::pair<std::string, bool>> r) {
      g->images[i] = std::move(r);
      if (--g->pending > 0) return;
      std::vector<std::pair<std::string, bool>> images;
      std::optional<Error> failed;
      for (auto& img : g->images) {
        if (img.ok()) {
          images.push_back(*img);
        } else if (!failed) {
          failed = img.error();
        }
      }
      if (failed) {
        for (const auto& [path, cached] : images) {
          if (cached) cache_.Release(path);
        }
        return finish(std::move(*failed).Wrap("attach rootfs of container " + container));
      }
      AttachImages(id, container, std::move(images),
                   [finish](Result<RootfsInfo> r) { finish(std::move(r)); });
    };
    for (size_t i = 0; i < sources.size(); ++i) {
      if (sources[i].is_image && !ids_.enabled()) {
        one_done(i, std::pair{sources[i].path, false});
      } else if (sources[i].is_image) {
        // containerd's blob, in directories a confined QEMU cannot pass: a copy in the cache.
        cache_.AcquireCopy(sources[i].path, [one_done, i](Result<std::string> r) {
          if (!r.ok()) return one_done(i, std::move(r).error());
          one_done(i, std::pair{*r, true});
        });
      } else {
        cache_.Acquire(sources[i].path, [one_done, i](Result<std::string> r) {
          if (!r.ok()) return one_done(i, std::move(r).error());
          one_done(i, std::pair{*r, true});
        });
      }
    }
  });
}

void PodManager::AttachImages(const std::string& id, const std::string& container,
                              std::vector<std::pair<std::string, bool>> images,
                              Reply<RootfsInfo> reply) {
  Pod* pod = Find(id);
  auto release_all = [this](const std::vector<std::pair<std::string, bool>>& imgs) {
    for (const auto& [path, cached] : imgs) {
      if (cached) cache_.Release(path);
    }
  };
  if (!pod) {
    release_all(images);
    return reply(UnknownPod(id));
  }
  // A layer the pod already has attached is shared (its disk keeps the one cache reference);
  // a new one gets the lowest free unit (0 is the scratch disk).
  std::set<unsigned> used = {0};
  for (const auto& d : pod->rec.disks) used.insert(d.unit);
  std::vector<unsigned> units;
  std::vector<DiskRecord> fresh;
  for (const auto& [path, cached] : images) {
    auto same = [&p = path](const DiskRecord& d) { return d.path == p; };
    auto old = std::find_if(pod->rec.disks.begin(), pod->rec.disks.end(), same);
    auto now = std::find_if(fresh.begin(), fresh.end(), same);
    if (old != pod->rec.disks.end() || now != fresh.end()) {
      units.push_back(old != pod->rec.disks.end() ? old->unit : now->unit);
      if (cached) cache_.Release(path);
      continue;
    }
    unsigned unit = 1;
    while (used.count(unit)) ++unit;
    used.insert(unit);
    fresh.push_back(DiskRecord{unit, path, true, cached});
    units.push_back(unit);
  }
  std::string domain = pod->rec.domain;
  std::weak_ptr<bool> alive = alive_;
  workers_.Run([this, alive, id, container, domain, units, fresh, reply] {
    Result<void> r = Ok();
    size_t attached = 0;
    for (; attached < fresh.size(); ++attached) {
      const auto& d = fresh[attached];
      r = backend_->AttachDisk(domain, {d.path, d.unit, true});
      if (!r.ok()) break;
    }
    if (!r.ok()) {
      for (size_t i = 0; i < attached; ++i) {
        (void)backend_->DetachDisk(domain, {fresh[i].path, fresh[i].unit, true});
      }
    }
    loop_->Post([this, alive, id, container, units, fresh, reply, r] {
      if (alive.expired()) return;
      Pod* pod = Find(id);
      if (!r.ok() || !pod) {
        for (const auto& d : fresh) {
          if (d.cached) cache_.Release(d.path);
        }
        if (!pod) return reply(UnknownPod(id));
        return reply(Error(r.error()).Wrap("attach rootfs of container " + container));
      }
      for (const auto& d : fresh) pod->rec.disks.push_back(d);
      pod->rec.rootfs[container] = units;
      if (auto s = Save(*pod); !s.ok()) spdlog::error("pod {}: {}", id, s.error().ToString());
      spdlog::info("pod {}: container {} rootfs: {} layer(s), {} newly attached", id, container,
                   units.size(), fresh.size());
      reply(RootfsOf(*pod, container));
    });
  });
}

void PodManager::ShareVolumes(const std::string& id, const std::string& container,
                              std::vector<VolumeRequest> volumes,
                              Reply<std::vector<SharedVolume>> reply) {
  if (!IsValidId(container)) {
    return reply(Error::Invalid("container id '{}' is invalid: use {}", container, kIdRule));
  }
  if (!Find(id)) return reply(UnknownPod(id));
  Enqueue(
      id, [this, id, container, volumes = std::move(volumes), reply](std::function<void()> done) {
        auto finish = [reply, done](Result<std::vector<SharedVolume>> r) {
          reply(std::move(r));
          done();
        };
        Pod* pod = Find(id);
        if (!pod) return finish(UnknownPod(id));
        if (pod->rec.phase != Phase::kRunning) {
          return finish(Error::Make(Code::kFailedPrecondition, "sandbox {} is {}", id,
                                    PhaseName(pod->rec.phase)));
        }
        auto& mine = pod->rec.volumes[container];
        auto shared =
            ShareVolumesNow(RunDir(id), container, mine.size(), volumes, cfg_.run_dir + "/pods");
        if (!shared.ok()) return finish(std::move(shared).error());
        for (const auto& rel : shared->rels) mine.push_back(RunDir(id) + "/share/" + rel);
        if (auto s = Save(*pod); !s.ok()) spdlog::error("pod {}: {}", id, s.error().ToString());
        finish(std::move(shared->guest));
      });
}

void PodManager::ReleaseContainer(const std::string& id, const std::string& container,
                                  Reply<void> reply) {
  Enqueue(id, [this, id, container, reply](std::function<void()> done) {
    auto finish = [reply, done](Result<void> r) {
      reply(std::move(r));
      done();
    };
    Pod* pod = Find(id);
    if (!pod) return finish(Ok());  // the pod, and everything of it, is already gone
    if (IsValidId(container)) {
      if (auto r = RemoveFromShare(RunDir(id), "volumes/" + container); !r.ok()) {
        return finish(std::move(r).error().Wrap("release container " + container));
      }
    }
    pod->rec.volumes.erase(container);
    pod->rec.rootfs.erase(container);
    // Disks no remaining container stacks.
    std::set<unsigned> in_use;
    for (const auto& [c, units] : pod->rec.rootfs) in_use.insert(units.begin(), units.end());
    std::vector<DiskRecord> unused;
    for (const auto& d : pod->rec.disks) {
      if (!in_use.count(d.unit)) unused.push_back(d);
    }
    if (auto s = Save(*pod); !s.ok()) spdlog::error("pod {}: {}", id, s.error().ToString());
    if (unused.empty()) return finish(Ok());
    std::string domain = pod->rec.domain;
    bool running = pod->rec.phase == Phase::kRunning;
    std::weak_ptr<bool> alive = alive_;
    workers_.Run([this, alive, id, domain, running, unused, finish] {
      std::vector<Result<void>> results;
      for (const auto& d : unused) {
        results.push_back(running ? backend_->DetachDisk(domain, {d.path, d.unit, true})
                                  : Result<void>(Ok()));
      }
      loop_->Post([this, alive, id, unused, results, finish] {
        if (alive.expired()) return;
        Pod* pod = Find(id);
        std::optional<Error> failed;
        for (size_t i = 0; i < unused.size(); ++i) {
          if (!results[i].ok()) {
            // Still attached: keep it on record (its unit stays taken) and say so.
            if (!failed) failed = results[i].error();
            continue;
          }
          // A pod shut down meanwhile released its disks' cache references already.
          if (!pod) continue;
          auto& disks = pod->rec.disks;
          disks.erase(std::remove_if(disks.begin(), disks.end(),
                                     [&](const DiskRecord& d) { return d.unit == unused[i].unit; }),
                      disks.end());
          if (unused[i].cached) cache_.Release(unused[i].path);
        }
        if (pod) (void)Save(*pod);
        cache_.Collect();
        if (failed) return finish(std::move(*failed).Wrap("detach layer disk"));
        finish(Ok());
      });
    });
  });
}

}  // namespace peapod::sandboxer
