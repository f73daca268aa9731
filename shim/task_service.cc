#include "shim/task_service.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <optional>
#include <thread>

#include <google/protobuf/empty.pb.h>
#include <google/protobuf/util/time_util.h>
#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

#include "common/agentapi/agent_client.h"
#include "common/base/files.h"
#include "common/base/ids.h"
#include "common/log/log.h"
#include "common/oci/spec.h"
#include "containerd/events/task.pb.h"
#include "containerd/runtime/task/v2/shim.pb.h"
#include "peapod/agent/v1/agent.pb.h"
#include "peapod/sandboxer/v1/sandboxer.pb.h"
#include "shim/agent_link.h"
#include "shim/dial.h"
#include "shim/pacing.h"
#include "shim/stdio_pumps.h"
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

PodRole RoleOf(const std::string& id, const oci::Spec& spec) {
  PodRole role;
  role.pod_id = id;
  // containerd's CRI marks each container: "sandbox" for the pause container, "container" for
  // the others, which name their pod with sandbox-id.
  std::string type = spec.Annotation("io.kubernetes.cri.container-type").value_or("");
  std::string sandbox = spec.Annotation("io.kubernetes.cri.sandbox-id").value_or("");
  if (type == "sandbox") {
    role.kind = PodRole::kPause;
  } else if (!sandbox.empty() && sandbox != id) {
    role.kind = PodRole::kMember;
    role.pod_id = sandbox;
  }
  role.hostname = spec.hostname().value_or("");
  role.netns = spec.NamespacePath(oci::NamespaceType::kNetwork).value_or("");
  return role;
}

