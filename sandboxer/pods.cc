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

PodManager::PodManager(EventLoop* loop, const Config& cfg, VmBackend* backend, Seams seams)
    : loop_(loop),
      cfg_(cfg),
      backend_(backend),
      own_network_(seams.network ? nullptr : std::make_unique<HostNetwork>()),
      own_storage_(seams.storage ? nullptr
                                 : std::make_unique<HostStorage>(cfg.state_dir, cfg.mkfs_ext4)),
      own_clock_(seams.clock ? nullptr : std::make_unique<LoopClock>(loop)),
      net_(seams.network ? seams.network : own_network_.get()),
      storage_(seams.storage ? seams.storage : own_storage_.get()),
      clock_(seams.clock ? seams.clock : own_clock_.get()),
      ids_(cfg.state_dir, cfg.run_dir, backend->ConfinesVms() ? cfg.vm_uid_base : 0,
           cfg.vm_uid_count, cfg.vm_gid),
      launcher_(cfg_, backend, net_, storage_, &ids_),
      cache_(cfg.state_dir + "/layers", cfg.mkfs_erofs,
             std::chrono::seconds(cfg.layer_cache_keep_seconds), &build_workers_,
             [loop, alive = std::weak_ptr<bool>(alive_)](std::function<void()> fn) {
               loop->Post([alive, fn = std::move(fn)] {
                 if (!alive.expired()) fn();
               });
             }) {}

