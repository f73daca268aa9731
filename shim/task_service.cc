#include "shim/task_service.h"

#include <fcntl.h>
#include <unistd.h>

#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <future>
#include <mutex>
#include <optional>
#include <sstream>
#include <thread>

#include <google/protobuf/empty.pb.h>
#include <google/protobuf/util/time_util.h>
#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

#include "common/base/files.h"
#include "common/base/ids.h"
#include "containerd/events/task.pb.h"
#include "containerd/runtime/task/v2/shim.pb.h"
#include "peapod/agent/v1/agent.pb.h"
#include "peapod/sandboxer/v1/sandboxer.pb.h"
#include "shim/agent_link.h"
#include "shim/dial.h"
#include "shim/pacing.h"
#include "shim/volumes.h"

namespace peapod::shim {

namespace fs = std::filesystem;
namespace task = containerd::task::v2;
namespace ev = containerd::events;
namespace av1 = peapod::agent::v1;
namespace sb = peapod::sandboxer::v1;
using google::protobuf::Empty;
using google::protobuf::util::TimeUtil;
using Json = nlohmann::json;
using namespace std::chrono_literals;

constexpr char kAgent[] = "peapod.agent.v1.Agent";
constexpr char kSandboxer[] = "peapod.sandboxer.v1.Sandboxer";
constexpr char kTask[] = "containerd.task.v2.Task";
// At most one /tasks/oom per container per this interval.
constexpr auto kOomEventInterval = 1s;
// GetPod is a lookup: an answer slower than this means the connection is stuck, not busy.
constexpr auto kLocateTimeout = 10s;

Result<PodRole> RoleFromSpec(const std::string& id, const std::string& config_json) {
  Json spec;
  try {
    spec = Json::parse(config_json);
  } catch (const std::exception& e) {
    return Error::Invalid("config.json of container {} is not valid JSON: {}", id, e.what());
  }
  if (!spec.is_object()) return Error::Invalid("config.json of container {} is not an object", id);
  PodRole role;
  role.pod_id = id;
  auto ann = spec.value("annotations", Json::object());
  auto get = [&](const char* key) -> std::string {
    auto it = ann.find(key);
    return it != ann.end() && it->is_string() ? it->get<std::string>() : "";
  };
  // containerd's CRI marks each container: "sandbox" for the pause container, "container" for
  // the others, which name their pod with sandbox-id.
  std::string type = get("io.kubernetes.cri.container-type");
  std::string sandbox = get("io.kubernetes.cri.sandbox-id");
  if (type == "sandbox") {
    role.kind = PodRole::kPause;
  } else if (!sandbox.empty() && sandbox != id) {
    role.kind = PodRole::kMember;
    role.pod_id = sandbox;
  }
  role.hostname = spec.value("hostname", "");
  if (spec.contains("linux") && spec["linux"].contains("namespaces")) {
    for (const auto& ns : spec["linux"]["namespaces"]) {
      if (ns.value("type", "") == "network") role.netns = ns.value("path", "");
    }
  }
  return role;
}

namespace {

// Where a stdio stream of containerd's goes: a FIFO path, a file:// URI, or nothing.
Result<UniqueFd> OpenOutput(const std::string& target) {
  if (target.empty()) return UniqueFd();
  std::string path = target;
  // A FIFO is opened read-write, as runc's shim keeps a reader of its own: while containerd
  // restarts there is no other reader, and a write-only end would fail with EPIPE and lose
  // the output. With ours, output waits in the pipe (and the pump blocks when it is full)
  // until containerd opens the FIFO again. We never read from it.
  int flags = O_RDWR | O_CLOEXEC;
  if (target.rfind("file://", 0) == 0) {
    path = target.substr(7);
    flags = O_WRONLY | O_CLOEXEC | O_CREAT | O_APPEND;
  } else if (target.find("://") != std::string::npos) {
    return Error::Make(Code::kUnimplemented,
                       "stdio target {} is not supported by peapod (use a FIFO or file://)",
                       target);
  }
  UniqueFd fd(::open(path.c_str(), flags, 0640));
  if (!fd) return Error::Errno("open " + path);
  return fd;
}

google::protobuf::Timestamp Now() { return TimeUtil::GetCurrentTime(); }

// Runtime options containerd passes from the runtime's `options` table. peapod has none of its
// own; runc's (which containerd's CRI sends by default) are accepted and have nothing to do in a
// VM. Anything else is a configuration mistake worth saying out loud.
Result<void> CheckRuntimeOptions(const google::protobuf::Any& options) {
  std::string_view type = options.type_url();
  if (type.empty()) return Ok();
  if (auto slash = type.rfind('/'); slash != std::string_view::npos) type.remove_prefix(slash + 1);
  if (type == "containerd.runc.v1.Options") return Ok();
  return Error::Invalid(
      "runtime options of type {} are not understood by peapod: remove the runtime's options "
      "table for io.containerd.peapod.v2 from containerd's config",
      options.type_url());
}

}  // namespace

// One process: the container's init (exec_id empty) or an exec.
struct TaskService::Process {
  std::string exec_id;
  std::string stdin_path, stdout_path, stderr_path;
  bool terminal = false;
  uint32_t pid = 0;
  enum class State { kCreated, kRunning, kPaused, kStopped } state = State::kCreated;
  uint32_t exit_status = 0;
  google::protobuf::Timestamp exited_at;
  std::vector<ttrpc::TypedResponder<task::WaitResponse>> waiters;  // loop thread only
  std::string process_json;  // an exec's OCI process, until it starts
  // Our own writer on the stdin FIFO: the pump sees EOF only once containerd's CloseIO (or the
  // exit) drops it, after containerd's writer is gone, so nothing still in the FIFO is lost.
  std::mutex stdin_mu;
  UniqueFd stdin_keep;
  bool stdin_closed = false;
  void DropStdinWriter() {
    std::lock_guard<std::mutex> l(stdin_mu);
    stdin_closed = true;
    stdin_keep.Reset();
  }
};

struct TaskService::Impl {
  EventLoop* loop;
  ShimOptions opts;
  EventPublisher* events;
  PodRole role;
  std::string bundle_rootfs;
  std::unique_ptr<AgentLink> agent;          // the pod's agent, through the sandboxer's mux
  std::shared_ptr<ttrpc::Client> sandboxer;  // peapod.sandboxer.v1
  uint32_t vm_pid = 0;
  bool created = false;
  bool deleted = false;
  std::map<std::string, std::shared_ptr<Process>> procs;  // "" is init; loop thread only
  std::mutex threads_mu;
  std::vector<std::thread> threads;
  std::mutex clients_mu;