Result<PodRole> RoleFromSpec(const std::string& id, const std::string& config_json) {
  PP_ASSIGN_OR_RETURN(auto spec, oci::Spec::Parse(config_json, "config.json of container " + id));
  return RoleOf(id, spec);
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

// One process: the container's init (exec_id empty) or an exec. Loop thread only.
struct TaskService::Process {
  std::string exec_id;
  std::string stdin_path, stdout_path, stderr_path;
  bool terminal = false;
  uint32_t pid = 0;
  enum class State { kCreated, kRunning, kPaused, kStopped } state = State::kCreated;
  uint32_t exit_status = 0;
  google::protobuf::Timestamp exited_at;
  std::vector<ttrpc::TypedResponder<task::WaitResponse>> waiters;
  std::string process_json;       // an exec's OCI process, until it starts
  bool starting = false;          // the agent's Start/Exec is in flight
  std::vector<StopPump> stop_io;  // its stdio pumps, stopped when containerd deletes it
  // Our own writer on the stdin FIFO: the pump sees EOF only once containerd's CloseIO (or the
  // exit) drops it, after containerd's writer is gone, so nothing still in the FIFO is lost.
  UniqueFd stdin_keep;
  bool stdin_closed = false;
  void DropStdinWriter() {
    stdin_closed = true;
    stdin_keep.Reset();
  }
  const std::string& Name(const std::string& container_id) const {
    return exec_id.empty() ? container_id : exec_id;
  }
};

namespace {

template <typename T>
using Done = std::function<void(Result<T>)>;
template <typename T>
using Reply = ttrpc::TypedResponder<T>;
using P = TaskService::Process;

}  // namespace

// Everything runs on the loop thread: handlers, the calls they make to the sandboxer and the
// agent (answered through callbacks), the stdio pumps and the exit and OOM watches.
struct TaskService::Impl {
  EventLoop* loop;
  ShimOptions opts;
  EventPublisher* events;
  std::function<void()>* on_shutdown;
  PodRole role;
  std::shared_ptr<AgentLink> link;           // the pod's agent, through the sandboxer's mux
  agentapi::AgentClient agent;               // typed calls over link
  std::shared_ptr<ttrpc::Client> sandboxer;  // peapod.sandboxer.v1
  uint32_t vm_pid = 0;
  bool created = false;
  bool deleted = false;
  bool shutting_down = false;  // the link is stopping: a failed wait is no exit
  std::map<std::string, std::shared_ptr<Process>> procs;  // "" is init

  // --- the sandboxer --------------------------------------------------------------------
  // timeout: a cold pod boots under TCG in seconds; mkfs of a big layer takes longer. A call
  // that misses it drops the connection, so the next call dials again: a connection the
  // sandboxer no longer answers on must not hold every later call for minutes.
  template <typename Resp>
  void CallSandboxer(const std::string& method, const google::protobuf::Message& req,
                     Done<Resp> done, std::chrono::nanoseconds timeout = 300s) {
    if (!sandboxer || sandboxer->closed()) {  // never dialled, or the sandboxer restarted
      auto c = DialNow(loop, opts.sandboxer);
      if (!c.ok()) {
        return done(std::move(c).error().Wrap("connect to peapod-sandboxer at " + opts.sandboxer +
                                              " (is it running?)"));
      }
      if (sandboxer) sandboxer->Close();
      sandboxer = std::move(*c);
    }
    ttrpc::CallOptions o;
    o.timeout = timeout;
    auto c = sandboxer;
    c->Call(
        kSandboxer, method, req.SerializeAsString(), o,
        [this, c, method, done = std::move(done)](Result<std::string> raw) {
          if (!raw.ok() && raw.error().code() == Code::kDeadlineExceeded) {
            spdlog::warn("shim: {}: peapod-sandboxer did not answer {} in time; dialling again",
                         opts.id, method);
            if (sandboxer == c) sandboxer.reset();
            loop->Post([c] { c->Close(); });
          }
          if (!raw.ok()) return done(std::move(raw).error());
          Resp resp;
          if (!resp.ParseFromString(*raw)) {
            return done(Error::Internal("peapod-sandboxer's answer to {} does not parse", method));
          }
          done(std::move(resp));
        });
  }

  // Where the pod's agent socket is, for AgentLink: gone once the sandboxer says so.
  void LocateAgent(std::function<void(Result<std::string>)> done) {
    sb::GetPodRequest g;
    g.set_pod_id(role.pod_id);
    CallSandboxer<sb::PodInfo>(
        "GetPod", g,
        [this, done = std::move(done)](Result<sb::PodInfo> pod) {
          if (!pod.ok()) {
            if (pod.error().code() == Code::kNotFound) return done(std::move(pod).error());
            return done(Error(Code::kUnavailable, pod.error().message()));  // the sandboxer is away
          }
          if (!pod->ready()) {
            return done(Error::Make(Code::kFailedPrecondition,
                                    "pod {} is not ready (its VM is not running)", role.pod_id));
          }
          done(pod->agent_address());
        },
        kLocateTimeout);
  }

  void ConnectAgent() {
    link = AgentLink::Create(loop, [this](auto done) { LocateAgent(std::move(done)); });
    agent =
        agentapi::AgentClient([link = link](const char* method, std::string payload, auto timeout,
                                            agentapi::Resend resend, ttrpc::Client::Callback done) {
          if (resend == agentapi::Resend::kSafe) {
            link->CallRetrying(method, std::move(payload), timeout, std::move(done));
          } else {
            link->CallOnce(method, std::move(payload), timeout, std::move(done));
          }
        });
  }

  // Gives back what the container held in its pod; removes the pod if the container owns it.
  void ReleaseFromPod(std::function<void()> then) {
    auto remove_pod = [this, then = std::move(then)] {
      if (role.kind == PodRole::kMember) return then();
      sb::RemovePodRequest r;
      r.set_pod_id(role.pod_id);
      CallSandboxer<Empty>("RemovePod", r, [this, then](Result<Empty> x) {
        if (!x.ok()) spdlog::warn("shim: remove pod {}: {}", role.pod_id, x.error().ToString());
        then();
      });
    };
    if (role.kind == PodRole::kPause) return remove_pod();
    sb::ReleaseContainerRequest r;
    r.set_pod_id(role.pod_id);
    r.set_container_id(opts.id);
    CallSandboxer<Empty>("ReleaseContainer", r, [this, remove_pod](Result<Empty> x) {
      if (!x.ok()) spdlog::warn("shim: release {}: {}", opts.id, x.error().ToString());
      remove_pod();
    });
  }

  Result<std::shared_ptr<Process>> Find(const std::string& exec_id) {
    auto it = procs.find(exec_id);
    if (it == procs.end()) {
      return exec_id.empty() ? Error::NotFound("container {} has no task", opts.id)
                             : Error::NotFound("exec {} not found in {}", exec_id, opts.id);
    }
    return it->second;
  }

  // --- a started process: stdio, exit, OOM -----------------------------------------------
  // Starts the stdio pumps and the exit watch of a started process. The exit is reported once
  // its output is copied (or 2 s after the exit, if something keeps the streams open). A stream
  // that cannot be opened is logged and dropped; the exit is watched whatever happens.
  void StartIo(const std::shared_ptr<Process>& p) {
    auto open = [&](const char* what, Result<UniqueFd> fd) {
      if (fd.ok()) return std::move(*fd);
      spdlog::error("shim: {} of {}: {}; it is dropped", what, p->Name(opts.id),
                    fd.error().ToString());
      return UniqueFd();
    };
    UniqueFd out = open("stdout", OpenOutput(p->stdout_path));
    UniqueFd err = p->terminal ? UniqueFd() : open("stderr", OpenOutput(p->stderr_path));
    UniqueFd in = p->stdin_path.empty() ? UniqueFd() : open("stdin", OpenStdin(*p));
    struct Exit {
      int pumps = 0;
      bool exited = false;
      bool reported = false;
      uint32_t status = 0;
      google::protobuf::Timestamp at;
      EventLoop::TimerId timer = 0;
    };
    auto x = std::make_shared<Exit>();
    x->pumps = p->terminal ? 1 : 2;
    auto report = [this, p, x] {
      if (x->reported) return;
      x->reported = true;
      if (x->timer) loop->CancelTimer(x->timer);
      Exited(p, x->status, x->at);
    };
    auto pump_done = [x, report] {
      if (--x->pumps == 0 && x->exited) report();
    };
    const StreamOf stream{opts.id, p->exec_id};
    p->stop_io.push_back(
        PumpOutput(loop, agent, stream, /*stderr_stream=*/false, std::move(out), pump_done));
    if (!p->terminal) {
      p->stop_io.push_back(
          PumpOutput(loop, agent, stream, /*stderr_stream=*/true, std::move(err), pump_done));
    }
    if (in) p->stop_io.push_back(PumpInput(loop, agent, stream, std::move(in)));
    av1::WaitProcessRequest w;
    w.set_container_id(opts.id);
    w.set_exec_id(p->exec_id);
    agent.WaitProcess(w, [this, x, report](Result<av1::WaitProcessResponse> r) {
      if (!r.ok() && shutting_down) return;  // the shim exits; the process runs on
      if (!r.ok()) spdlog::warn("shim: wait for {}: {}", opts.id, r.error().ToString());
      x->status = r.ok() ? r->exit_status() : 255;
      x->at = r.ok() && r->has_exited_at() ? r->exited_at() : Now();
      x->exited = true;
      if (x->pumps == 0) return report();
      x->timer = loop->AddTimer(2s, report);
    });
  }

  // containerd's stdin FIFO, read without blocking. We hold a writer of our own (released by
  // CloseIO or the exit): containerd's contract, as runc's shim keeps one, so that CloseIO, not
  // the end of containerd's own writer (a containerd restart), ends stdin, and everything
  // written to the FIFO before it reaches the process.
  Result<UniqueFd> OpenStdin(Process& p) {
    // O_RDWR never blocks on a FIFO; with a writer held, the reader's open does not either.
    UniqueFd keep(::open(p.stdin_path.c_str(), O_RDWR | O_CLOEXEC));
    if (!keep) return Error::Errno("open stdin " + p.stdin_path);
    UniqueFd in(::open(p.stdin_path.c_str(), O_RDONLY | O_NONBLOCK | O_CLOEXEC));
    if (!in) return Error::Errno("open stdin " + p.stdin_path);
    if (!p.stdin_closed) p.stdin_keep = std::move(keep);
    return in;
  }

  // Publishes /tasks/oom for OOM kills in this container (CRI learns of OOM only this way),
  // until the agent connection ends. The agent is the guest's and may answer in a loop: at
  // most one event per kOomEventInterval is published, the others are counted, and while they
  // come faster the next one is not asked for before the interval is over.
  struct OomWatch {
    EventCoalescer coalescer{kOomEventInterval};
    std::optional<EventCoalescer::Clock::time_point> last_report;  // of coalesced events
    uint64_t reported = 0;
  };
  void WatchOOM(std::shared_ptr<OomWatch> w) {
    av1::GetOOMEventRequest r;
    r.set_container_id(opts.id);
    agent.GetOOMEvent(r, [this, w](Result<av1::OOMEvent> oom) {
      if (!oom.ok()) return;
      auto now = EventCoalescer::Clock::now();
      auto d = w->coalescer.Offer(now);
      if (d.publish) {
        ev::TaskOOM e;
        e.set_container_id(opts.id);
        events->Publish("/tasks/oom", e);
        return WatchOOM(w);
      }
      if (!w->last_report || now - *w->last_report >= 60s) {
        spdlog::warn(
            "shim: {}: {} OOM events came within {} ms of another and were not published (CRI "
            "needs only one)",
            opts.id, w->coalescer.coalesced() - w->reported,
            std::chrono::duration_cast<std::chrono::milliseconds>(kOomEventInterval).count());
        w->reported = w->coalescer.coalesced();
        w->last_report = now;
      }
      loop->AddTimer(d.wait, [this, w] { WatchOOM(w); });
    });
  }

  void Exited(const std::shared_ptr<Process>& p, uint32_t status,
              const google::protobuf::Timestamp& at) {
    if (p->state == P::State::kStopped) return;
    p->state = P::State::kStopped;
    p->DropStdinWriter();  // its stdin pump ends when containerd's writer goes
    p->exit_status = status;
    p->exited_at = at;
    ev::TaskExit e;
    e.set_container_id(opts.id);
    e.set_id(p->Name(opts.id));
    e.set_pid(p->pid);
    e.set_exit_status(status);
    *e.mutable_exited_at() = at;
    events->Publish("/tasks/exit", e);
    AnswerWaiters(*p, status, at);
  }

  // containerd's Waits on p end with this status.
  static void AnswerWaiters(Process& p, uint32_t status, const google::protobuf::Timestamp& at) {
    task::WaitResponse w;
    w.set_exit_status(status);
    *w.mutable_exited_at() = at;
    for (auto& reply : p.waiters) reply(w);
    p.waiters.clear();
  }

  // --- Create: pod, rootfs, volumes, then the container in the guest ---------------------
  struct CreateJob {
    task::CreateTaskRequest req;
    std::optional<oci::Spec> spec;
    std::vector<size_t> binds;  // indexes in the spec's mounts of the volumes to share
    Done<uint32_t> done;
    // For the log line that says where a create's time went.
    std::chrono::steady_clock::time_point began = std::chrono::steady_clock::now();
    std::chrono::steady_clock::time_point prepared;
  };

  // The spec is read and parsed once, here; the role and the volumes come from it.
  void CreateTask(std::shared_ptr<CreateJob> job) {
    auto fail = [job](Error e) { job->done(std::move(e)); };
    const std::string path = opts.bundle + "/config.json";
    auto config = ReadFile(path);
    if (!config.ok()) return fail(std::move(config).error());
    auto spec = oci::Spec::Parse(*config, path);
    if (!spec.ok()) return fail(std::move(spec).error());
    job->spec = std::move(*spec);
    role = RoleOf(opts.id, *job->spec);
    if (auto o = CheckRuntimeOptions(job->req.options()); !o.ok()) return fail(o.error());
    // The pod: made by the sandbox controller (containerd 2.x) or by the pause container's
    // shim (1.6) for a CRI container, which only prepares itself in it; created by us for a
    // pause container or a plain one.
    if (role.kind == PodRole::kMember) return Prepare(job);
    sb::CreatePodRequest c;
    c.set_pod_id(role.pod_id);
    c.set_origin(role.kind == PodRole::kPause ? sb::CreatePodRequest::CLASSIC_CRI
                                              : sb::CreatePodRequest::PLAIN);
    c.set_netns_path(role.netns);
    c.set_hostname(role.hostname);
    c.set_namespace_(opts.ns);
    CallSandboxer<sb::PodInfo>("CreatePod", c, [this, job](Result<sb::PodInfo> pod) {
      if (!pod.ok()) return job->done(std::move(pod).error());
      if (role.kind != PodRole::kPause) return Prepare(job);
      vm_pid = pod->pid();
      ConnectAgent();
      job->done(vm_pid);  // the pause process costs nothing
    });
  }

  // One round trip: the sandboxer finds the pod, turns containerd's rootfs mounts into layer
  // disks and shares the bind mounts of host paths (volumes, the pod's
  // hosts/resolv.conf/hostname/shm) through the pod share; their sources become guest paths.
  void Prepare(std::shared_ptr<CreateJob> job) {
    sb::PrepareContainerRequest req;
    req.set_pod_id(role.pod_id);
    req.set_container_id(opts.id);
    *req.mutable_mounts() = job->req.rootfs();
    const auto& mounts = job->spec->mounts();
    for (size_t i = 0; i < mounts.size(); ++i) {
      const auto& m = mounts[i];
      auto has = [&](const char* o) {
        return std::find(m.options.begin(), m.options.end(), o) != m.options.end();
      };
      bool bind = m.type == "bind" || has("bind") || has("rbind");
      if (!bind || m.source.empty() || m.source[0] != '/' || !fs::exists(m.source)) continue;
      auto* v = req.add_volumes();
      v->set_host_path(m.source);
      v->set_readonly(has("ro") || has("rro"));
      v->set_recursive_readonly(has("rro"));
      v->set_propagate_from_host(has("rslave") || has("rshared") || has("slave") || has("shared"));
      job->binds.push_back(i);
    }
    CallSandboxer<sb::PrepareContainerResponse>(
        "PrepareContainer", req, [this, job](Result<sb::PrepareContainerResponse> r) {
          if (!r.ok()) {
            if (role.kind == PodRole::kMember && r.error().code() == Code::kNotFound) {
              return job->done(std::move(r).error().Wrap("container " + opts.id + " names pod " +
                                                         role.pod_id +
                                                         ", which peapod-sandboxer does not run"));
            }
            return job->done(std::move(r).error());
          }
          job->prepared = std::chrono::steady_clock::now();
          vm_pid = r->pod().pid();
          ConnectAgent();
          if (auto edited = UseSharedVolumes(*job, r->volumes()); !edited.ok()) {
            return ReleaseFromPod([job, e = edited.error()] { job->done(e); });
          }
          CreateInGuest(job, r->rootfs());
        });
  }

  // The shared volumes' guest paths in the spec; each mount the sandboxer found below a volume
  // follows it as a bind of its own.
  Result<void> UseSharedVolumes(CreateJob& job, const sb::ShareVolumesResponse& shared) {
    if (job.binds.empty()) return Ok();
    return job.spec->Edit([&](oci::Json& d) {
      std::vector<SharedBind> shared_binds;
      const auto& binds = job.binds;
      for (size_t k = 0; k < binds.size() && k < static_cast<size_t>(shared.guest_paths_size());
           ++k) {
        const int ik = static_cast<int>(k);
        d["mounts"][binds[k]]["source"] = shared.guest_paths(ik);
        if (ik < shared.submounts_size()) shared_binds.push_back({binds[k], shared.submounts(ik)});
      }
      d["mounts"] = WithSubmounts(d["mounts"], shared_binds);
    });
  }

  void CreateInGuest(std::shared_ptr<CreateJob> job, const sb::AttachRootfsResponse& rootfs) {
    av1::CreateContainerRequest c;
    c.set_container_id(opts.id);
    c.set_oci_spec(job->spec->Dump());
    *c.mutable_layers() = rootfs.layers();
    c.set_upper_dir(rootfs.upper_dir());
    c.set_stdin(!job->req.stdin().empty());
    c.set_terminal(job->req.terminal());
    agent.CreateContainer(c, [this, job](Result<av1::CreateContainerResponse> r) {
      if (r.ok()) {
        spdlog::info("shim: created {} (ms: sandboxer {}, agent {})", opts.id,
                     log::MsSince(job->began, job->prepared), log::MsSince(job->prepared));
        return job->done(r->pid());
      }
      ReleaseFromPod([job, e = std::move(r).error()] { job->done(e); });
    });
  }

  // --- task methods: one each ---------------------------------------------------------------
  void Create(task::CreateTaskRequest req, Reply<task::CreateTaskResponse> reply) {
    if (req.id() != opts.id) {
      return reply(Error::Invalid("this shim serves container {}, not {}", opts.id, req.id()));
    }
    if (!req.checkpoint().empty()) {
      return reply(Error::Make(Code::kUnimplemented, "peapod cannot restore checkpoints"));
    }
    if (created) return reply(Error::Make(Code::kAlreadyExists, "task {} exists", req.id()));
    created = true;
    auto p = std::make_shared<P>();
    p->stdin_path = req.stdin();
    p->stdout_path = req.stdout();
    p->stderr_path = req.stderr();
    p->terminal = req.terminal();
    auto job = std::make_shared<CreateJob>();
    job->req = req;
    job->done = [this, p, req, reply](Result<uint32_t> pid) {
      if (!pid.ok()) {
        created = false;
        spdlog::error("shim: create {}: {}", opts.id, pid.error().ToString());
        return reply(std::move(pid).error().Wrap("create " + opts.id));
      }
      p->pid = *pid;
      procs[""] = p;
      ev::TaskCreate e;
      e.set_container_id(opts.id);
      e.set_bundle(opts.bundle);
      *e.mutable_rootfs() = req.rootfs();
      e.mutable_io()->set_stdin(req.stdin());
      e.mutable_io()->set_stdout(req.stdout());
      e.mutable_io()->set_stderr(req.stderr());
      e.mutable_io()->set_terminal(req.terminal());
      e.set_pid(*pid);
      events->Publish("/tasks/create", e);
      task::CreateTaskResponse resp;
      resp.set_pid(*pid);
      reply(resp);
    };
    CreateTask(job);
  }

  void Start(task::StartRequest req, Reply<task::StartResponse> reply) {
    auto found = Find(req.exec_id());
    if (!found.ok()) return reply(found.error());
    auto p = *found;
    if (p->state != P::State::kCreated || p->starting) {
      return reply(Error::Make(Code::kFailedPrecondition, "{} already started", p->Name(opts.id)));
    }
    if (role.kind == PodRole::kPause) {
      p->state = P::State::kRunning;
      ev::TaskStart e;
      e.set_container_id(opts.id);
      e.set_pid(p->pid);
      events->Publish("/tasks/start", e);
      task::StartResponse resp;
      resp.set_pid(p->pid);
      return reply(resp);
    }
    p->starting = true;
    auto started = [this, p, reply, t0 = std::chrono::steady_clock::now()](Result<uint32_t> pid) {
      p->starting = false;
      spdlog::info("shim: start {} took {} ms", p->Name(opts.id), log::MsSince(t0));
      if (!pid.ok()) return reply(std::move(pid).error());
      Started(p, *pid);
      task::StartResponse resp;
      resp.set_pid(*pid);
      reply(resp);
    };
    if (p->exec_id.empty()) {
      av1::StartContainerRequest s;
      s.set_container_id(opts.id);
      return agent.StartContainer(s, [started](Result<av1::StartContainerResponse> r) {
        started(r.ok() ? Result<uint32_t>(r->pid()) : Result<uint32_t>(std::move(r).error()));
      });
    }
    av1::ExecProcessRequest e;
    e.set_container_id(opts.id);
    e.set_exec_id(p->exec_id);
    e.set_process(p->process_json);
    e.set_stdin(!p->stdin_path.empty());
    e.set_terminal(p->terminal);
    agent.ExecProcess(e, [started](Result<av1::ExecProcessResponse> r) {
      started(r.ok() ? Result<uint32_t>(r->pid()) : Result<uint32_t>(std::move(r).error()));
    });
  }

  void Started(const std::shared_ptr<Process>& p, uint32_t pid) {
    p->pid = pid;
    p->state = P::State::kRunning;
    // The start event first: the pumps and the exit watch can end at once (the agent gone).
    if (p->exec_id.empty()) {
      ev::TaskStart e;
      e.set_container_id(opts.id);
      e.set_pid(pid);
      events->Publish("/tasks/start", e);
    } else {
      ev::TaskExecStarted e;
      e.set_container_id(opts.id);
      e.set_exec_id(p->exec_id);
      e.set_pid(pid);
      events->Publish("/tasks/exec-started", e);
    }
    StartIo(p);
    if (p->exec_id.empty()) WatchOOM(std::make_shared<OomWatch>());
  }

  void Wait(task::WaitRequest req, Reply<task::WaitResponse> reply) {
    auto p = Find(req.exec_id());
    if (!p.ok()) return reply(p.error());
    if ((*p)->state != P::State::kStopped) return (*p)->waiters.push_back(std::move(reply));
    task::WaitResponse w;
    w.set_exit_status((*p)->exit_status);
    *w.mutable_exited_at() = (*p)->exited_at;
    reply(w);
  }

  void Kill(task::KillRequest req, Reply<Empty> reply) {
    auto found = Find(req.exec_id());
    if (!found.ok()) return reply(found.error());
    auto p = *found;
    if (role.kind == PodRole::kPause) {
      // Stopping the pause container stops the pod.
      sb::RemovePodRequest r;
      r.set_pod_id(role.pod_id);
      return CallSandboxer<Empty>("RemovePod", r,
                                  [this, p, reply, sig = req.signal()](Result<Empty> x) {
                                    if (!x.ok()) return reply(std::move(x).error());
                                    Exited(p, 128 + sig, Now());
                                    reply(Empty());
                                  });
    }
    if (p->state == P::State::kStopped) {
      return reply(Error::NotFound("process {} already finished", p->pid));
    }
    av1::SignalProcessRequest s;
    s.set_container_id(opts.id);
    s.set_exec_id(req.exec_id());
    s.set_signal(req.signal());
    s.set_all(req.all());
    agent.SignalProcess(s, reply);
  }

  void Exec(task::ExecProcessRequest req, Reply<Empty> reply) {
    if (!procs.count("")) return reply(Error::NotFound("container {} has no task", opts.id));
    if (!IsValidId(req.exec_id())) {
      return reply(Error::Invalid("exec id '{}' is invalid: use {}", req.exec_id(), kIdRule));
    }
    if (procs.count(req.exec_id())) {
      return reply(Error::Make(Code::kAlreadyExists, "exec {} exists", req.exec_id()));
    }
    if (role.kind == PodRole::kPause) {
      return reply(Error::Make(Code::kFailedPrecondition,
                               "{} is a pod's pause container: nothing runs in it", opts.id));
    }
    auto p = std::make_shared<P>();
    p->exec_id = req.exec_id();
    p->stdin_path = req.stdin();
    p->stdout_path = req.stdout();
    p->stderr_path = req.stderr();
    p->terminal = req.terminal();
    p->process_json = req.spec().value();  // containerd sends the OCI Process as JSON
    procs[p->exec_id] = p;
    ev::TaskExecAdded e;
    e.set_container_id(opts.id);
    e.set_exec_id(p->exec_id);
    events->Publish("/tasks/exec-added", e);
    reply(Empty());
  }

  void Delete(task::DeleteRequest req, Reply<task::DeleteResponse> reply) {
    auto found = Find(req.exec_id());
    if (!found.ok()) return reply(found.error());
    auto p = *found;
    if ((p->state != P::State::kStopped && p->state != P::State::kCreated) || p->starting) {
      return reply(Error::Make(Code::kFailedPrecondition, "{} is still running: kill it first",
                               p->Name(opts.id)));
    }
    auto deleted_now = [this, p, reply] { Deleted(p, reply); };
    if (!p->exec_id.empty()) {
      av1::DeleteProcessRequest r;
      r.set_container_id(opts.id);
      r.set_exec_id(p->exec_id);
      return agent.DeleteProcess(r, [deleted_now](Result<Empty>) { deleted_now(); });
    }
    if (role.kind == PodRole::kPause) return ReleaseFromPod(deleted_now);
    av1::RemoveContainerRequest r;
    r.set_container_id(opts.id);
    r.set_force(true);
    agent.RemoveContainer(r, [this, deleted_now](Result<Empty> x) {
      if (!x.ok()) spdlog::warn("shim: remove {} in the guest: {}", opts.id, x.error().ToString());
      ReleaseFromPod(deleted_now);
    });
  }

  void Deleted(const std::shared_ptr<Process>& p, const Reply<task::DeleteResponse>& reply) {
    task::DeleteResponse resp;
    resp.set_pid(p->pid);
    resp.set_exit_status(p->exit_status);
    *resp.mutable_exited_at() = p->state == P::State::kStopped ? p->exited_at : Now();
    // Output that still flows (children that hold it open, a FIFO nobody drains) stops here,
    // and containerd's reader sees EOF.
    for (auto& stop : p->stop_io) stop();
    p->stop_io.clear();
    p->DropStdinWriter();
    // Waits on a process deleted before it ran end too (it never will).
    AnswerWaiters(*p, p->state == P::State::kStopped ? p->exit_status : 255, resp.exited_at());
    procs.erase(p->exec_id);
    if (p->exec_id.empty()) {
      deleted = true;
      ev::TaskDelete e;
      e.set_container_id(opts.id);
      e.set_pid(p->pid);
      e.set_exit_status(p->exit_status);
      *e.mutable_exited_at() = resp.exited_at();
      e.set_id(opts.id);
      events->Publish("/tasks/delete", e);
    }
    reply(resp);
  }

  void State(task::StateRequest req, Reply<task::StateResponse> reply) {
    auto found = Find(req.exec_id());
    if (!found.ok()) return reply(found.error());
    const auto& p = **found;
    task::StateResponse s;
    s.set_id(p.Name(opts.id));
    s.set_exec_id(req.exec_id());
    s.set_bundle(opts.bundle);
    s.set_pid(p.pid);
    using S = containerd::v1::types::Status;
    switch (p.state) {
      case P::State::kCreated:
        s.set_status(S::CREATED);
        break;
      case P::State::kRunning:
        s.set_status(S::RUNNING);
        break;
      case P::State::kPaused:
        s.set_status(S::PAUSED);
        break;
      case P::State::kStopped:
        s.set_status(S::STOPPED);
        break;
    }
    s.set_stdin(p.stdin_path);
    s.set_stdout(p.stdout_path);
    s.set_stderr(p.stderr_path);
    s.set_terminal(p.terminal);
    s.set_exit_status(p.exit_status);
    if (p.state == P::State::kStopped) *s.mutable_exited_at() = p.exited_at;
    reply(s);
  }

  void Pause(task::PauseRequest, Reply<Empty> reply) { PauseOrResume(true, std::move(reply)); }
  void Resume(task::ResumeRequest, Reply<Empty> reply) { PauseOrResume(false, std::move(reply)); }

  void PauseOrResume(bool pause, Reply<Empty> reply) {
    auto found = Find("");
    if (!found.ok()) return reply(found.error());
    auto p = *found;
    if (role.kind == PodRole::kPause) return reply(Empty());
    av1::ContainerRequest r;
    r.set_container_id(opts.id);
    auto done = [this, p, pause, reply](Result<Empty> x) {
      if (!x.ok()) return reply(std::move(x).error());
      p->state = pause ? P::State::kPaused : P::State::kRunning;
      if (pause) {
        ev::TaskPaused e;
        e.set_container_id(opts.id);
        events->Publish("/tasks/paused", e);
      } else {
        ev::TaskResumed e;
        e.set_container_id(opts.id);
        events->Publish("/tasks/resumed", e);
      }
      reply(Empty());
    };
    if (pause) return agent.PauseContainer(r, done);
    agent.ResumeContainer(r, done);
  }

  void Pids(task::PidsRequest, Reply<task::PidsResponse> reply) {
    if (role.kind == PodRole::kPause) {
      task::PidsResponse resp;
      resp.add_processes()->set_pid(vm_pid);
      return reply(resp);
    }
    av1::ContainerRequest r;
    r.set_container_id(opts.id);
    agent.ListProcesses(r, [reply](Result<av1::ListProcessesResponse> l) {
      if (!l.ok()) return reply(std::move(l).error());
      task::PidsResponse resp;
      for (const auto& p : l->processes()) resp.add_processes()->set_pid(p.pid());
      reply(resp);
    });
  }

  void ResizePty(task::ResizePtyRequest req, Reply<Empty> reply) {
    av1::ResizePtyRequest r;
    r.set_container_id(opts.id);
    r.set_exec_id(req.exec_id());
    r.set_width(req.width());
    r.set_height(req.height());
    agent.ResizePty(r, reply);
  }

  void CloseIO(task::CloseIORequest req, Reply<Empty> reply) {
    if (!req.stdin()) return reply(Empty());
    auto p = Find(req.exec_id());
    if (!p.ok()) return reply(p.error());
    // The pump drains the FIFO, then closes the process's stdin itself.
    if (!(*p)->stdin_path.empty()) {
      (*p)->DropStdinWriter();
      return reply(Empty());
    }
    av1::ProcessRequest r;
    r.set_container_id(opts.id);
    r.set_exec_id(req.exec_id());
    agent.CloseStdin(r, reply);
  }

  void Update(task::UpdateTaskRequest req, Reply<Empty> reply) {
    av1::UpdateContainerRequest r;
    r.set_container_id(opts.id);
    r.set_resources(req.resources().value());  // containerd sends LinuxResources JSON
    agent.UpdateContainer(r, reply);
  }

  void Stats(task::StatsRequest, Reply<task::StatsResponse> reply) {
    av1::ContainerRequest r;
    // The pause container's stats are the pod's.
    if (role.kind != PodRole::kPause) r.set_container_id(opts.id);
    agent.StatsContainer(r, [reply](Result<av1::StatsContainerResponse> s) {
      if (!s.ok()) return reply(std::move(s).error());
      task::StatsResponse resp;
      // Named as containerd's typeurl names protobuf types (no URL prefix).
      resp.mutable_stats()->set_type_url("io.containerd.cgroups.v2.Metrics");
      resp.mutable_stats()->set_value(s->metrics().SerializeAsString());
      reply(resp);
    });
  }

  void Checkpoint(task::CheckpointTaskRequest, Reply<Empty> reply) {
    reply(Error::Make(Code::kUnimplemented,
                      "peapod does not checkpoint containers (the pod's memory is a VM's)"));
  }

  void Connect(task::ConnectRequest, Reply<task::ConnectResponse> reply) {
    task::ConnectResponse resp;
    resp.set_shim_pid(static_cast<uint32_t>(::getpid()));
    if (auto p = procs.find(""); p != procs.end()) resp.set_task_pid(p->second->pid);
    resp.set_version(PEAPOD_VERSION);
    reply(resp);
  }

  void Shutdown(task::ShutdownRequest req, Reply<Empty> reply) {
    reply(Empty());
    // containerd calls Shutdown after the task is deleted; with a live task, only "now".
    if (!req.now() && procs.count("") && !deleted) return;
    shutting_down = true;
    // The queued events go out first.
    events->Flush([this] {
      if (link) link->Stop();
      if (*on_shutdown) (*on_shutdown)();
    });
  }
};

TaskService::TaskService(EventLoop* loop, ShimOptions opts, EventPublisher* events)
    : impl_(std::make_unique<Impl>()) {
  impl_->loop = loop;
  impl_->opts = std::move(opts);
  impl_->events = events;
  impl_->on_shutdown = &on_shutdown_;
}

TaskService::~TaskService() = default;

namespace {

// Serves containerd.task.v2.Task's `method` with the Impl member `handler`.
template <typename Req, typename Resp>
void Reg(ttrpc::Server& s, const std::string& method, TaskService::Impl* d,
         void (TaskService::Impl::*handler)(Req, Reply<Resp>)) {
  ttrpc::RegisterTyped<Req, Resp>(
      s, kTask, method, [d, handler](const ttrpc::CallContext&, Req&& req, Reply<Resp> reply) {
        (d->*handler)(std::move(req), std::move(reply));
      });
}

}  // namespace

void TaskService::Register(ttrpc::Server& server) {
  using I = Impl;
  I* d = impl_.get();
  Reg(server, "Create", d, &I::Create);
  Reg(server, "Start", d, &I::Start);
  Reg(server, "Wait", d, &I::Wait);
  Reg(server, "Kill", d, &I::Kill);
  Reg(server, "Exec", d, &I::Exec);
  Reg(server, "Delete", d, &I::Delete);
  Reg(server, "State", d, &I::State);
  Reg(server, "Pause", d, &I::Pause);
  Reg(server, "Resume", d, &I::Resume);
  Reg(server, "Pids", d, &I::Pids);
  Reg(server, "ResizePty", d, &I::ResizePty);
  Reg(server, "CloseIO", d, &I::CloseIO);
  Reg(server, "Update", d, &I::Update);
  Reg(server, "Stats", d, &I::Stats);
  Reg(server, "Checkpoint", d, &I::Checkpoint);
  Reg(server, "Connect", d, &I::Connect);
  Reg(server, "Shutdown", d, &I::Shutdown);
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
