#include "sandboxer/pods.h"

#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <optional>
#include <set>

#include <spdlog/spdlog.h>

#include "common/base/ids.h"
#include "peapod/agent/v1/agent.pb.h"
#include "sandboxer/network.h"

namespace peapod::sandboxer {

namespace fs = std::filesystem;
namespace v1 = peapod::agent::v1;
using namespace std::chrono_literals;
using Phase = PodRecord::Phase;

constexpr char kAgentService[] = "peapod.agent.v1.Agent";

WorkerPool::WorkerPool(size_t threads) {
  for (size_t i = 0; i < threads; ++i) {
    threads_.emplace_back([this] {
      for (;;) {
        std::function<void()> job;
        {
          std::unique_lock<std::mutex> l(mu_);
          cv_.wait(l, [&] { return quit_ || !jobs_.empty(); });
          if (jobs_.empty()) return;
          job = std::move(jobs_.front());
          jobs_.pop_front();
        }
        job();
      }
    });
  }
}

WorkerPool::~WorkerPool() {
  {
    std::lock_guard<std::mutex> l(mu_);
    quit_ = true;
  }
  cv_.notify_all();
  for (auto& t : threads_) t.join();
}

void WorkerPool::Run(std::function<void()> job) {
  {
    std::lock_guard<std::mutex> l(mu_);
    jobs_.push_back(std::move(job));
  }
  cv_.notify_one();
}

struct PodManager::Pod {
  PodRecord rec;
  bool busy = false;      // Start or Stop in progress
  bool stopping = false;  // we asked for the stop (clean exit status)
  std::unique_ptr<AgentMux> mux;
  std::shared_ptr<ttrpc::Client> agent;  // the sandboxer's own client, through the mux
  std::vector<Reply<PodExit>> waiters;
  std::optional<PodNetwork> net;  // set while starting, for the agent's ConfigureNetwork
};

namespace {

int64_t NowNs() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

Error UnknownPod(const std::string& id) {
  return Error::NotFound("sandbox {} not found (never created here, or already shut down)", id);
}

}  // namespace

PodManager::PodManager(EventLoop* loop, const Config& cfg, VmBackend* backend)
    : loop_(loop), cfg_(cfg), backend_(backend), store_(cfg.state_dir) {}

PodManager::~PodManager() { *alive_ = false; }

std::string PodManager::RunDir(const std::string& id) const { return cfg_.run_dir + "/pods/" + id; }

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

VmSpec PodManager::SpecFor(const Pod& pod) const {
  VmSpec s;
  s.name = pod.rec.domain;
  s.kernel = cfg_.kernel;
  s.initrd = cfg_.initrd;
  s.cmdline = cfg_.cmdline;
  s.vcpus = cfg_.vcpus;
  s.memory_mib = cfg_.memory_mib;
  s.kvm = UseKvm();
  std::string dir = RunDir(pod.rec.id);
  s.agent_socket = dir + "/vm-agent.sock";
  s.share_dir = dir + "/share";
  s.console_log = store_.PodDir(pod.rec.id) + "/console.log";
  return s;
}

Result<void> PodManager::PreparePodFiles(const std::string& id) {
  // containerd bind-mounts the pod's /etc/hosts, resolv.conf, hostname and /dev/shm into
  // containers only if they exist on the host; they live in the share the guest sees.
  std::string share = RunDir(id) + "/share";
  std::error_code ec;
  fs::create_directories(share + "/shm", ec);
  if (ec) return Error::Errno("mkdir " + share, ec.value());
  for (const char* f : {"hosts", "resolv.conf", "hostname"}) {
    std::string path = share + "/" + f;
    if (!fs::exists(path)) std::ofstream(path).flush();
  }
  return Ok();
}

Result<void> PodManager::Recover() {
  PP_TRY(store_.Init());
  PP_ASSIGN_OR_RETURN(auto records, store_.LoadAll());
  PP_ASSIGN_OR_RETURN(auto running, backend_->List());
  std::map<std::string, VmInfo> live;
  for (auto& vm : running) live[vm.name] = vm;
  std::set<std::string> known;
  for (auto& rec : records) {
    auto pod = std::make_unique<Pod>();
    pod->rec = rec;
    known.insert(rec.domain);
    bool alive = live.count(rec.domain) > 0;
    if (rec.phase == Phase::kRunning && alive) {
      if (live[rec.domain].pid) pod->rec.pid = live[rec.domain].pid;
      if (auto r = AttachChannel(*pod); !r.ok()) {
        spdlog::error("pod {}: cannot reattach its agent channel: {}", rec.id,
                      r.error().ToString());
      } else {
        spdlog::info("pod {}: re-adopted running VM {} (pid {})", rec.id, rec.domain, pod->rec.pid);
      }
    } else if (rec.phase == Phase::kRunning || rec.phase == Phase::kStarting) {
      // It died (or never finished starting) while we were away.
      if (alive) (void)backend_->Destroy(rec.domain);
      pod->rec.phase = rec.phase == Phase::kStarting ? Phase::kCreated : Phase::kStopped;
      if (pod->rec.phase == Phase::kStopped) {
        pod->rec.exited_at_ns = NowNs();
        pod->rec.exit_status = 255;
      }
      (void)Save(*pod);
      spdlog::warn("pod {}: its VM is gone; now {}", rec.id, PhaseName(pod->rec.phase));
    }
    pods_[rec.id] = std::move(pod);
  }
  for (auto& [name, vm] : live) {
    if (!known.count(name)) {
      spdlog::warn("recover: destroying VM {} that has no pod record", name);
      (void)backend_->Destroy(name);
    }
  }
  return Ok();
}

Result<void> PodManager::AttachChannel(Pod& pod) {
  std::string dir = RunDir(pod.rec.id);
  PP_ASSIGN_OR_RETURN(auto upstream, ConnectUnix(dir + "/vm-agent.sock"));
  PP_TRY(SetNonBlocking(upstream.get()));
  auto mux = std::make_unique<AgentMux>(loop_);
  PP_TRY(mux->AttachUpstream(std::move(upstream)));
  PP_ASSIGN_OR_RETURN(auto listener, ListenUnix(AgentSocket(pod.rec.id)));
  ::chmod(AgentSocket(pod.rec.id).c_str(), 0600);  // root only: it drives the whole pod
  PP_TRY(mux->ServeListener(std::move(listener)));
  PP_ASSIGN_OR_RETURN(auto pair, SocketPair());
  PP_TRY(SetNonBlocking(pair.first.get()));
  PP_TRY(mux->AddClient(std::move(pair.first)));
  PP_ASSIGN_OR_RETURN(pod.agent, ttrpc::Client::Create(loop_, std::move(pair.second)));
  pod.mux = std::move(mux);
  return Ok();
}

void PodManager::Create(const std::string& id, const std::string& netns, Reply<void> reply) {
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
  if (auto r = PreparePodFiles(id); !r.ok()) {
    std::error_code ec;
    fs::remove_all(RunDir(id), ec);
    return reply(std::move(r).error().Wrap("create sandbox " + id));
  }
  if (auto r = Save(*pod); !r.ok()) {
    std::error_code ec;
    fs::remove_all(RunDir(id), ec);
    (void)store_.Remove(id);
    return reply(std::move(r).error().Wrap("create sandbox " + id));
  }
  spdlog::info("pod {}: created", id);
  pods_[id] = std::move(pod);
  reply(Ok());
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
  if (auto r = Save(*pod); !r.ok()) {
    pod->busy = false;
    pod->rec.phase = Phase::kCreated;
    return reply(r.error());
  }
  VmSpec spec = SpecFor(*pod);
  std::string netns = pod->rec.netns;
  std::weak_ptr<bool> alive = alive_;
  auto deadline = EventLoop::Clock::now() + std::chrono::seconds(cfg_.boot_timeout_seconds);
  workers_.Run([this, alive, spec, id, netns, reply, deadline]() mutable {
    // The pod network first (the domain opens the TAP), then the VM, then the TAP joins the
    // CNI interface. Any failure undoes what was done.
    std::optional<PodNetwork> net;
    Result<VmInfo> vm = Error(Code::kUnknown, "not started");
    if (!netns.empty()) {
      auto n = PrepareTap(id, netns);
      if (!n.ok()) {
        vm = std::move(n).error().Wrap("pod network");
      } else {
        net = std::move(*n);
        spec.tap = net->tap;
        spec.mac = net->mac;
      }
    }
    if (netns.empty() || net) vm = backend_->Start(spec);
    if (vm.ok() && net) {
      if (auto a = AttachTap(*net); !a.ok()) {
        (void)backend_->Destroy(spec.name);
        vm = std::move(a).error().Wrap("pod network");
      }
    }
    if (!vm.ok() && net) RemoveTap(net->tap, netns);
    loop_->Post(
        [this, alive, vm = std::move(vm), net = std::move(net), id, reply, deadline]() mutable {
          if (alive.expired()) return;
          Pod* pod = Find(id);
          if (!pod) return reply(UnknownPod(id));
          // The worker already undid its own steps when the VM did not start.
          if (!vm.ok()) return FailStart(id, vm.error(), /*vm_started=*/false, reply);
          pod->rec.pid = vm->pid;
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
  p->net.reset();
  p->busy = false;
  p->rec.phase = Phase::kCreated;
  p->rec.pid = 0;
  p->mux.reset();
  p->agent.reset();
  (void)Save(*p);
  if (vm_started) {
    workers_.Run([this, domain, id, netns] {
      (void)backend_->Destroy(domain);
      if (!netns.empty()) RemoveTap(TapName(id), netns);
    });
  }
  reply(std::move(e).Wrap("start sandbox " + id));
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
  ttrpc::CallOptions opts;
  opts.timeout = 1s;
  std::weak_ptr<bool> alive = alive_;
  pod->agent->Call(
      kAgentService, "Check", v1::CheckRequest().SerializeAsString(), opts,
      [this, alive, id, deadline, reply, fail](Result<std::string> r) {
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
        v1::CreateSandboxRequest sb;
        sb.set_sandbox_id(id);
        sb.set_hostname(id.substr(0, 63));
        ttrpc::CallOptions o;
        o.timeout = 30s;
        if (pod->net) {
          // Addresses and routes first: containers must find the pod network up.
          v1::ConfigureNetworkRequest net = pod->net->guest;
          pod->net.reset();
          pod->agent->Call(kAgentService, "ConfigureNetwork", net.SerializeAsString(), o,
                           [this, alive, id, deadline, reply, fail](Result<std::string> r) {
                             if (alive.expired()) return;
                             if (!r.ok()) {
                               return fail(std::move(r).error().Wrap("configure guest network"));
                             }
                             WaitForAgent(id, deadline, reply);  // Check again, then set up
                           });
          return;
        }
        pod->agent->Call(kAgentService, "CreateSandbox", sb.SerializeAsString(), o,
                         [this, alive, id, reply, fail](Result<std::string> r) {
                           if (alive.expired()) return;
                           Pod* pod = Find(id);
                           if (!pod) return reply(UnknownPod(id));
                           if (!r.ok()) return fail(std::move(r).error().Wrap("set up guest"));
                           pod->busy = false;
                           pod->rec.phase = Phase::kRunning;
                           (void)Save(*pod);
                           spdlog::info("pod {}: ready (QEMU pid {})", id, pod->rec.pid);
                           reply(StatusOf(*pod));
                         });
      });
}

void PodManager::MarkStopped(Pod& pod, uint32_t status) {
  if (pod.rec.phase == Phase::kStopped) return;
  pod.rec.phase = Phase::kStopped;
  pod.rec.exit_status = status;
  pod.rec.exited_at_ns = NowNs();
  pod.agent.reset();
  pod.mux.reset();
  std::error_code ec;
  fs::remove(AgentSocket(pod.rec.id), ec);
  (void)Save(pod);
  spdlog::info("pod {}: stopped (status {})", pod.rec.id, status);
  auto waiters = std::move(pod.waiters);
  pod.waiters.clear();
  for (auto& w : waiters) w(PodExit{pod.rec.exit_status, pod.rec.exited_at_ns});
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
  ttrpc::CallOptions opts;
  opts.timeout = std::chrono::seconds(grace + 5);
  pod->agent->Call(kAgentService, "DestroySandbox", req.SerializeAsString(), opts,
                   [destroy](Result<std::string> r) {
                     // Powered off or not, make sure the domain is gone (and wait for it).
                     destroy(r.ok() ? "" : r.error().ToString());
                   });
}

void PodManager::Wait(const std::string& id, Reply<PodExit> reply) {
  Pod* pod = Find(id);
  if (!pod) return reply(UnknownPod(id));
  if (pod->rec.phase == Phase::kStopped) {
    return reply(PodExit{pod->rec.exit_status, pod->rec.exited_at_ns});
  }
  pod->waiters.push_back(std::move(reply));
}

PodStatus PodManager::StatusOf(const Pod& pod) const {
  PodStatus s;
  s.id = pod.rec.id;
  s.ready = pod.rec.phase == Phase::kRunning;
  s.pid = pod.rec.pid;
  s.created_at_ns = pod.rec.created_at_ns;
  s.exited_at_ns = pod.rec.exited_at_ns;
  s.address = "unix://" + AgentSocket(pod.rec.id);
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
    if (!pod->rec.netns.empty()) RemoveTap(TapName(id), pod->rec.netns);
    std::error_code ec;
    fs::remove_all(RunDir(id), ec);
    if (auto s = store_.Remove(id); !s.ok()) return reply(s.error());
    pods_.erase(id);
    spdlog::info("pod {}: shut down and removed", id);
    reply(Ok());
  });
}

}  // namespace peapod::sandboxer