  // Runs work on a thread of its own; its answer is delivered on the loop.
  template <typename T>
  void Async(std::function<Result<T>()> work, std::function<void(Result<T>)> done) {
    std::lock_guard<std::mutex> l(threads_mu);
    threads.emplace_back([this, work = std::move(work), done = std::move(done)]() mutable {
      auto r = std::make_shared<Result<T>>(work());
      loop->Post([done = std::move(done), r]() mutable { done(std::move(*r)); });
    });
  }

  // A call the agent must take once (sent on a live connection, redialled first if needed).
  template <typename Resp>
  Result<Resp> CallAgent(const std::string& method, const google::protobuf::Message& req,
                         std::chrono::nanoseconds timeout = 60s) {
    if (!agent) return Error(Code::kFailedPrecondition, "not connected to the pod's agent");
    return agent->Once<Resp>(method, req, timeout);
  }
  // A call the agent can take twice (waits; stdio at an offset): re-sent across a sandboxer
  // restart until answered or the pod is gone.
  template <typename Resp>
  Result<Resp> AwaitAgent(const std::string& method, const google::protobuf::Message& req) {
    if (!agent) return Error(Code::kFailedPrecondition, "not connected to the pod's agent");
    return agent->Retrying<Resp>(method, req);
  }
  // timeout: a cold pod boots under TCG in seconds; mkfs of a big layer takes longer. A call
  // that misses it drops the connection, so the next call dials again: a connection the
  // sandboxer no longer answers on must not hold every later call for minutes.
  template <typename Resp>
  Result<Resp> CallSandboxer(const std::string& method, const google::protobuf::Message& req,
                             std::chrono::nanoseconds timeout = 300s) {
    std::shared_ptr<ttrpc::Client> c;
    {
      std::lock_guard<std::mutex> l(clients_mu);
      if (!sandboxer || sandboxer->closed()) {  // never dialled, or the sandboxer restarted
        auto dialed = Dial(loop, opts.sandboxer);
        if (!dialed.ok()) {
          return std::move(dialed).error().Wrap("connect to peapod-sandboxer at " + opts.sandboxer +
                                                " (is it running?)");
        }
        if (sandboxer) loop->Post([old = std::move(sandboxer)]() mutable { old.reset(); });
        sandboxer = *dialed;
      }
      c = sandboxer;
    }
    ttrpc::CallOptions o;
    o.timeout = timeout;
    auto r = c->CallSyncTyped<Resp>(kSandboxer, method, req, o);
    if (!r.ok() && r.error().code() == Code::kDeadlineExceeded) {
      spdlog::warn("shim: {}: peapod-sandboxer did not answer {} in time; dialling again", opts.id,
                   method);
      std::lock_guard<std::mutex> l(clients_mu);
      if (sandboxer == c) loop->Post([old = std::move(sandboxer)]() mutable { old.reset(); });
    }
    loop->Post([c = std::move(c)]() mutable { c.reset(); });  // clients go on their loop
    return r;
  }

  // Where the pod's agent socket is, for AgentLink: gone once the sandboxer says so.
  Result<std::string> LocateAgent() {
    sb::GetPodRequest g;
    g.set_pod_id(role.pod_id);
    auto pod = CallSandboxer<sb::PodInfo>("GetPod", g, kLocateTimeout);
    if (!pod.ok()) {
      if (pod.error().code() == Code::kNotFound) return std::move(pod).error();
      return Error(Code::kUnavailable, pod.error().message());  // the sandboxer is away
    }
    if (!pod->ready()) {
      return Error::Make(Code::kFailedPrecondition, "pod {} is not ready (its VM is not running)",
                         role.pod_id);
    }
    return pod->agent_address();
  }

  Result<std::shared_ptr<Process>> Find(const std::string& exec_id) {
    auto it = procs.find(exec_id);
    if (it == procs.end()) {
      return exec_id.empty() ? Error::NotFound("container {} has no task", opts.id)
                             : Error::NotFound("exec {} not found in {}", exec_id, opts.id);
    }
    return it->second;
  }