// Callbacks posted by workers and clients hold a weak_ptr to alive_: dropping it first makes
// every one of them a no-op, even those that run while members are being destroyed.
PodManager::~PodManager() {
  // Pool VMs belong to no pod: they go with us (a crash leaves them to CleanPoolLeftovers).
  *pool_closed_ = true;
  for (int i = 0; i < 1200 && *pool_booting_ > 0; ++i) std::this_thread::sleep_for(50ms);
  for (auto& vm : pool_) {
    vm->channel = {};
    RemovePoolVmNow(vm->name, vm->tap);
  }
  pool_.clear();
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

void PodManager::Off(WorkerPool& pool, std::function<Result<void>()> work,
                     std::function<void(Result<void>)> then) {
  pool.Run([this, alive = std::weak_ptr<bool>(alive_), work = std::move(work),
            then = std::move(then)]() mutable {
    Result<void> r = work();
    loop_->Post([alive, r = std::move(r), then = std::move(then)]() mutable {
      if (!alive.expired()) then(std::move(r));
    });
  });
}

void PodManager::SaveThen(Pod& pod, std::function<void(Result<void>)> done) {
  // A pod whose record is being removed (Shutdown) is never written back.
  if (pod.removing) return done(Ok());
  SaveRecordThen(pod.rec, std::move(done));
}

void PodManager::SaveRecordThen(const PodRecord& rec, std::function<void(Result<void>)> done) {
  Off(
      records_, [this, rec] { return storage_->SaveRecord(rec); },
      [id = rec.id, done = std::move(done)](Result<void> r) {
        if (!r.ok()) spdlog::error("pod {}: {}", id, r.error().ToString());
        done(std::move(r));
      });
}

void PodManager::SaveLater(Pod& pod) {
  SaveThen(pod, [](Result<void>) {});
}

VmSpec PodManager::SpecFor(const Pod& pod) const {
  return launcher_.BaseSpec(pod.rec.domain, RunDir(pod.rec.id), storage_->RecordDir(pod.rec.id),
                            pod.rec.vcpus ? pod.rec.vcpus : cfg_.vcpus,
                            pod.rec.memory_mib ? pod.rec.memory_mib : cfg_.memory_mib);
}

Result<void> PodManager::PreparePodFiles(const PodRecord& rec) {
  // containerd bind-mounts the pod's /etc/hosts, resolv.conf, hostname and /dev/shm into
  // containers only if they exist on the host; they live in the share the guest sees.
  PP_TRY(storage_->PrepareShare(RunDir(rec.id)));
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
  for (const auto& [name, text] : files) {
    PP_TRY(storage_->WriteShareFile(RunDir(rec.id), name, text));
  }
  if (rec.cri_files) {
    for (const auto& [name, text] : files) {
      PP_TRY(storage_->WriteFile(CriSandboxDir(rec.id) + "/" + name, text));
    }
  }
  return Ok();
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

namespace {
Error Quitting() {
  return Error(Code::kUnavailable, "peapod-sandboxer is exiting; retry once it is back");
}
}  // namespace

void PodManager::Create(const std::string& id, const PodOptions& opts, Reply<void> reply) {
  if (quitting_) return reply(Quitting());
  const std::string& netns = opts.netns;
  if (!IsValidId(id)) {
    return reply(Error::Invalid("sandbox id '{}' is invalid: use {}", id, kIdRule));
  }
  if (IsReservedPodId(id)) {
    return reply(Error::Invalid(
        "sandbox id '{}' is reserved (the sandboxer names its pool and template VMs so): use "
        "another id",
        id));
  }
  if (Find(id)) return reply(Error::Make(Code::kAlreadyExists, "sandbox {} already exists", id));
  if (!netns.empty() && !net_->NetnsExists(netns)) {
    return reply(Error::NotFound(
        "sandbox {}: network namespace {} does not exist (did CNI setup fail?)", id, netns));
  }
  if (opts.memory_limit_bytes < 0 || opts.cpus < 0) {
    return reply(Error::Invalid("sandbox {}: negative resource limits (memory {} bytes, {} CPUs)",
                                id, opts.memory_limit_bytes, opts.cpus));
  }
  if (auto leaf = PodCgroupLeaf(opts.cgroup_parent, id); !leaf.ok()) {
    return reply(std::move(leaf).error().Wrap("sandbox " + id));
  }
  auto pod = std::make_unique<Pod>();
  PodRecord& rec = pod->rec;
  rec.id = id;
  rec.netns = netns;
  rec.domain = "peapod-" + id;
  rec.created_at_ns = clock_->WallNs();
  rec.hostname = opts.hostname;
  rec.memory_limit_bytes = opts.memory_limit_bytes;
  rec.cpus = opts.cpus;
  rec.cgroup_parent = opts.cgroup_parent;
  // The VM gets the pod's limits plus room for the guest kernel and agent; no limits, the
  // configured default size.
  rec.vcpus = opts.cpus > 0
                  ? std::min<unsigned>(cfg_.max_vcpus, static_cast<unsigned>(std::ceil(opts.cpus)))
                  : cfg_.vcpus;
  auto mib = [](int64_t bytes) { return (static_cast<uint64_t>(bytes) + (1 << 20) - 1) >> 20; };
  uint64_t overhead = opts.memory_overhead_bytes > 0
                          ? std::max<uint64_t>(mib(opts.memory_overhead_bytes), 64)
                          : cfg_.memory_overhead_mib;
  rec.memory_mib =
      opts.memory_limit_bytes > 0 ? mib(opts.memory_limit_bytes) + overhead : cfg_.memory_mib;
  rec.dns_servers = opts.dns_servers;
  rec.dns_searches = opts.dns_searches;
  rec.dns_options = opts.dns_options;
  rec.sysctls = opts.sysctls;
  rec.cri_files = opts.cri_files;
  // Taken at once (busy until its files and record are written), so a second Create or a
  // Start meanwhile is refused; the record is written by the writer, after anything earlier.
  pod->busy = true;
  PodRecord copy = rec;
  pods_[id] = std::move(pod);
  Off(
      fs_workers_, [this, copy] { return PreparePodFiles(copy); },
      [this, id, reply](Result<void> r) {
        Pod* pod = Find(id);
        if (!pod) return reply(UnknownPod(id));
        if (!r.ok()) return Created(id, std::move(r), reply);
        SaveThen(*pod, [this, id, reply](Result<void> r) { Created(id, std::move(r), reply); });
      });
}

void PodManager::Created(const std::string& id, Result<void> r, Reply<void> reply) {
  Pod* pod = Find(id);
  if (!pod) return reply(UnknownPod(id));
  if (r.ok()) {
    pod->busy = false;
    spdlog::info("pod {}: created", id);
    return reply(Ok());
  }
  // Nothing of it stays: its files, its record (if one was written), the pod. It stays
  // (busy) until then, so a Create retried at once waits rather than racing this cleanup.
  PodRecord rec = pod->rec;
  Error why = std::move(r).error().Wrap("create sandbox " + id);
  Off(
      fs_workers_,
      [this, rec] {
        (void)storage_->RemoveTree(RunDir(rec.id));
        RemoveCriFiles(rec);
        return Ok();
      },
      [this, id, why, reply](Result<void>) {
        Off(
            records_, [this, id] { return storage_->RemoveRecord(id); },
            [this, id, why, reply](Result<void>) {
              if (Pod* pod = Find(id)) {
                auto waiters = std::move(pod->waiters);
                pods_.erase(id);
                for (auto& w : waiters) w(UnknownPod(id));
              }
              reply(why);
            });
      });
}

void PodManager::Start(const std::string& id, Reply<PodStatus> reply) {
  if (quitting_) return reply(Quitting());
  Pod* pod = Find(id);
  if (!pod) return reply(UnknownPod(id));
  if (pod->rec.phase == Phase::kRunning) return reply(StatusOf(*pod));  // idempotent
  if (pod->busy || pod->rec.phase != Phase::kCreated) {
    return reply(Error::Make(Code::kFailedPrecondition, "sandbox {} is {}: it cannot be started",
                             id, pod->busy ? "busy" : PhaseName(pod->rec.phase)));
  }
  pod->busy = true;
  pod->rec.phase = Phase::kStarting;
  std::shared_ptr<PoolVm> pooled = TakePoolVm(*pod);
  if (pooled) {
    // The pool VM's replacement starts once this Start has ended, either way.
    std::weak_ptr<bool> alive = alive_;
    reply = [this, alive, reply = std::move(reply)](Result<PodStatus> r) {
      if (!alive.expired()) FillPool();
      reply(std::move(r));
    };
    // Recorded before anything moves: a crash from here on leaves a record naming the pool VM,
    // which Recover then destroys with the pod back in "created".
    pod->rec.domain = pooled->domain;
    pod->rec.tap = pooled->tap;
  }
  auto deadline = clock_->Now() + std::chrono::seconds(cfg_.boot_timeout_seconds);
  pod->start_steps.clear();
  pod->step_at = std::chrono::steady_clock::now();
  SaveThen(*pod, [this, id, pooled, deadline, reply](Result<void> r) mutable {
    Pod* pod = Find(id);
    std::unique_ptr<PoolVm> vm;
    if (pooled) vm = std::make_unique<PoolVm>(std::move(*pooled));
    if (!pod || !r.ok()) {
      if (vm) DestroyPoolVm(std::move(vm));
      if (!pod) return reply(UnknownPod(id));
      pod->busy = false;
      pod->rec.phase = Phase::kCreated;
      pod->rec.domain = "peapod-" + id;
      pod->rec.tap.clear();
      return reply(std::move(r).error().Wrap("start sandbox " + id));
    }
    if (vm) return AdoptPoolVm(id, std::move(vm), reply);
    LaunchOwnVm(id, deadline, reply);
  });
}

void PodManager::LaunchOwnVm(const std::string& id, Clock::TimePoint deadline,
                             Reply<PodStatus> reply) {
  Pod* pod = Find(id);
  VmLauncher::Launch l;
  l.spec = SpecFor(*pod);
  if (!pod->rec.netns.empty()) {
    l.tap = VmLauncher::Launch::Tap::kPodNetns;
    l.pod_id = id;
    l.netns = pod->rec.netns;
  }
  // The template VM has a NIC: a pod without one boots.
  uint64_t generation = pod->rec.netns.empty() ? 0 : UseTemplate(l.spec);
  std::string template_mac = generation ? tmpl_.ready->mac : "";
  if (!template_mac.empty()) {
    spdlog::info("pod {}: restoring from template {}", id, l.spec.restore_from);
  }
  PodRecord rec = pod->rec;
  auto launch = std::make_shared<VmLauncher::Launch>(std::move(l));
  auto vm = std::make_shared<Result<VmInfo>>(Error(Code::kUnknown, "not launched"));
  Off(
      vm_workers_,
      [this, rec, launch, vm]() -> Result<void> {
        // The share QEMU will export must be the read-only one (a run dir from before it, or
        // one a reboot emptied, is laid out again here; one that cannot be is refused, never
        // exported).
        PP_TRY_CTX(PreparePodFiles(rec), "prepare its share");
        *vm = launcher_.Run(*launch);
        return Ok();
      },
      [this, id, launch, vm, deadline, reply, template_mac, generation](Result<void> files) {
        if (!launch->restore_failed.empty()) TemplateBroken(generation, launch->restore_failed);
        Pod* pod = Find(id);
        if (!pod) return reply(UnknownPod(id));
        pod->start_steps = std::move(launch->steps);
        pod->step_at = std::chrono::steady_clock::now();
        // The launcher already undid its own steps when the VM did not start.
        if (!files.ok()) return FailStart(id, files.error(), /*vm_started=*/false, reply);
        if (!vm->ok()) return FailStart(id, vm->error(), /*vm_started=*/false, reply);
        pod->rec.pid = (*vm)->pid;
        pod->rec.scratch = backend_->SupportsDisks();
        pod->net = std::move(launch->net);
        if (!launch->spec.restore_from.empty()) {
          // The restored guest's NIC has the template's MAC until the agent gives it the pod's.
          pod->resume_pending = true;
          if (pod->net) pod->net->guest.mutable_interfaces(0)->set_current_mac(template_mac);
        }
        if (auto r = AttachChannel(*pod); !r.ok()) {
          return FailStart(id, r.error(), /*vm_started=*/true, reply);
        }
        WaitForAgent(id, deadline, reply);
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
  p->net_call.reset();
  p->resume_pending = false;
  p->busy = false;
  p->rec.phase = Phase::kCreated;
  p->rec.pid = 0;
  p->rec.scratch = false;
  p->rec.domain = "peapod-" + id;  // a pool VM it was adopting is destroyed below
  p->rec.tap.clear();
  p->forwarder.reset();
  p->mux.reset();
  p->agent.reset();
  Error why = std::move(e).Wrap("start sandbox " + id);
  if (!vm_started) {
    return SaveThen(*p, [why, reply](Result<void>) { reply(why); });
  }
  SaveLater(*p);
  // The answer waits for the cleanup, and the pod stays busy meanwhile: a Start retried at once
  // would otherwise make a VM, TAP and scratch disk of the same names for this cleanup to
  // remove.
  p->busy = true;
  // Where an unconfined VM has it; a confined one's goes with its uid's directories.
  std::string scratch = ids_.enabled() ? "" : storage_->RecordDir(id) + "/scratch.img";
  uint32_t uid = ids_.UidOf(domain);
  Off(
      vm_workers_,
      [this, domain, tap, has_tap, netns, scratch, uid] {
        (void)backend_->Destroy(domain);
        if (has_tap) net_->RemoveTap(tap, netns);
        launcher_.DiscardVmFiles(domain, scratch, uid);
        // A pool VM whose adoption failed: what is still under its pool name.
        if (domain.rfind("peapod-pool-", 0) == 0) {
          std::string name = domain.substr(std::string("peapod-").size());
          for (const auto& dir : {RunDir(name), PoolStateDir(name)})
            (void)storage_->RemoveTree(dir);
        }
        return Ok();
      },
      [this, id, why, reply](Result<void>) {
        if (Pod* p = Find(id)) p->busy = false;
        reply(why);
      });
}

void PodManager::WaitForAgent(const std::string& id, Clock::TimePoint deadline,
                              Reply<PodStatus> reply) {
  Pod* pod = Find(id);
  if (!pod || !pod->agent) return reply(UnknownPod(id));
  auto fail = [this, id, reply](Error e) { FailStart(id, std::move(e), true, reply); };
  if (clock_->Now() >= deadline) {
    return fail(Error::Make(Code::kDeadlineExceeded,
                            "the guest agent did not answer within {} s (see {}/console.log)",
                            cfg_.boot_timeout_seconds, storage_->RecordDir(id)));
  }
  if (!pod->mux || !pod->mux->upstream_attached()) {
    return fail(Error(Code::kUnavailable, "the VM went away while booting (see " +
                                              storage_->RecordDir(id) + "/console.log)"));
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
              clock_->After(200ms, [this, alive, id, deadline, reply] {
                if (!alive.expired()) WaitForAgent(id, deadline, reply);
              });
              return;
            }
            if (std::none_of(pod->start_steps.begin(), pod->start_steps.end(),
                             [](const auto& st) { return st.first == "boot_to_agent"; })) {
              pod->Step("boot_to_agent");  // the first answer: kernel, initrd, agent start
            }
            if (!pod->resume_pending) return SetUpGuest(id, reply);
            // Restored from the template: its own randomness and clock before anything of
            // the pod's reaches it.
            SendResumed(pod->agent, [this, alive, id, deadline, reply, fail](Result<void> r) {
              if (alive.expired()) return;
              Pod* pod = Find(id);
              if (!pod) return reply(UnknownPod(id));
              if (!r.ok()) return fail(std::move(r).error());
              pod->resume_pending = false;
              pod->Step("resumed");
              SetUpGuest(id, reply);
            });
          },
          1s);
}

void PodManager::SetUpGuest(const std::string& id, Reply<PodStatus> reply) {
  Pod* pod = Find(id);
  if (!pod || !pod->agent) return reply(UnknownPod(id));
  auto fail = [this, id, reply](Error e) { FailStart(id, std::move(e), true, reply); };
  std::weak_ptr<bool> alive = alive_;
  auto agent = agentapi::AgentClient::Over(pod->agent);
  // The agent answers a channel's calls one after the other, in the order they came: the
  // network (containers must find it up) goes first and CreateSandbox right behind it, without
  // a round trip between them. The pod is set up when both have answered; the first error
  // wins, and FailStart takes the VM with whatever the second call did.
  struct Joined {
    int pending = 1;
    std::optional<Error> error;
  };
  auto join = std::make_shared<Joined>();
  auto done = [this, alive, id, reply, fail, join](std::optional<Error> e, const char* step) {
    if (alive.expired()) return;
    if (e && !join->error) join->error = std::move(e);
    Pod* pod = Find(id);
    if (!join->error && pod) pod->Step(step);
    if (--join->pending > 0) return;
    if (join->error) return fail(std::move(*join->error));
    if (!pod) return reply(UnknownPod(id));
    FinishStart(id, reply);
  };
  // An adopted pool VM has its network call in flight already.
  if (pod->net) {
    pod->net_call = SendPodNetwork(pod->agent, pod->net->guest);
    pod->net.reset();
  }
  if (pod->net_call) {
    ++join->pending;
    std::exchange(pod->net_call, nullptr)->Then([done](std::optional<Error> e) {
      done(std::move(e), "guest_network");
    });
    // Refused already: the VM goes, with no sandbox set up in it first.
    if (join->error) return done(std::nullopt, "guest_setup");
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
      [done](Result<Empty> r) {
        done(
            r.ok() ? std::nullopt : std::optional<Error>(std::move(r).error().Wrap("set up guest")),
            "guest_setup");
      },
      30s);
}

void PodManager::FinishStart(const std::string& id, Reply<PodStatus> reply) {
  Pod* pod = Find(id);
  if (!pod) return reply(UnknownPod(id));
  PlaceVm(*pod);
  // Running (in memory, to Status, Start and Stop) once the record says so: a restart then
  // re-adopts what containerd was told runs.
  PodRecord running = pod->rec;
  running.phase = Phase::kRunning;
  SaveRecordThen(running, [this, id, reply](Result<void> r) {
    Pod* pod = Find(id);
    if (!pod) return reply(UnknownPod(id));
    if (!r.ok()) {
      UnplaceVm(*pod);
      return FailStart(id, std::move(r).error(), /*vm_started=*/true, reply);
    }
    pod->rec.phase = Phase::kRunning;
    pod->busy = false;
    pod->Step("record");
    StartPortForwarder(*pod);
    pod->Step("port_forwarder");
    LogStartSteps(*pod);
    spdlog::info("pod {}: ready (QEMU pid {})", id, pod->rec.pid);
    reply(StatusOf(*pod));
  });
}

v1::ConfigureNetworkRequest StandbyNetwork(const std::string& mac) {
  v1::ConfigureNetworkRequest req;
  auto* itf = req.add_interfaces();
  itf->set_mac(mac);
  itf->set_standby(true);
  return req;
}

std::shared_ptr<PendingAnswer> SendPodNetwork(const std::shared_ptr<ttrpc::Client>& agent,
                                              const v1::ConfigureNetworkRequest& req) {
  auto answer = std::make_shared<PendingAnswer>();
  agentapi::AgentClient::Over(agent).ConfigureNetwork(
      req,
      [answer](Result<Empty> r) {
        if (r.ok()) return answer->Set(std::nullopt);
        answer->Set(std::move(r).error().Wrap("configure guest network"));
      },
      30s);
  return answer;
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
    // mkfs leaves the inode tables to be zeroed after mount (lazy_itable_init): without this
    // the guest's ext4lazyinit thread writes them for minutes after every pod start, ~18 SCSI
    // requests a second in an otherwise idle pod. The tables stay unzeroed, which ext4 (and
    // e2fsck) handle through the groups' uninitialized flags; the disk is the pod's alone and
    // is thrown away with it.
    disk->add_options("noinit_itable");
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
  pod.rec.exited_at_ns = clock_->WallNs();
  pod.forwarder.reset();
  pod.agent.reset();
  pod.mux.reset();
  ::unlink(AgentSocket(pod.rec.id).c_str());
  UnplaceVm(pod);
  spdlog::info("pod {}: stopped (status {})", pod.rec.id, status);
  auto metrics = std::move(pod.metric_replies);
  pod.metric_replies.clear();
  for (auto& [n, reply] : metrics) {
    reply(Error::Make(Code::kUnavailable, "sandbox {} stopped", pod.rec.id));
  }
  // Waits and Stops learn the exit once it is on record: a restart reports the same one.
  auto waiters = std::move(pod.waiters);
  pod.waiters.clear();
  auto stops = std::move(pod.stop_replies);
  pod.stop_replies.clear();
  PodExit exit{pod.rec.exit_status, pod.rec.exited_at_ns};
  SaveThen(pod, [waiters = std::move(waiters), stops = std::move(stops), exit](Result<void>) {
    for (auto& w : waiters) w(exit);
    for (auto& reply : stops) reply(Ok());
  });
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
  RemoveCgroup(pod.rec.id, PodCgroup{pod.rec.cgroup_leaf, pod.rec.cgroup_made}, 0);
}

void PodManager::RemoveCgroup(const std::string& id, const PodCgroup& cg, int attempt) {
  Off(
      fs_workers_, [cg, roots = cgroup_roots_] { return RemovePodCgroup(cg, roots); },
      [this, id, cg, attempt](Result<void> r) {
        if (!r.ok() && attempt < 50) {
          // QEMU may still be exiting (up to 5 s): again later, holding no worker meanwhile.
          return clock_->After(100ms, [this, alive = std::weak_ptr<bool>(alive_), id, cg, attempt] {
            if (!alive.expired()) RemoveCgroup(id, cg, attempt + 1);
          });
        }
        if (!r.ok()) return spdlog::warn("pod {}: {}", id, r.error().ToString());
        Pod* p = Find(id);
        if (!p || p->rec.cgroup_leaf != cg.leaf) return;
        p->rec.cgroup_leaf.clear();
        p->rec.cgroup_made.clear();
        SaveLater(*p);
      });
}

void PodManager::CancelWaiters() {
  for (auto& [id, pod] : pods_) {
    auto waiters = std::move(pod->waiters);
    pod->waiters.clear();
    Error restarting(Code::kUnavailable, "peapod-sandboxer is restarting; the pod keeps running");
    for (auto& w : waiters) w(restarting);
    auto metrics = std::move(pod->metric_replies);
    pod->metric_replies.clear();
    for (auto& [n, reply] : metrics) reply(restarting);
    AnswerStops(*pod, restarting);
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
    // Starting: the VM may be up in a moment; anything else has no VM to stop.
    if (pod->rec.phase == Phase::kStarting) {
      return reply(Error::Make(Code::kFailedPrecondition, "sandbox {} is starting; retry", id));
    }
    return reply(Ok());
  }
  // One stop at a time; it answers every Stop that came meanwhile. Whatever ends it answers
  // them: the VM destroyed (MarkStopped), the VM stopping by itself (VmStopped, which may come
  // before the agent's answer and drop it with the agent's client), or a failed destroy.
  pod->stop_replies.push_back(std::move(reply));
  if (pod->stop_replies.size() > 1) return;
  pod->stopping = true;
  std::string domain = pod->rec.domain;
  auto destroy = [this, id, domain](const std::string& why) {
    if (!why.empty()) spdlog::warn("pod {}: clean power-off failed ({}); destroying", id, why);
    Off(
        vm_workers_, [this, domain] { return backend_->Destroy(domain); },
        [this, id](Result<void> r) {
          Pod* p = Find(id);
          if (!p) return;
          if (!r.ok()) return AnswerStops(*p, std::move(r).error().Wrap("stop sandbox " + id));
          MarkStopped(*p, 0);
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

void PodManager::Quit(std::function<void()> done) {
  quitting_ = true;
  CancelWaiters();
  // A template being built is not kept half-made (a restart builds it again): once the build's
  // jobs in flight are over (DestroyPool waits for them with the pool's), its VM goes.
  std::string building = tmpl_.building ? tmpl_.build_key : "";
  tmpl_.build_channel = {};
  DestroyPool([this, building, done = std::move(done)] {
    Off(
        vm_workers_,
        [this, building] {
          if (!building.empty()) RemoveTemplateVmNow(building);
          return Ok();
        },
        [this, done](Result<void>) {
          // The writer's queue is in order: once this no-op ran, every record before it is on
          // disk.
          Off(
              records_, [] { return Ok(); }, [done](Result<void>) { done(); });
        });
  });
}

void PodManager::AnswerStops(Pod& pod, Result<void> r) {
  auto replies = std::move(pod.stop_replies);
  pod.stop_replies.clear();
  for (auto& reply : replies) reply(r);
}

void PodManager::Wait(const std::string& id, Reply<PodExit> reply) {
  Pod* pod = Find(id);
  if (!pod) return reply(UnknownPod(id));
  if (pod->rec.phase == Phase::kStopped) {
    return reply(PodExit{pod->rec.exit_status, pod->rec.exited_at_ns});
  }
  if (quitting_) return reply(Quitting());
  pod->waiters.push_back(std::move(reply));
}

void PodManager::Metrics(const std::string& id, Reply<std::string> reply) {
  Pod* pod = Find(id);
  if (!pod) return reply(UnknownPod(id));
  if (pod->rec.phase != Phase::kRunning || !pod->agent) {
    return reply(Error::Make(Code::kFailedPrecondition, "sandbox {} is {}: no metrics", id,
                             PhaseName(pod->rec.phase)));
  }
  // Kept on the pod until answered: a VM that stops meanwhile drops the call with its agent
  // client, and MarkStopped answers instead.
  uint64_t n = ++pod->metric_calls;
  pod->metric_replies[n] = std::move(reply);
  v1::ContainerRequest req;  // no container: the pod
  agentapi::AgentClient::Over(pod->agent)
      .StatsContainer(
          req,
          [this, id, n](Result<v1::StatsContainerResponse> r) {
            Pod* pod = Find(id);
            if (!pod) return;
            auto it = pod->metric_replies.find(n);
            if (it == pod->metric_replies.end()) return;
            auto reply = std::move(it->second);
            pod->metric_replies.erase(it);
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
    return reply(Error::Make(Code::kFailedPrecondition, "sandbox {} is busy ({}); retry", id,
                             PhaseName(pod->rec.phase)));
  }
  Stop(id, 0, [this, id, reply](Result<void> r) {
    if (!r.ok()) return reply(std::move(r).error().Wrap("shutdown sandbox " + id));
    Pod* pod = Find(id);
    if (!pod) return reply(Ok());
    if (pod->busy) {
      return reply(Error::Make(Code::kFailedPrecondition, "sandbox {} is busy; retry", id));
    }
    // Anyone still waiting learns the pod is gone.
    MarkStopped(*pod, pod->rec.exit_status);
    pod->busy = true;
    // After the storage ops in flight, which bind into the share it removes.
    Enqueue(id, [this, id, reply](std::function<void()> done) {
      RemovePod(id, [reply, done](Result<void> r) {
        reply(std::move(r));
        done();
      });
    });
  });
}

void PodManager::RemovePod(const std::string& id, Reply<void> reply) {
  Pod* pod = Find(id);
  if (!pod) return reply(Ok());
  PodRecord rec = pod->rec;
  Off(
      fs_workers_,
      [this, rec]() -> Result<void> {
        // Something under the share that would not unmount keeps the record, so a retry (or a
        // restart's recovery) finishes the job; nothing was deleted through a mount.
        PP_TRY(storage_->RemoveTree(RunDir(rec.id)));
        // The VM is gone: its uid and files (the scratch disk), its TAP, our CRI files.
        ids_.Release(rec.domain);
        if (HasTap(rec)) net_->RemoveTap(TapOf(rec), rec.netns);
        RemoveCriFiles(rec);
        return Ok();
      },
      [this, id, reply](Result<void> r) {
        Pod* pod = Find(id);
        if (!pod) return reply(Ok());
        if (!r.ok()) {
          pod->busy = false;
          return reply(std::move(r).error().Wrap("shutdown sandbox " + id));
        }
        for (const auto& d : pod->rec.disks) {
          if (d.cached) cache_.Release(d.path);
        }
        pod->rec.disks.clear();
        pod->rec.rootfs.clear();
        pod->rec.volumes.clear();
        pod->removing = true;  // no record of it is written from here on
        Off(
            records_, [this, id] { return storage_->RemoveRecord(id); },
            [this, id, reply](Result<void> s) {
              Pod* pod = Find(id);
              if (!pod) return reply(Ok());
              if (!s.ok()) {
                pod->busy = false;
                pod->removing = false;
                return reply(std::move(s).error().Wrap("shutdown sandbox " + id));
              }
              auto ops = std::move(pod->ops);
              pods_.erase(id);
              for (auto& op : ops) op([] {});  // each finds the pod gone and says so
              cache_.Collect();
              spdlog::info("pod {}: shut down and removed", id);
              reply(Ok());
            });
      });
}

void PodManager::RemoveCriFiles(const PodRecord& rec) {
  if (!rec.cri_files) return;
  // Only what we wrote: the directory is containerd's.
  for (const char* name : {"hosts", "resolv.conf", "hostname"}) {
    storage_->RemoveFile(CriSandboxDir(rec.id) + "/" + name);
  }
}

}  // namespace peapod::sandboxer