  // Pumps one output stream of a process from the agent to containerd, until EOF. An answer
  // with no data and no EOF is legal but useless; in a row, they are waited out (the agent is
  // the guest's: it must not make this thread spin).
  void PumpOutput(std::shared_ptr<Process> p, bool err, UniqueFd out) {
    av1::ReadStreamRequest req;
    req.set_container_id(opts.id);
    req.set_exec_id(p->exec_id);
    req.set_max_bytes(1 << 20);
    EmptyAnswerBackoff backoff;
    uint64_t offset = 0;  // what we have: the agent keeps the rest until we say so
    for (;;) {
      req.set_offset(offset);
      auto r = AwaitAgent<av1::ReadStreamResponse>(err ? "ReadStderr" : "ReadStdout", req);
      if (!r.ok()) {
        spdlog::warn("shim: {} {} stream ends: {}", opts.id, err ? "stderr" : "stdout",
                     r.error().ToString());
        return;
      }
      offset += r->data().size();
      if (out && !r->data().empty()) {
        if (!WriteAll(out.get(), r->data().data(), r->data().size()).ok()) out.Reset();
      }
      if (r->eof()) return;
      if (auto wait = backoff.Next(r->data().empty()); wait.count() > 0) {
        std::this_thread::sleep_for(wait);
      }
    }
  }

  // Pumps containerd's stdin FIFO into the process until EOF, then closes the process's stdin.
  // containerd's contract (runc's shim keeps a writer too): CloseIO, not the end of containerd's
  // own writer, ends stdin, and everything written to the FIFO before it reaches the process.
  // Closing the process's stdin at CloseIO lost what was still in the FIFO (up to 64 KiB).
  void PumpInput(std::shared_ptr<Process> p) {
    // O_RDWR never blocks on a FIFO; with a writer held, the reader's open does not either.
    UniqueFd keep(::open(p->stdin_path.c_str(), O_RDWR | O_CLOEXEC));
    if (!keep) {
      spdlog::warn("shim: {}: open stdin {}: {}", opts.id, p->stdin_path, std::strerror(errno));
      return;
    }
    UniqueFd in(::open(p->stdin_path.c_str(), O_RDONLY | O_CLOEXEC));
    if (!in) return;
    {
      std::lock_guard<std::mutex> l(p->stdin_mu);
      if (!p->stdin_closed) p->stdin_keep = std::move(keep);
    }
    keep.Reset();
    char buf[32768];
    uint64_t offset = 0;  // a write re-sent after a lost answer is taken once
    for (;;) {
      ssize_t n = ::read(in.get(), buf, sizeof buf);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) break;
      av1::WriteStreamRequest w;
      w.set_container_id(opts.id);
      w.set_exec_id(p->exec_id);
      w.set_data(buf, static_cast<size_t>(n));
      w.set_offset(offset);
      if (!AwaitAgent<av1::WriteStreamResponse>("WriteStdin", w).ok()) return;
      offset += static_cast<uint64_t>(n);
    }
    av1::ProcessRequest c;
    c.set_container_id(opts.id);
    c.set_exec_id(p->exec_id);
    (void)AwaitAgent<Empty>("CloseStdin", c);
  }

  // Starts the stdio pumps and the exit watcher of a started process. The exit is reported
  // once its output is copied (or 2 s after the exit, if something keeps the streams open).
  Result<void> StartIo(const std::shared_ptr<Process>& p) {
    PP_ASSIGN_OR_RETURN(auto out, OpenOutput(p->stdout_path));
    UniqueFd errfd;
    if (!p->terminal) {
      PP_ASSIGN_OR_RETURN(errfd, OpenOutput(p->stderr_path));
    }
    auto done = std::make_shared<std::pair<std::mutex, std::condition_variable>>();
    auto pending = std::make_shared<int>(p->terminal ? 1 : 2);
    auto finish_one = [done, pending] {
      std::lock_guard<std::mutex> l(done->first);
      --*pending;
      done->second.notify_all();
    };
    auto out_fd = std::make_shared<UniqueFd>(std::move(out));
    auto err_fd = std::make_shared<UniqueFd>(std::move(errfd));
    std::lock_guard<std::mutex> l(threads_mu);
    threads.emplace_back([this, p, out_fd, finish_one] {
      PumpOutput(p, false, std::move(*out_fd));
      finish_one();
    });
    if (!p->terminal) {
      threads.emplace_back([this, p, err_fd, finish_one] {
        PumpOutput(p, true, std::move(*err_fd));
        finish_one();
      });
    }
    if (!p->stdin_path.empty()) threads.emplace_back([this, p] { PumpInput(p); });
    threads.emplace_back([this, p, done, pending] {
      av1::WaitProcessRequest w;
      w.set_container_id(opts.id);
      w.set_exec_id(p->exec_id);
      auto r = AwaitAgent<av1::WaitProcessResponse>("WaitProcess", w);
      {
        std::unique_lock<std::mutex> l(done->first);
        done->second.wait_for(l, 2s, [&] { return *pending == 0; });
      }
      uint32_t status = r.ok() ? r->exit_status() : 255;
      auto at = r.ok() && r->has_exited_at() ? r->exited_at() : Now();
      if (!r.ok()) spdlog::warn("shim: wait for {}: {}", opts.id, r.error().ToString());
      loop->Post([this, p, status, at] { Exited(p, status, at); });
    });
    return Ok();
  }

  // Publishes /tasks/oom for OOM kills in this container (CRI learns of OOM only this way),
  // until the agent connection ends. The agent is the guest's and may answer in a loop: at
  // most one event per kOomEventInterval is published, the others are counted, and while they
  // come faster the next one is not asked for before the interval is over.
  void WatchOOM() {
    std::lock_guard<std::mutex> l(threads_mu);
    threads.emplace_back([this] {
      av1::GetOOMEventRequest r;
      r.set_container_id(opts.id);
      EventCoalescer coalescer(kOomEventInterval);
      std::optional<EventCoalescer::Clock::time_point> last_report;  // of coalesced events
      uint64_t reported = 0;
      for (;;) {
        auto oom = AwaitAgent<av1::OOMEvent>("GetOOMEvent", r);
        if (!oom.ok()) return;
        auto now = EventCoalescer::Clock::now();
        auto d = coalescer.Offer(now);
        if (!d.publish) {
          if (!last_report || now - *last_report >= 60s) {
            spdlog::warn(
                "shim: {}: {} OOM events came within {} ms of another and were not "
                "published (CRI needs only one)",
                opts.id, coalescer.coalesced() - reported,
                std::chrono::duration_cast<std::chrono::milliseconds>(kOomEventInterval).count());
            reported = coalescer.coalesced();
            last_report = now;
          }
          std::this_thread::sleep_for(d.wait);
          continue;
        }
        loop->Post([this] {
          ev::TaskOOM e;
          e.set_container_id(opts.id);
          events->Publish("/tasks/oom", e);
        });
      }
    });
  }

  void Exited(const std::shared_ptr<Process>& p, uint32_t status,
              const google::protobuf::Timestamp& at) {
    if (p->state == Process::State::kStopped) return;
    p->state = Process::State::kStopped;
    p->DropStdinWriter();  // its stdin pump ends when containerd's writer goes
    p->exit_status = status;
    p->exited_at = at;
    ev::TaskExit e;
    e.set_container_id(opts.id);
    e.set_id(p->exec_id.empty() ? opts.id : p->exec_id);
    e.set_pid(p->pid);
    e.set_exit_status(status);
    *e.mutable_exited_at() = at;
    events->Publish("/tasks/exit", e);
    task::WaitResponse w;
    w.set_exit_status(status);
    *w.mutable_exited_at() = at;
    for (auto& reply : p->waiters) reply(w);
    p->waiters.clear();
  }

  // --- Create ---------------------------------------------------------------------------
  Result<uint32_t> CreateWork(const task::CreateTaskRequest& req) {
    PP_ASSIGN_OR_RETURN(std::string config, ReadFile(opts.bundle + "/config.json"));
    PP_ASSIGN_OR_RETURN(role, RoleFromSpec(opts.id, config));
    PP_TRY(CheckRuntimeOptions(req.options()));
    // The pod: created by us for a pause container (classic CRI) or a plain container; found
    // for the others (created by the sandbox controller, or by the pause container's shim).
    sb::PodInfo pod;
    if (role.kind == PodRole::kMember) {
      sb::GetPodRequest g;
      g.set_pod_id(role.pod_id);
      auto got = CallSandboxer<sb::PodInfo>("GetPod", g);
      if (!got.ok()) {
        return std::move(got).error().Wrap("container " + opts.id + " names pod " + role.pod_id +
                                           ", which peapod-sandboxer does not run");
      }
      pod = *got;
    } else {
      sb::CreatePodRequest c;
      c.set_pod_id(role.pod_id);
      c.set_origin(role.kind == PodRole::kPause ? sb::CreatePodRequest::CLASSIC_CRI
                                                : sb::CreatePodRequest::PLAIN);
      c.set_netns_path(role.netns);
      c.set_hostname(role.hostname);
      c.set_namespace_(opts.ns);
      PP_ASSIGN_OR_RETURN(pod, CallSandboxer<sb::PodInfo>("CreatePod", c));
    }
    vm_pid = pod.pid();
    agent = std::make_unique<AgentLink>(loop, [this] { return LocateAgent(); });
    if (role.kind == PodRole::kPause) return vm_pid;  // the pause process costs nothing

    // Rootfs: containerd's snapshot mounts become layer disks.
    sb::AttachRootfsRequest a;
    a.set_pod_id(role.pod_id);
    a.set_container_id(opts.id);
    *a.mutable_mounts() = req.rootfs();
    PP_ASSIGN_OR_RETURN(auto rootfs, CallSandboxer<sb::AttachRootfsResponse>("AttachRootfs", a));

    // Bind mounts of host paths (volumes, the pod's hosts/resolv.conf/hostname/shm) go
    // through the pod share: their sources become guest paths.
    Json spec = Json::parse(config);
    std::vector<size_t> binds;
    sb::ShareVolumesRequest sv;
    sv.set_pod_id(role.pod_id);
    sv.set_container_id(opts.id);
    if (spec.contains("mounts")) {
      for (size_t i = 0; i < spec["mounts"].size(); ++i) {
        const auto& m = spec["mounts"][i];
        auto options = m.value("options", std::vector<std::string>{});
        auto has = [&](const char* o) {
          return std::find(options.begin(), options.end(), o) != options.end();
        };
        bool bind = m.value("type", "") == "bind" || has("bind") || has("rbind");
        std::string src = m.value("source", "");
        if (!bind || src.empty() || src[0] != '/' || !fs::exists(src)) continue;
        auto* v = sv.add_volumes();
        v->set_host_path(src);
        v->set_readonly(has("ro") || has("rro"));
        v->set_recursive_readonly(has("rro"));
        v->set_propagate_from_host(has("rslave") || has("rshared") || has("slave") ||
                                   has("shared"));
        binds.push_back(i);
      }
    }
    if (!binds.empty()) {
      PP_ASSIGN_OR_RETURN(auto shared, CallSandboxer<sb::ShareVolumesResponse>("ShareVolumes", sv));
      std::vector<SharedBind> shared_binds;
      for (size_t k = 0; k < binds.size() && k < static_cast<size_t>(shared.guest_paths_size());
           ++k) {
        const int ik = static_cast<int>(k);
        spec["mounts"][binds[k]]["source"] = shared.guest_paths(ik);
        if (ik < shared.submounts_size()) shared_binds.push_back({binds[k], shared.submounts(ik)});
      }
      spec["mounts"] = WithSubmounts(spec["mounts"], shared_binds);
    }

    av1::CreateContainerRequest c;
    c.set_container_id(opts.id);
    c.set_oci_spec(spec.dump());
    *c.mutable_layers() = rootfs.layers();
    c.set_upper_dir(rootfs.upper_dir());
    c.set_stdin(!req.stdin().empty());
    c.set_terminal(req.terminal());
    auto created_in_guest = CallAgent<av1::CreateContainerResponse>("CreateContainer", c, 120s);
    if (!created_in_guest.ok()) {
      ReleaseFromPod();
      return std::move(created_in_guest).error();
    }
    return created_in_guest->pid();
  }

  // Gives back what the container held in its pod; removes the pod if the container owns it.
  void ReleaseFromPod() {
    if (role.kind != PodRole::kPause) {
      sb::ReleaseContainerRequest r;
      r.set_pod_id(role.pod_id);
      r.set_container_id(opts.id);
      if (auto x = CallSandboxer<Empty>("ReleaseContainer", r); !x.ok()) {
        spdlog::warn("shim: release {}: {}", opts.id, x.error().ToString());
      }
    }
    if (role.kind != PodRole::kMember) {
      sb::RemovePodRequest r;
      r.set_pod_id(role.pod_id);
      if (auto x = CallSandboxer<Empty>("RemovePod", r); !x.ok()) {
        spdlog::warn("shim: remove pod {}: {}", role.pod_id, x.error().ToString());
      }
    }
  }
};

TaskService::TaskService(EventLoop* loop, ShimOptions opts, EventPublisher* events)
    : impl_(std::make_unique<Impl>()) {
  impl_->loop = loop;
  impl_->opts = std::move(opts);
  impl_->events = events;
}

TaskService::~TaskService() {
  std::lock_guard<std::mutex> l(impl_->threads_mu);
  for (auto& t : impl_->threads) t.detach();  // the process is exiting
}

namespace {

template <typename Req, typename Resp, typename Fn>
void Reg(ttrpc::Server& s, const std::string& method, Fn fn) {
  ttrpc::RegisterTyped<Req, Resp>(s, kTask, method,
                                  [fn = std::move(fn)](const ttrpc::CallContext&, Req&& req,
                                                       ttrpc::TypedResponder<Resp> reply) {
                                    fn(std::move(req), std::move(reply));
                                  });
}

template <typename Resp>
std::function<void(Result<Resp>)> Fwd(ttrpc::TypedResponder<Resp> reply) {
  return [reply](Result<Resp> r) { reply(std::move(r)); };
}

}  // namespace

void TaskService::Register(ttrpc::Server& server) {
  Impl* d = impl_.get();
  using P = Process;

  Reg<task::CreateTaskRequest, task::CreateTaskResponse>(
      server, "Create", [d](task::CreateTaskRequest req, auto reply) {
        if (req.id() != d->opts.id) {
          return reply(
              Error::Invalid("this shim serves container {}, not {}", d->opts.id, req.id()));
        }
        if (!req.checkpoint().empty()) {
          return reply(Error::Make(Code::kUnimplemented, "peapod cannot restore checkpoints"));
        }
        if (d->created) return reply(Error::Make(Code::kAlreadyExists, "task {} exists", req.id()));
        d->created = true;
        auto p = std::make_shared<P>();
        p->stdin_path = req.stdin();
        p->stdout_path = req.stdout();
        p->stderr_path = req.stderr();
        p->terminal = req.terminal();
        d->Async<uint32_t>([d, req] { return d->CreateWork(req); },
                           [d, p, req, reply](Result<uint32_t> pid) {
                             if (!pid.ok()) {
                               d->created = false;
                               spdlog::error("shim: create {}: {}", d->opts.id,
                                             pid.error().ToString());
                               return reply(std::move(pid).error().Wrap("create " + d->opts.id));
                             }
                             p->pid = *pid;
                             d->procs[""] = p;
                             ev::TaskCreate e;
                             e.set_container_id(d->opts.id);
                             e.set_bundle(d->opts.bundle);
                             *e.mutable_rootfs() = req.rootfs();
                             e.mutable_io()->set_stdin(req.stdin());
                             e.mutable_io()->set_stdout(req.stdout());
                             e.mutable_io()->set_stderr(req.stderr());
                             e.mutable_io()->set_terminal(req.terminal());
                             e.set_pid(*pid);
                             d->events->Publish("/tasks/create", e);
                             task::CreateTaskResponse resp;
                             resp.set_pid(*pid);
                             reply(resp);
                           });
      });

  Reg<task::StartRequest, task::StartResponse>(
      server, "Start", [d](task::StartRequest req, auto reply) {
        auto p = d->Find(req.exec_id());
        if (!p.ok()) return reply(p.error());
        auto proc = *p;
        if (proc->state != P::State::kCreated) {
          return reply(Error::Make(Code::kFailedPrecondition, "{} already started",
                                   req.exec_id().empty() ? d->opts.id : req.exec_id()));
        }
        if (d->role.kind == PodRole::kPause) {
          proc->state = P::State::kRunning;
          ev::TaskStart e;
          e.set_container_id(d->opts.id);
          e.set_pid(proc->pid);
          d->events->Publish("/tasks/start", e);
          task::StartResponse resp;
          resp.set_pid(proc->pid);
          return reply(resp);
        }
        d->Async<uint32_t>(
            [d, proc]() -> Result<uint32_t> {
              if (proc->exec_id.empty()) {
                av1::StartContainerRequest s;
                s.set_container_id(d->opts.id);
                PP_ASSIGN_OR_RETURN(auto r,
                                    d->CallAgent<av1::StartContainerResponse>("StartContainer", s));
                return r.pid();
              }
              av1::ExecProcessRequest e;
              e.set_container_id(d->opts.id);
              e.set_exec_id(proc->exec_id);
              e.set_process(proc->process_json);
              e.set_stdin(!proc->stdin_path.empty());
              e.set_terminal(proc->terminal);
              PP_ASSIGN_OR_RETURN(auto r, d->CallAgent<av1::ExecProcessResponse>("ExecProcess", e));
              return r.pid();
            },
            [d, proc, reply](Result<uint32_t> pid) {
              if (!pid.ok()) return reply(std::move(pid).error());
              proc->pid = *pid;
              proc->state = P::State::kRunning;
              if (auto io = d->StartIo(proc); !io.ok()) {
                spdlog::error("shim: stdio of {}: {}", d->opts.id, io.error().ToString());
              }
              if (proc->exec_id.empty()) {
                ev::TaskStart e;
                e.set_container_id(d->opts.id);
                e.set_pid(*pid);
                d->events->Publish("/tasks/start", e);
                d->WatchOOM();
              } else {
                ev::TaskExecStarted e;
                e.set_container_id(d->opts.id);
                e.set_exec_id(proc->exec_id);
                e.set_pid(*pid);
                d->events->Publish("/tasks/exec-started", e);
              }
              task::StartResponse resp;
              resp.set_pid(*pid);
              reply(resp);
            });
      });

  Reg<task::WaitRequest, task::WaitResponse>(server, "Wait",
                                             [d](task::WaitRequest req, auto reply) {
                                               auto p = d->Find(req.exec_id());
                                               if (!p.ok()) return reply(p.error());
                                               if ((*p)->state == P::State::kStopped) {
                                                 task::WaitResponse w;
                                                 w.set_exit_status((*p)->exit_status);
                                                 *w.mutable_exited_at() = (*p)->exited_at;
                                                 return reply(w);
                                               }
                                               (*p)->waiters.push_back(reply);
                                             });

  Reg<task::KillRequest, Empty>(server, "Kill", [d](task::KillRequest req, auto reply) {
    auto p = d->Find(req.exec_id());
    if (!p.ok()) return reply(p.error());
    auto proc = *p;
    if (d->role.kind == PodRole::kPause) {
      // Stopping the pause container stops the pod.
      d->Async<Empty>(
          [d]() -> Result<Empty> {
            sb::RemovePodRequest r;
            r.set_pod_id(d->role.pod_id);
            PP_TRY(d->CallSandboxer<Empty>("RemovePod", r));
            return Empty();
          },
          [d, proc, reply, sig = req.signal()](Result<Empty> r) {
            if (!r.ok()) return reply(std::move(r).error());
            d->Exited(proc, 128 + sig, Now());
            reply(Empty());
          });
      return;
    }
    if (proc->state == P::State::kStopped) {
      return reply(Error::NotFound("process {} already finished", proc->pid));
    }
    d->Async<Empty>(
        [d, req]() -> Result<Empty> {
          av1::SignalProcessRequest s;
          s.set_container_id(d->opts.id);
          s.set_exec_id(req.exec_id());
          s.set_signal(req.signal());
          s.set_all(req.all());
          return d->CallAgent<Empty>("SignalProcess", s);
        },
        Fwd<Empty>(reply));
  });

  Reg<task::ExecProcessRequest, Empty>(
      server, "Exec", [d](task::ExecProcessRequest req, auto reply) {
        if (!d->procs.count(""))
          return reply(Error::NotFound("container {} has no task", d->opts.id));
        if (!IsValidId(req.exec_id())) {
          return reply(Error::Invalid("exec id '{}' is invalid: use {}", req.exec_id(), kIdRule));
        }
        if (d->procs.count(req.exec_id())) {
          return reply(Error::Make(Code::kAlreadyExists, "exec {} exists", req.exec_id()));
        }
        if (d->role.kind == PodRole::kPause) {
          return reply(Error::Make(Code::kFailedPrecondition,
                                   "{} is a pod's pause container: nothing runs in it",
                                   d->opts.id));
        }
        auto p = std::make_shared<P>();
        p->exec_id = req.exec_id();
        p->stdin_path = req.stdin();
        p->stdout_path = req.stdout();
        p->stderr_path = req.stderr();
        p->terminal = req.terminal();
        p->process_json = req.spec().value();  // containerd sends the OCI Process as JSON
        d->procs[p->exec_id] = p;
        ev::TaskExecAdded e;
        e.set_container_id(d->opts.id);
        e.set_exec_id(p->exec_id);
        d->events->Publish("/tasks/exec-added", e);
        reply(Empty());
      });

  Reg<task::DeleteRequest, task::DeleteResponse>(
      server, "Delete", [d](task::DeleteRequest req, auto reply) {
        auto p = d->Find(req.exec_id());
        if (!p.ok()) return reply(p.error());
        auto proc = *p;
        if (proc->state != P::State::kStopped && proc->state != P::State::kCreated) {
          return reply(Error::Make(Code::kFailedPrecondition, "{} is still running: kill it first",
                                   d->opts.id));
        }
        d->Async<Empty>(
            [d, proc]() -> Result<Empty> {
              if (!proc->exec_id.empty()) {
                av1::DeleteProcessRequest r;
                r.set_container_id(d->opts.id);
                r.set_exec_id(proc->exec_id);
                (void)d->CallAgent<Empty>("DeleteProcess", r);
                return Empty();
              }
              if (d->role.kind != PodRole::kPause) {
                av1::RemoveContainerRequest r;
                r.set_container_id(d->opts.id);
                r.set_force(true);
                if (auto x = d->CallAgent<Empty>("RemoveContainer", r); !x.ok()) {
                  spdlog::warn("shim: remove {} in the guest: {}", d->opts.id,
                               x.error().ToString());
                }
              }
              d->ReleaseFromPod();
              return Empty();
            },
            [d, proc, reply](Result<Empty>) {
              task::DeleteResponse resp;
              resp.set_pid(proc->pid);
              resp.set_exit_status(proc->exit_status);
              *resp.mutable_exited_at() =
                  proc->state == P::State::kStopped ? proc->exited_at : Now();
              d->procs.erase(proc->exec_id);
              if (proc->exec_id.empty()) {
                d->deleted = true;
                ev::TaskDelete e;
                e.set_container_id(d->opts.id);
                e.set_pid(proc->pid);
                e.set_exit_status(proc->exit_status);
                *e.mutable_exited_at() = resp.exited_at();
                e.set_id(d->opts.id);
                d->events->Publish("/tasks/delete", e);
              }
              reply(resp);
            });
      });

  Reg<task::StateRequest, task::StateResponse>(
      server, "State", [d](task::StateRequest req, auto reply) {
        auto p = d->Find(req.exec_id());
        if (!p.ok()) return reply(p.error());
        const auto& proc = **p;
        task::StateResponse s;
        s.set_id(req.exec_id().empty() ? d->opts.id : req.exec_id());
        s.set_exec_id(req.exec_id());
        s.set_bundle(d->opts.bundle);
        s.set_pid(proc.pid);
        using S = containerd::v1::types::Status;
        S st = S::UNKNOWN;
        switch (proc.state) {
          case P::State::kCreated:
            st = S::CREATED;
            break;
          case P::State::kRunning:
            st = S::RUNNING;
            break;
          case P::State::kPaused:
            st = S::PAUSED;
            break;
          case P::State::kStopped:
            st = S::STOPPED;
            break;
        }
        s.set_status(st);
        s.set_stdin(proc.stdin_path);
        s.set_stdout(proc.stdout_path);
        s.set_stderr(proc.stderr_path);
        s.set_terminal(proc.terminal);
        s.set_exit_status(proc.exit_status);
        if (proc.state == P::State::kStopped) *s.mutable_exited_at() = proc.exited_at;
        reply(s);
      });

  auto pause_resume = [d](bool pause, auto reply) {
    auto p = d->Find("");
    if (!p.ok()) return reply(p.error());
    auto proc = *p;
    if (d->role.kind == PodRole::kPause) return reply(Empty());
    d->Async<Empty>(
        [d, pause]() -> Result<Empty> {
          av1::ContainerRequest r;
          r.set_container_id(d->opts.id);
          return d->CallAgent<Empty>(pause ? "PauseContainer" : "ResumeContainer", r);
        },
        [d, proc, pause, reply](Result<Empty> r) {
          if (!r.ok()) return reply(std::move(r).error());
          proc->state = pause ? P::State::kPaused : P::State::kRunning;
          if (pause) {
            ev::TaskPaused e;
            e.set_container_id(d->opts.id);
            d->events->Publish("/tasks/paused", e);
          } else {
            ev::TaskResumed e;
            e.set_container_id(d->opts.id);
            d->events->Publish("/tasks/resumed", e);
          }
          reply(Empty());
        });
  };
  Reg<task::PauseRequest, Empty>(server, "Pause", [pause_resume](task::PauseRequest, auto reply) {
    pause_resume(true, reply);
  });
  Reg<task::ResumeRequest, Empty>(
      server, "Resume",
      [pause_resume](task::ResumeRequest, auto reply) { pause_resume(false, reply); });

  Reg<task::PidsRequest, task::PidsResponse>(server, "Pids", [d](task::PidsRequest, auto reply) {
    if (d->role.kind == PodRole::kPause) {
      task::PidsResponse resp;
      resp.add_processes()->set_pid(d->vm_pid);
      return reply(resp);
    }
    d->Async<task::PidsResponse>(
        [d]() -> Result<task::PidsResponse> {
          av1::ContainerRequest r;
          r.set_container_id(d->opts.id);
          PP_ASSIGN_OR_RETURN(auto l, d->CallAgent<av1::ListProcessesResponse>("ListProcesses", r));
          task::PidsResponse resp;
          for (const auto& p : l.processes()) resp.add_processes()->set_pid(p.pid());
          return resp;
        },
        Fwd<task::PidsResponse>(reply));
  });

  Reg<task::ResizePtyRequest, Empty>(server, "ResizePty",
                                     [d](task::ResizePtyRequest req, auto reply) {
                                       d->Async<Empty>(
                                           [d, req]() -> Result<Empty> {
                                             av1::ResizePtyRequest r;
                                             r.set_container_id(d->opts.id);
                                             r.set_exec_id(req.exec_id());
                                             r.set_width(req.width());
                                             r.set_height(req.height());
                                             return d->CallAgent<Empty>("ResizePty", r);
                                           },
                                           Fwd<Empty>(reply));
                                     });

  Reg<task::CloseIORequest, Empty>(server, "CloseIO", [d](task::CloseIORequest req, auto reply) {
    if (!req.stdin()) return reply(Empty());
    auto p = d->Find(req.exec_id());
    if (!p.ok()) return reply(p.error());
    // The pump drains the FIFO, then closes the process's stdin itself.
    if (!(*p)->stdin_path.empty()) {
      (*p)->DropStdinWriter();
      return reply(Empty());
    }
    d->Async<Empty>(
        [d, req]() -> Result<Empty> {
          av1::ProcessRequest r;
          r.set_container_id(d->opts.id);
          r.set_exec_id(req.exec_id());
          return d->CallAgent<Empty>("CloseStdin", r);
        },
        Fwd<Empty>(reply));
  });

  Reg<task::UpdateTaskRequest, Empty>(
      server, "Update", [d](task::UpdateTaskRequest req, auto reply) {
        d->Async<Empty>(
            [d, req]() -> Result<Empty> {
              av1::UpdateContainerRequest r;
              r.set_container_id(d->opts.id);
              r.set_resources(req.resources().value());  // containerd sends LinuxResources JSON
              return d->CallAgent<Empty>("UpdateContainer", r);
            },
            Fwd<Empty>(reply));
      });

  Reg<task::StatsRequest, task::StatsResponse>(
      server, "Stats", [d](task::StatsRequest, auto reply) {
        d->Async<task::StatsResponse>(
            [d]() -> Result<task::StatsResponse> {
              av1::ContainerRequest r;
              // The pause container's stats are the pod's.
              if (d->role.kind != PodRole::kPause) r.set_container_id(d->opts.id);
              PP_ASSIGN_OR_RETURN(auto s,
                                  d->CallAgent<av1::StatsContainerResponse>("StatsContainer", r));
              task::StatsResponse resp;
              // Named as containerd's typeurl names protobuf types (no URL prefix).
              resp.mutable_stats()->set_type_url("io.containerd.cgroups.v2.Metrics");
              resp.mutable_stats()->set_value(s.metrics().SerializeAsString());
              return resp;
            },
            Fwd<task::StatsResponse>(reply));
      });

  Reg<task::CheckpointTaskRequest, Empty>(
      server, "Checkpoint", [](task::CheckpointTaskRequest, auto reply) {
        reply(Error::Make(Code::kUnimplemented,
                          "peapod does not checkpoint containers (the pod's memory is a VM's)"));
      });

  Reg<task::ConnectRequest, task::ConnectResponse>(
      server, "Connect", [d](task::ConnectRequest, auto reply) {
        task::ConnectResponse resp;
        resp.set_shim_pid(static_cast<uint32_t>(::getpid()));
        auto p = d->procs.find("");
        if (p != d->procs.end()) resp.set_task_pid(p->second->pid);
        resp.set_version(PEAPOD_VERSION);
        reply(resp);
      });

  Reg<task::ShutdownRequest, Empty>(server, "Shutdown",
                                    [this, d](task::ShutdownRequest req, auto reply) {
                                      // containerd calls Shutdown after the task is deleted; with a
                                      // live task, only "now".
                                      if (!req.now() && d->procs.count("") && !d->deleted)
                                        return reply(Empty());
                                      reply(Empty());
                                      // Send what is queued first; the sends need the loop, so wait
                                      // off it.
                                      std::lock_guard<std::mutex> l(d->threads_mu);
                                      d->threads.emplace_back([this, d] {
                                        d->events->Flush();
                                        if (on_shutdown_) d->loop->Post(on_shutdown_);
                                      });
                                    });
}

void CleanupAfterDeadShim(const ShimOptions& opts) {
  auto config = ReadFile(opts.bundle + "/config.json");
  if (!config.ok()) return;
  auto role = RoleFromSpec(opts.id, *config);
  if (!role.ok()) return;
  auto loop = EventLoop::Create();
  if (!loop.ok()) return;
  EventLoop* l = loop->get();
  std::thread t([l] { l->Run(); });
  auto call = [&](std::shared_ptr<ttrpc::Client> c, const char* svc, const std::string& method,
                  const google::protobuf::Message& req) {
    if (!c) return;
    ttrpc::CallOptions o;
    o.timeout = 60s;
    auto r = c->CallSync(svc, method, req.SerializeAsString(), o);
    // NotFound: already gone (containerd also runs delete after a shim that ended normally).
    if (!r.ok() && r.error().code() != Code::kNotFound) {
      spdlog::warn("shim delete: {} {}: {}", method, opts.id, r.error().ToString());
    }
  };
  {
    std::shared_ptr<ttrpc::Client> sbx, agent;
    if (auto c = Dial(l, opts.sandboxer); c.ok()) sbx = *c;
    sb::GetPodRequest g;
    g.set_pod_id(role->pod_id);
    if (sbx) {
      ttrpc::CallOptions o;
      o.timeout = 10s;
      auto pod = sbx->CallSyncTyped<sb::PodInfo>(kSandboxer, "GetPod", g, o);
      if (pod.ok() && role->kind != PodRole::kPause) {
        if (auto c = Dial(l, pod->agent_address()); c.ok()) agent = *c;
        av1::RemoveContainerRequest r;
        r.set_container_id(opts.id);
        r.set_force(true);
        call(agent, kAgent, "RemoveContainer", r);
      }
      if (role->kind != PodRole::kPause) {
        sb::ReleaseContainerRequest r;
        r.set_pod_id(role->pod_id);
        r.set_container_id(opts.id);
        call(sbx, kSandboxer, "ReleaseContainer", r);
      }
      if (role->kind != PodRole::kMember) {
        sb::RemovePodRequest r;
        r.set_pod_id(role->pod_id);
        call(sbx, kSandboxer, "RemovePod", r);
      }
    }
    // Clients are closed on their loop.
    std::promise<void> closed;
    l->Post([&] {
      sbx.reset();
      agent.reset();
      closed.set_value();
    });
    closed.get_future().wait();
  }
  l->Stop();
  t.join();
}

}  // namespace peapod::shim
