#include "podagent/containers.h"

#include <fcntl.h>
#include <sys/inotify.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <termios.h>
#include <unistd.h>

#include <csignal>
#include <filesystem>
#include <fstream>
#include <set>
#include <sstream>

#include <google/protobuf/util/time_util.h>
#include <spdlog/spdlog.h>

#include "common/base/files.h"
#include "common/base/ids.h"
#include "common/log/log.h"
#include "common/oci/spec.h"
#include "podagent/cgroup_stats.h"
#include "podagent/exec.h"

namespace peapod::agent {

namespace fs = std::filesystem;
using google::protobuf::Timestamp;
using google::protobuf::util::TimeUtil;
using log::MsSince;

struct ContainerManager::Process {
  std::string exec_id;
  pid_t pid = 0;
  bool terminal = false;
  std::unique_ptr<InputStream> in;
  std::unique_ptr<OutputStream> out;
  std::unique_ptr<OutputStream> err;
  UniqueFd console;           // pty master, for ResizePty
  UniqueFd console_listener;  // crun connects here to hand over the pty master
  std::optional<uint32_t> exit_code;
  Timestamp exited_at;
  std::chrono::steady_clock::time_point started{};  // when StartContainer/Exec returned
  struct Waiter {
    std::function<bool()> waiting;
    Reply<v1::WaitProcessResponse> reply;
  };
  std::vector<Waiter> waiters;

  void Exited(uint32_t code) {
    exit_code = code;
    exited_at = TimeUtil::GetCurrentTime();
    v1::WaitProcessResponse resp;
    resp.set_exit_status(code);
    *resp.mutable_exited_at() = exited_at;
    auto ws = std::move(waiters);
    waiters.clear();
    for (auto& w : ws) {
      if (w.waiting()) w.reply(resp);
    }
  }
  void FailWaiters(const Error& e) {
    auto ws = std::move(waiters);
    waiters.clear();
    for (auto& w : ws) w.reply(e);
  }
};

struct ContainerManager::Container {
  enum class Status { kCreating, kCreated, kRunning, kPaused, kStopped };
  std::string id;
  Status status = Status::kCreating;
  bool busy = false;  // a crun helper (start/pause/resume/update/delete) is running
  std::string dir;    // bundle and bookkeeping: run_dir/containers/<id>
  std::string rootfs;
  bool overlay = false;
  std::string upper_dir;              // on the pod's scratch disk: removed with the container
  std::vector<std::string> storages;  // acquired mount points
  Process init;
  std::map<std::string, std::shared_ptr<Process>> execs;
  std::set<std::string> pending_execs;
  uint64_t oom_kills = 0;
  int oom_wd = -1;
  int exec_seq = 0;
  // False when it shares the VM's PID namespace (CRI POD/NODE): its init's exit then does not
  // end the processes it started, so they are killed with it, as containerd's runc shim does.
  bool own_pid_ns = true;
  std::optional<oci::Spec> spec;  // as given to crun (after RewriteSpec)
  bool may_ptrace = false;        // an exec crun started had CAP_SYS_PTRACE (see Exec)
};

namespace {

using Status = v1::StateContainerResponse;

Result<void> WriteFile(const std::string& path, const std::string& data) {
  UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
  if (!fd) return Error::Errno("create " + path);
  return WriteAll(fd.get(), data.data(), data.size());
}

Result<pid_t> ReadPidFile(const std::string& path) {
  PP_ASSIGN_OR_RETURN(auto text, ReadFile(path));
  try {
    long pid = std::stol(text);
    if (pid > 0) return static_cast<pid_t>(pid);
  } catch (const std::exception&) {
  }
  return Error::Internal("pid file {} holds '{}', not a pid", path, text);
}

// Receives the pty master crun sends over the console socket.
Result<UniqueFd> ReceiveConsole(int listener) {
  UniqueFd conn(::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC));
  if (!conn) return Error::Errno("accept on console socket (crun sent no terminal)");
  char data[256];
  iovec iov{data, sizeof(data)};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))];
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  msg.msg_control = control;
  msg.msg_controllen = sizeof(control);
  if (::recvmsg(conn.get(), &msg, MSG_CMSG_CLOEXEC) < 0) return Error::Errno("recvmsg console");
  for (cmsghdr* c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
      int fd;
      std::memcpy(&fd, CMSG_DATA(c), sizeof(fd));
      return UniqueFd(fd);
    }
  }
  return Error::Internal("console socket: crun sent no file descriptor");
}

Error NotRunning(const std::string& id, const char* what) {
  return Error::Make(Code::kFailedPrecondition, "container {} is not running: cannot {}", id, what);
}

}  // namespace

ContainerManager::ContainerManager(EventLoop* loop, Reaper* reaper, ContainerOptions opts)
    : loop_(loop), reaper_(reaper), opts_(std::move(opts)) {}

ContainerManager::~ContainerManager() {
  if (inotify_watch_) loop_->Unwatch(inotify_watch_);
}

Result<void> ContainerManager::Init() {
  PP_TRY(MakeDirs(opts_.run_dir + "/containers"));
  PP_TRY(MakeDirs(opts_.run_dir + "/sock"));
  if (opts_.cgroup_root.empty()) return Ok();
  // Containers live in cgroup_parent; the controllers they use must be enabled on every level
  // above them. One write per controller: one that the kernel lacks must not block the others.
  std::string dir = opts_.cgroup_root;
  std::vector<std::string> levels = {dir};
  for (const auto& part : fs::path(opts_.cgroup_parent)) {
    if (part == "/" || part.empty()) continue;
    dir += "/" + part.string();
    levels.push_back(dir);
  }
  for (size_t i = 0; i < levels.size(); ++i) {
    if (i > 0) PP_TRY(MakeDirs(levels[i]));
    if (i + 1 == levels.size()) break;
    for (const char* ctl : {"+cpu", "+memory", "+pids", "+io", "+cpuset", "+hugetlb"}) {
      std::ofstream f(levels[i] + "/cgroup.subtree_control");
      f << ctl;
      f.flush();
    }
  }
  inotify_.Reset(::inotify_init1(IN_NONBLOCK | IN_CLOEXEC));
  if (!inotify_) return Error::Errno("inotify_init1");
  PP_ASSIGN_OR_RETURN(inotify_watch_,
                      loop_->Watch(inotify_.get(), EPOLLIN, [this](uint32_t) { OnInotify(); }));
  return Ok();
}

SpawnOptions ContainerManager::Crun(std::initializer_list<std::string> args) const {
  SpawnOptions so;
  so.argv = {opts_.crun, "--root=" + opts_.run_dir + "/crun"};
  so.argv.push_back(opts_.cgroup_root.empty() ? "--cgroup-manager=disabled"
                                              : "--cgroup-manager=cgroupfs");
  so.argv.insert(so.argv.end(), args);
  so.fixed_addresses = opts_.fixed_helper_addresses;
  return so;
}

void ContainerManager::RunCrun(std::vector<std::string> args, const std::string& log,
                               const std::vector<UniqueFd>& child_fds,
                               std::function<void(Result<std::string>)> done) {
  SpawnOptions so = Crun({"--log=" + log});
  so.argv.insert(so.argv.end(), args.begin(), args.end());
  // Pipes from PrepareStdio; none for a terminal process (crun passes the pty over the
  // console socket instead).
  if (child_fds.size() == 3) {
    so.stdin_fd = child_fds[0].get();
    so.stdout_fd = child_fds[1].get();
    so.stderr_fd = child_fds[2].get();
  }
  // crun's own error text goes to the process's stderr pipe and to the log: take the log's.
  RunCommand(loop_, reaper_, so, [log, done = std::move(done)](Result<std::string> r) {
    if (!r.ok()) {
      Error e = std::move(r).error();
      auto text = ReadFile(log);
      if (text.ok() && !text->empty()) {
        e = Error(e.code(), e.message() + ": " + text->substr(0, 2000));
      }
      return done(std::move(e));
    }
    done(std::move(r));
  });
}

std::string ContainerManager::CgroupDir(const std::string& id) const {
  return opts_.cgroup_root + opts_.cgroup_parent + "/" + id;
}

Result<ContainerManager::ContainerPtr> ContainerManager::Find(const std::string& id) const {
  auto it = containers_.find(id);
  if (it == containers_.end()) return Error::NotFound("container {} not found", id);
  return it->second;
}

Result<ContainerManager::Process*> ContainerManager::FindProcess(const std::string& id,
                                                                 const std::string& exec_id) const {
  PP_ASSIGN_OR_RETURN(auto c, Find(id));
  if (exec_id.empty()) return &c->init;
  auto it = c->execs.find(exec_id);
  if (it == c->execs.end()) {
    return Error::NotFound("exec {} not found in container {}", exec_id, id);
  }
  return it->second.get();
}

Result<void> ContainerManager::RewriteSpec(const std::string& id, oci::Spec& spec,
                                           const std::string& rootfs) const {
  PP_TRY(spec.SetRootPath(rootfs));
  const bool cgroups = !opts_.cgroup_root.empty();
  const std::string cgroup_path = opts_.cgroup_parent + "/" + id;
  std::string personality_error;
  PP_TRY(spec.Edit([&](oci::Json& d) {
    // Host-side things that mean nothing (or harm) in the guest.
    d.erase("hooks");
    // containerd 2.x writes the spec version it was built with (1.3.0); the guest's crun (1.8)
    // accepts only 1.0.x and refuses anything newer outright, while it reads the fields it
    // knows of a newer spec just as well.
    d["ociVersion"] = "1.0.2";
    if (d.contains("process")) {
      d["process"].erase("apparmorProfile");
      d["process"].erase("selinuxLabel");
    }
    // The pod's network, IPC and UTS are the VM's own: join them by not creating new ones.
    // The hostname then belongs to the pod (set once by CreateSandbox).
    d.erase("hostname");
    if (!d.contains("linux")) d["linux"] = oci::Json::object();
    auto& linux_doc = d["linux"];
    linux_doc.erase("mountLabel");
    // crun may run at fixed addresses (ContainerOptions::fixed_helper_addresses), and a child
    // keeps its parent's persona. crun sets the spec's persona right before it execs the
    // container's process (the init and every exec), and setting one clears ADDR_NO_RANDOMIZE:
    // the container's processes get address randomization back. A spec's own persona does too.
    // crun 1.8 silently skips a persona that is not an object, and crashes on one without a
    // domain: either would leave the flag on, so both are refused.
    if (!linux_doc.contains("personality") || linux_doc["personality"].is_null()) {
      linux_doc["personality"] = {{"domain", "LINUX"}};
    }
    const auto& persona = linux_doc["personality"];
    if (!persona.is_object() || !persona.contains("domain") ||
        (persona["domain"] != "LINUX" && persona["domain"] != "LINUX32")) {
      personality_error =
          fmt::format("linux.personality is {}: it must be an object with domain LINUX or LINUX32",
                      persona.dump());
    }
    if (linux_doc.contains("namespaces")) {
      oci::Json kept = oci::Json::array();
      for (auto ns : linux_doc["namespaces"]) {
        std::string type = ns.value("type", "");
        if (type == "network" || type == "ipc" || type == "uts") continue;
        // A PID namespace with a path is the pod's (CRI PodPID) or the node's (HostPID): both
        // mean the VM's own, where every such container sees the others (and the agent as
        // PID 1). Without a path, the container gets one of its own.
        if (type == "pid" && ns.contains("path")) continue;
        // Paths name host namespaces (e.g. a pause container's): a new one in the guest.
        ns.erase("path");
        kept.push_back(ns);
      }
      linux_doc["namespaces"] = kept;
    }
    if (cgroups) {
      linux_doc["cgroupsPath"] = cgroup_path;
      // The guest is cgroup v2. containerd adds a cgroup namespace only when its own host is v2;
      // without one the container's /sys/fs/cgroup is the guest's root, where memory.max and
      // cpu.max do not exist. With one it is the container's own cgroup, as under runc on v2.
      if (!linux_doc.contains("namespaces")) linux_doc["namespaces"] = oci::Json::array();
      bool has_cgroupns = false;
      for (const auto& ns : linux_doc["namespaces"]) {
        if (ns.value("type", "") == "cgroup") has_cgroupns = true;
      }
      if (!has_cgroupns) linux_doc["namespaces"].push_back({{"type", "cgroup"}});
    } else {
      linux_doc.erase("cgroupsPath");
      linux_doc.erase("resources");
    }
  }));
  if (!personality_error.empty()) return Error::Invalid("{}", personality_error);
  return Ok();
}

Result<void> ContainerManager::PrepareStdio(Process& p, const std::string& console_socket,
                                            bool stdin, bool terminal,
                                            std::vector<UniqueFd>& child_fds) {
  p.terminal = terminal;
  if (terminal) {
    PP_ASSIGN_OR_RETURN(p.console_listener, ListenUnix(console_socket, 1));
    return Ok();
  }
  auto make_pipe = [](UniqueFd& r, UniqueFd& w) -> Result<void> {
    int fds[2];
    if (::pipe2(fds, O_CLOEXEC) < 0) return Error::Errno("pipe");
    r.Reset(fds[0]);
    w.Reset(fds[1]);
    return Ok();
  };
  UniqueFd in_r, in_w, out_r, out_w, err_r, err_w;
  if (stdin) PP_TRY(make_pipe(in_r, in_w));
  PP_TRY(make_pipe(out_r, out_w));
  PP_TRY(make_pipe(err_r, err_w));
  // Output pipes as large as the stream's buffer (pipe pages are allocated only as they fill):
  // a process writing big blocks then hands them over in one write, and the agent takes them
  // in one read, instead of 16 pages at a time with a switch between the two for each; under
  // TCG every switch and system call counts. Best effort: the default size still works.
  for (int fd : {out_w.get(), err_w.get()}) {
    (void)::fcntl(fd, F_SETPIPE_SZ, static_cast<int>(OutputStream::kMaxBuffered));
  }
  if (stdin) p.in = std::make_unique<InputStream>(loop_, std::move(in_w));
  p.out = std::make_unique<OutputStream>(loop_, std::move(out_r), false);
  p.err = std::make_unique<OutputStream>(loop_, std::move(err_r), false);
  child_fds.push_back(std::move(in_r));  // may be invalid: /dev/null
  child_fds.push_back(std::move(out_w));
  child_fds.push_back(std::move(err_w));
  return Ok();
}

Result<void> ContainerManager::FinishStdio(Process& p, const std::string& console_socket) {
  if (p.terminal) {
    auto master = ReceiveConsole(p.console_listener.get());
    p.console_listener.Reset();
    ::unlink(console_socket.c_str());
    PP_TRY(master);
    p.console = std::move(*master);
    UniqueFd out(::fcntl(p.console.get(), F_DUPFD_CLOEXEC, 3));
    UniqueFd in(::fcntl(p.console.get(), F_DUPFD_CLOEXEC, 3));
    if (!out || !in) return Error::Errno("dup pty master");
    p.out = std::make_unique<OutputStream>(loop_, std::move(out), true);
    p.in = std::make_unique<InputStream>(loop_, std::move(in));
  }
  PP_TRY(p.out->Start());
  if (p.err) PP_TRY(p.err->Start());
  return Ok();
}

void ContainerManager::Track(const ContainerPtr& c, Process* p) {
  std::weak_ptr<Container> weak = c;
  std::string exec_id = p->exec_id;
  std::string procs = opts_.cgroup_root.empty() ? "" : CgroupDir(c->id) + "/cgroup.procs";
  reaper_->OnExit(p->pid, [weak, exec_id, procs](int status) {
    auto c = weak.lock();
    if (!c) return;
    Process* proc = &c->init;
    if (!exec_id.empty()) {
      auto it = c->execs.find(exec_id);
      if (it == c->execs.end()) return;
      proc = it->second.get();
    }
    uint32_t code = ExitCodeFromWaitStatus(status);
    spdlog::info("agent: container {}{}{} pid {} exited with {}", c->id,
                 exec_id.empty() ? "" : " exec ", exec_id, proc->pid, code);
    if (exec_id.empty()) c->status = Container::Status::kStopped;
    if (exec_id.empty() && !c->own_pid_ns && !procs.empty()) {
      // Its children (say nginx's workers) live on in the shared namespace and would hold its
      // stdio open: the container ends with its init.
      if (auto text = ReadFile(procs); text.ok()) {
        std::istringstream ss(*text);
        for (pid_t pid; ss >> pid;) ::kill(pid, SIGKILL);
      }
    }
    proc->Exited(code);
  });
}

void ContainerManager::CleanupFailedCreate(const ContainerPtr& c) {
  if (c->overlay) Unmount(c->rootfs);
  for (const auto& s : c->storages) storage_.Release(s);
  std::error_code ec;
  fs::remove_all(c->dir, ec);
  if (!c->upper_dir.empty()) fs::remove_all(c->upper_dir, ec);
  containers_.erase(c->id);
}

Result<void> ContainerManager::AcquirePodStorage(
    const google::protobuf::RepeatedPtrField<v1::Storage>& storages) {
  for (const auto& s : storages) PP_TRY(storage_.Acquire(s));
  return Ok();
}

void ContainerManager::Create(v1::CreateContainerRequest req,
                              Reply<v1::CreateContainerResponse> reply) {
  const std::string id = req.container_id();
  if (!IsValidId(id)) {
    return reply(Error::Invalid("container id '{}' is invalid: use {}", id, kIdRule));
  }
  if (containers_.count(id)) {
    return reply(Error::Make(Code::kAlreadyExists, "container {} already exists", id));
  }
  const auto t_parse = std::chrono::steady_clock::now();
  auto parsed = oci::Spec::Parse(req.oci_spec(), "container " + id + " config.json");
  if (!parsed.ok()) return reply(std::move(parsed).error().Wrap("create container " + id));
  oci::Spec spec = std::move(*parsed);
  const auto t0 = std::chrono::steady_clock::now();
  auto c = std::make_shared<Container>();
  c->id = id;
  c->dir = opts_.run_dir + "/containers/" + id;
  containers_[id] = c;
  auto fail = [this, c, &reply](Error e) {
    CleanupFailedCreate(c);
    reply(std::move(e).Wrap("create container " + c->id));
  };

  std::error_code ec;
  fs::remove_all(c->dir, ec);
  if (auto r = MakeDirs(c->dir); !r.ok()) return fail(r.error());

  // Rootfs: the layers stacked under a writable upper, or (no layers) the spec's root path as
  // the host already arranged it in the guest.
  for (const auto& s : req.layers()) {
    if (auto r = storage_.Acquire(s); !r.ok()) return fail(r.error());
    c->storages.push_back(s.mount_point());
  }
  for (const auto& s : req.mounts()) {
    if (auto r = storage_.Acquire(s); !r.ok()) return fail(r.error());
    c->storages.push_back(s.mount_point());
  }
  if (req.layers_size() > 0) {
    std::vector<std::string> lower;
    for (const auto& s : req.layers()) lower.push_back(s.mount_point());
    std::string rw = req.upper_dir().empty() ? c->dir + "/rw" : req.upper_dir();
    if (!req.upper_dir().empty()) {
      if (req.upper_dir()[0] != '/') {
        return fail(
            Error::Invalid("upper_dir '{}' must be an absolute guest path", req.upper_dir()));
      }
      c->upper_dir = rw;
      fs::remove_all(rw, ec);  // a leftover of an earlier container with this id
    }
    c->rootfs = c->dir + "/rootfs";
    if (auto r = MountOverlay(lower, rw + "/upper", rw + "/work", c->rootfs); !r.ok()) {
      return fail(r.error());
    }
    c->overlay = true;
  } else {
    c->rootfs = spec.root().path;
    if (c->rootfs.empty() || c->rootfs[0] != '/') {
      return fail(Error::Invalid("no layers given and root.path '{}' is not an absolute guest path",
                                 c->rootfs));
    }
  }

  if (auto r = RewriteSpec(id, spec, c->rootfs); !r.ok()) return fail(r.error());
  c->own_pid_ns = false;
  if (spec.doc().contains("linux") && spec.doc()["linux"].contains("namespaces")) {
    for (const auto& ns : spec.doc()["linux"]["namespaces"]) {
      if (ns.value("type", "") == "pid") c->own_pid_ns = true;
    }
  }
  if (auto r = WriteFile(c->dir + "/config.json", spec.Dump(2)); !r.ok()) return fail(r.error());
  c->spec = spec;
  const bool terminal = spec.process() && spec.process()->terminal;

  const std::string console = fmt::format("{}/sock/{}.sock", opts_.run_dir, id.substr(0, 64));
  std::vector<UniqueFd> child_fds;
  if (auto r = PrepareStdio(c->init, console, req.stdin(), terminal, child_fds); !r.ok()) {
    return fail(r.error());
  }
  const auto t1 = std::chrono::steady_clock::now();
  const std::string pid_file = c->dir + "/init.pid";
  std::vector<std::string> args = {"create", "--bundle=" + c->dir, "--pid-file=" + pid_file};
  if (opts_.no_pivot) args.push_back("--no-pivot");
  if (terminal) args.push_back("--console-socket=" + console);
  args.push_back(id);
  RunCrun(std::move(args), c->dir + "/crun.log", child_fds,
          [this, c, console, pid_file, reply, t_parse, t0, t1](Result<std::string> r) mutable {
            const auto t2 = std::chrono::steady_clock::now();
            auto fail = [&](Error e) {
              CleanupFailedCreate(c);
              reply(std::move(e).Wrap("create container " + c->id));
            };
            if (!r.ok()) return fail(r.error());
            auto pid = ReadPidFile(pid_file);
            if (!pid.ok()) return fail(pid.error());
            c->init.pid = *pid;
            if (auto s = FinishStdio(c->init, console); !s.ok()) {
              ::kill(*pid, SIGKILL);
              return fail(s.error());
            }
            c->status = Container::Status::kCreated;
            Track(c, &c->init);
            WatchOOM(c);
            spdlog::info(
                "agent: created container {} pid {} (ms: spec parse {}, rootfs and spec {}, crun "
                "create {}, after {})",
                c->id, *pid, MsSince(t_parse, t0), MsSince(t0, t1), MsSince(t1, t2), MsSince(t2));
            v1::CreateContainerResponse resp;
            resp.set_pid(static_cast<uint32_t>(*pid));
            reply(std::move(resp));
          });
  // The child's ends are the child's now.
}

// crun create leaves the container's init blocked on its exec fifo, <crun root>/<id>/exec.fifo.
// All `crun start` does then (crun 1.8: libcrun_container_start) is run the poststart hooks, which
// RewriteSpec removed, and release the init: open the fifo for writing, unlink it (crun's own
// "created" test is that the fifo exists) and write one byte. The agent does those three steps
// itself, since a `crun start` is a whole crun process, which under TCG costs 240-520 ms of
// start-up for no work. False when this crun keeps no fifo there (the caller then runs crun start);
// an error (ENXIO) when nothing reads it: the init is gone.
Result<bool> ContainerManager::ReleaseInit(const std::string& id) {
  const std::string fifo = opts_.run_dir + "/crun/" + id + "/exec.fifo";
  // Non-blocking: with no reader the open fails at once (ENXIO) instead of waiting for one.
  // Never through a symlink, and only a fifo: anything else there is not crun's.
  UniqueFd fd(::open(fifo.c_str(), O_WRONLY | O_NONBLOCK | O_NOFOLLOW | O_CLOEXEC));
  if (!fd && errno == ENOENT) return false;
  if (!fd && errno == ENXIO) {
    return Error::Make(Code::kFailedPrecondition, "its init has exited: nothing reads {}", fifo);
  }
  if (!fd) return Error::Errno("open " + fifo);
  struct stat st {};
  if (::fstat(fd.get(), &st) < 0) return Error::Errno("stat " + fifo);
  if (!S_ISFIFO(st.st_mode)) return Error::Internal("{} is not a fifo", fifo);
  if (::unlink(fifo.c_str()) < 0) return Error::Errno("unlink " + fifo);
  const char byte = 0;
  // EPIPE (SIGPIPE is ignored): the init exited since the open.
  if (::write(fd.get(), &byte, 1) != 1) return Error::Errno("write to " + fifo);
  return true;
}

void ContainerManager::Start(const std::string& id, Reply<v1::StartContainerResponse> reply) {
  auto c = Find(id);
  if (!c.ok()) return reply(c.error());
  auto ct = *c;
  if (ct->status != Container::Status::kCreated || ct->busy) {
    return reply(Error::Make(Code::kFailedPrecondition,
                             "container {} cannot be started: it is not in the created state", id));
  }
  auto started = [ct, reply]() {
    // It may already have exited (and been reaped) by now.
    if (ct->status == Container::Status::kCreated) ct->status = Container::Status::kRunning;
    ct->init.started = std::chrono::steady_clock::now();
    v1::StartContainerResponse resp;
    resp.set_pid(static_cast<uint32_t>(ct->init.pid));
    reply(std::move(resp));
  };
  auto released = ReleaseInit(id);
  if (!released.ok()) {
    return reply(std::move(released).error().Wrap(
        fmt::format("start container {} (init pid {})", id, ct->init.pid)));
  }
  if (*released) return started();
  spdlog::warn("agent: container {} has no exec fifo where crun 1.8 keeps it: using crun start",
               id);
  ct->busy = true;
  const auto t0 = std::chrono::steady_clock::now();
  RunCommand(loop_, reaper_, Crun({"start", id}), [ct, reply, started, t0](Result<std::string> r) {
    ct->busy = false;
    spdlog::info("agent: crun start {} took {} ms", ct->id, MsSince(t0));
    if (!r.ok()) return reply(std::move(r).error().Wrap("start container " + ct->id));
    started();
  });
}

void ContainerManager::Exec(v1::ExecProcessRequest req, Reply<v1::ExecProcessResponse> reply) {
  auto c = Find(req.container_id());
  if (!c.ok()) return reply(c.error());
  auto ct = *c;
  const std::string eid = req.exec_id();
  if (ct->status != Container::Status::kRunning) {
    return reply(NotRunning(ct->id, "exec"));
  }
  if (!IsValidId(eid)) {
    return reply(Error::Invalid("exec id '{}' is invalid: use {}", eid, kIdRule));
  }
  if (ct->execs.count(eid) || ct->pending_execs.count(eid)) {
    return reply(
        Error::Make(Code::kAlreadyExists, "exec {} already exists in container {}", eid, ct->id));
  }
  auto proc = oci::ParseProcess(req.process(), "exec " + eid + " process");
  if (!proc.ok()) return reply(proc.error());

  int seq = ++ct->exec_seq;
  const std::string base = fmt::format("{}/exec-{}", ct->dir, seq);
  auto p = std::make_shared<Process>();
  p->exec_id = eid;
  const std::string console =
      fmt::format("{}/sock/{}-{}.sock", opts_.run_dir, ct->id.substr(0, 40), seq);
  std::vector<UniqueFd> child_fds;
  if (auto r = PrepareStdio(*p, console, req.stdin(), proc->terminal, child_fds); !r.ok()) {
    return reply(r.error());
  }
  ct->pending_execs.insert(eid);
  const auto t0 = std::chrono::steady_clock::now();
  // Both ways end here: with the process's pid once it runs, or with what stopped it.
  auto started = [this, ct, p, console, eid, reply](Result<pid_t> pid) {
    ct->pending_execs.erase(eid);
    auto fail = [&](Error e) {
      ::unlink(console.c_str());
      reply(std::move(e).Wrap("exec " + eid + " in container " + ct->id));
    };
    if (!pid.ok()) return fail(pid.error());
    p->pid = *pid;
    if (auto s = FinishStdio(*p, console); !s.ok()) {
      ::kill(*pid, SIGKILL);
      return fail(s.error());
    }
    ct->execs[eid] = p;
    Track(ct, p.get());
    v1::ExecProcessResponse resp;
    resp.set_pid(static_cast<uint32_t>(*pid));
    reply(std::move(resp));
  };

  // The agent starts it itself where it can (exec.h); crun where it cannot.
  std::string why;
  auto plan = opts_.agent_exec ? PlanExec(*ct->spec, *proc, req.process(), ct->init.pid,
                                          ct->may_ptrace, opts_.run_dir + "/crun/" + ct->id,
                                          opts_.cgroup_root.empty() ? "" : CgroupDir(ct->id), &why)
                               : Result<std::optional<ExecPlan>>(std::optional<ExecPlan>());
  if (!plan.ok()) return started(std::move(plan).error());
  if (*plan) {
    std::array<int, 3> stdio = {child_fds[0].get(), child_fds[1].get(), child_fds[2].get()};
    return StartExec(loop_, reaper_, std::move(**plan), stdio,
                     [started, eid, ct, t0](Result<pid_t> pid) {
                       spdlog::info("agent: exec {} in {} {} by the agent in {} ms", eid, ct->id,
                                    pid.ok() ? "started" : "failed", MsSince(t0));
                       started(std::move(pid));
                     });
  }
  if (opts_.agent_exec) spdlog::info("agent: exec {} in {} goes to crun: {}", eid, ct->id, why);
  if (auto r = WriteFile(base + ".json", req.process()); !r.ok()) return started(r.error());
  // A process crun starts with CAP_SYS_PTRACE could read the agent's children before their
  // exec: from now on crun starts every exec of this container.
  if (proc->capabilities &&
      std::find(proc->capabilities->bounding.begin(), proc->capabilities->bounding.end(),
                "CAP_SYS_PTRACE") != proc->capabilities->bounding.end()) {
    ct->may_ptrace = true;
  }
  std::vector<std::string> args = {"exec", "--detach", "--pid-file=" + base + ".pid",
                                   "--process=" + base + ".json"};
  if (proc->terminal) args.push_back("--console-socket=" + console);
  args.push_back(ct->id);
  RunCrun(std::move(args), base + ".log", child_fds,
          [started, base, eid, ct, t0](Result<std::string> r) {
            spdlog::info("agent: crun exec {} in {} took {} ms", eid, ct->id, MsSince(t0));
            if (!r.ok()) return started(std::move(r).error());
            started(ReadPidFile(base + ".pid"));
          });
}

Result<void> ContainerManager::Signal(const v1::SignalProcessRequest& req) {
  PP_ASSIGN_OR_RETURN(auto* p, FindProcess(req.container_id(), req.exec_id()));
  int sig = static_cast<int>(req.signal());
  if (sig <= 0 || sig >= NSIG) return Error::Invalid("signal {} is not a valid signal", sig);
  if (req.all() && req.exec_id().empty() && !opts_.cgroup_root.empty()) {
    auto procs = ReadFile(CgroupDir(req.container_id()) + "/cgroup.procs");
    if (procs.ok()) {
      std::istringstream ss(*procs);
      pid_t pid;
      while (ss >> pid) ::kill(pid, sig);
      return Ok();
    }
  }
  if (p->exit_code || p->pid <= 0) {
    return Error::NotFound("process {} of container {} has already exited",
                           req.exec_id().empty() ? "init" : req.exec_id(), req.container_id());
  }
  // A container's init is PID 1 of its PID namespace, and the kernel drops a signal sent to such
  // a process unless it has a handler for it. Right after start, a program that will handle
  // SIGTERM may not have installed its handler yet (under TCG that window is tens of ms, where
  // runc on the host rarely loses the race), and the stop would then wait out its whole
  // timeout. So a catchable signal to an init started moments ago waits, up to kSignalGrace
  // after its start, for the handler to appear, and is then sent as asked.
  if (req.exec_id().empty() && sig != SIGKILL && sig != SIGSTOP &&
      std::chrono::steady_clock::now() - p->started < kSignalGrace && !Catches(p->pid, sig)) {
    DeferSignal(req.container_id(), p->pid, sig, p->started + kSignalGrace);
    return Ok();
  }
  if (::kill(p->pid, sig) < 0) return Error::Errno(fmt::format("kill {} {}", p->pid, sig));
  return Ok();
}

bool ContainerManager::Catches(pid_t pid, int sig) {
  auto status = ReadFile("/proc/" + std::to_string(pid) + "/status");
  if (!status.ok()) return true;  // gone or unreadable: send at once, as before
  size_t at = status->find("SigCgt:");
  if (at == std::string::npos) return true;
  uint64_t mask = std::strtoull(status->c_str() + at + 7, nullptr, 16);
  return (mask >> (sig - 1)) & 1;
}

void ContainerManager::DeferSignal(const std::string& id, pid_t pid, int sig,
                                   std::chrono::steady_clock::time_point until) {
  loop_->AddTimer(std::chrono::milliseconds(20), [this, id, pid, sig, until] {
    auto p = FindProcess(id, "");
    if (!p.ok() || (*p)->pid != pid || (*p)->exit_code) return;  // gone meanwhile
    if (!Catches(pid, sig) && std::chrono::steady_clock::now() < until) {
      return DeferSignal(id, pid, sig, until);
    }
    ::kill(pid, sig);
  });
}

void ContainerManager::Wait(const std::string& id, const std::string& exec_id,
                            std::function<bool()> waiting, Reply<v1::WaitProcessResponse> reply) {
  auto p = FindProcess(id, exec_id);
  if (!p.ok()) return reply(p.error());
  Process* proc = *p;
  if (proc->exit_code) {
    v1::WaitProcessResponse resp;
    resp.set_exit_status(*proc->exit_code);
    *resp.mutable_exited_at() = proc->exited_at;
    return reply(std::move(resp));
  }
  // Drop waiters whose callers gave up, so a poller with short deadlines cannot grow the list.
  std::erase_if(proc->waiters, [](const Process::Waiter& w) { return !w.waiting(); });
  proc->waiters.push_back({std::move(waiting), std::move(reply)});
}

Result<void> ContainerManager::DeleteProcess(const std::string& id, const std::string& exec_id) {
  if (exec_id.empty()) {
    return Error::Invalid("DeleteProcess removes exec processes; remove the container instead");
  }
  PP_ASSIGN_OR_RETURN(auto c, Find(id));
  auto it = c->execs.find(exec_id);
  if (it == c->execs.end())
    return Error::NotFound("exec {} not found in container {}", exec_id, id);
  if (!it->second->exit_code) {
    return Error::Make(Code::kFailedPrecondition, "exec {} in container {} is still running",
                       exec_id, id);
  }
  c->execs.erase(it);
  return Ok();
}

void ContainerManager::Pause(const std::string& id, Reply<void> reply) {
  auto c = Find(id);
  if (!c.ok()) return reply(c.error());
  auto ct = *c;
  if (opts_.cgroup_root.empty()) {
    return reply(Error::Make(Code::kUnimplemented, "pause needs cgroup v2 (not in local mode)"));
  }
  if (ct->status != Container::Status::kRunning || ct->busy) return reply(NotRunning(id, "pause"));
  ct->busy = true;
  RunCommand(loop_, reaper_, Crun({"pause", id}), [ct, reply](Result<std::string> r) {
    ct->busy = false;
    if (!r.ok()) return reply(std::move(r).error().Wrap("pause container " + ct->id));
    if (ct->status == Container::Status::kRunning) ct->status = Container::Status::kPaused;
    reply(Ok());
  });
}

void ContainerManager::Resume(const std::string& id, Reply<void> reply) {
  auto c = Find(id);
  if (!c.ok()) return reply(c.error());
  auto ct = *c;
  if (ct->status != Container::Status::kPaused || ct->busy) {
    return reply(Error::Make(Code::kFailedPrecondition, "container {} is not paused", id));
  }
  ct->busy = true;
  RunCommand(loop_, reaper_, Crun({"resume", id}), [ct, reply](Result<std::string> r) {
    ct->busy = false;
    if (!r.ok()) return reply(std::move(r).error().Wrap("resume container " + ct->id));
    if (ct->status == Container::Status::kPaused) ct->status = Container::Status::kRunning;
    reply(Ok());
  });
}

namespace {

// The guest's memory in bytes (MemTotal), or 0 when /proc/meminfo says nothing.
uint64_t GuestMemoryBytes() {
  std::ifstream in("/proc/meminfo");
  std::string key, unit;
  uint64_t kib = 0;
  while (in >> key >> kib) {
    std::getline(in, unit);
    if (key == "MemTotal:") return kib * 1024;
  }
  return 0;
}

// A limit above what the VM has would never bind: the container could use the whole VM while
// kubelet and `crictl inspect` show the new figure. peapod does not hot-plug memory or CPUs
// yet, so such an update is refused with the figures, and nothing changes.
Result<void> FitsTheVm(const std::string& id, const oci::Resources& res) {
  if (res.memory && res.memory->limit && *res.memory->limit > 0) {
    uint64_t have = GuestMemoryBytes();
    if (have > 0 && static_cast<uint64_t>(*res.memory->limit) > have) {
      return Error::Make(
          Code::kResourceExhausted,
          "update container {}: memory limit {} MiB is more than the pod's VM has ({} MiB); "
          "peapod cannot grow a running VM: give the pod more memory when it is created (pod "
          "resources, or memory_mib in the sandboxer config)",
          id, *res.memory->limit >> 20, have >> 20);
    }
  }
  if (res.cpu && res.cpu->quota && *res.cpu->quota > 0) {
    uint64_t period = res.cpu->period.value_or(100000);
    long cpus = ::sysconf(_SC_NPROCESSORS_ONLN);
    if (period > 0 && cpus > 0 &&
        static_cast<uint64_t>(*res.cpu->quota) > static_cast<uint64_t>(cpus) * period) {
      return Error::Make(
          Code::kResourceExhausted,
          "update container {}: CPU quota {}/{} us ({:.2f} CPUs) is more than the pod's VM has "
          "({} vCPUs); peapod cannot grow a running VM: give the pod more CPUs when it is "
          "created (pod resources, or vcpus/max_vcpus in the sandboxer config)",
          id, *res.cpu->quota, period, static_cast<double>(*res.cpu->quota) / period, cpus);
    }
  }
  return Ok();
}

}  // namespace

void ContainerManager::Update(const std::string& id, const std::string& resources_json,
                              Reply<void> reply) {
  auto c = Find(id);
  if (!c.ok()) return reply(c.error());
  auto ct = *c;
  if (opts_.cgroup_root.empty()) {
    return reply(Error::Make(Code::kUnimplemented, "update needs cgroup v2 (not in local mode)"));
  }
  if (ct->status == Container::Status::kStopped || ct->status == Container::Status::kCreating ||
      ct->busy) {
    return reply(NotRunning(id, "update resources"));
  }
  // Validate through the spec parser: wrap the resources in a minimal spec.
  oci::Json doc;
  try {
    doc = {{"ociVersion", "1.0.2"},
           {"root", {{"path", "/"}}},
           {"linux", {{"resources", oci::Json::parse(resources_json)}}}};
  } catch (const std::exception& e) {
    return reply(Error::Invalid("update container {}: resources are not JSON: {}", id, e.what()));
  }
  auto spec = oci::Spec::FromJson(doc, "resources");
  if (!spec.ok()) return reply(spec.error());
  if (auto fits = FitsTheVm(id, *spec->linux_config()->resources); !fits.ok()) {
    return reply(fits.error());
  }
  const std::string file = ct->dir + "/resources.json";
  if (auto r = WriteFile(file, resources_json); !r.ok()) return reply(r.error());
  ct->busy = true;
  RunCommand(loop_, reaper_, Crun({"update", "--resources=" + file, id}),
             [ct, reply](Result<std::string> r) {
               ct->busy = false;
               if (!r.ok()) return reply(std::move(r).error().Wrap("update container " + ct->id));
               reply(Ok());
             });
}

Result<v1::StatsContainerResponse> ContainerManager::Stats(const std::string& id) {
  if (opts_.cgroup_root.empty()) {
    return Error::Make(Code::kUnimplemented, "stats need cgroup v2 (not in local mode)");
  }
  if (id.empty()) {
    // The whole pod: the cgroup every container lives under.
    v1::StatsContainerResponse resp;
    PP_TRY(ReadCgroupMetrics(opts_.cgroup_root + opts_.cgroup_parent, resp.mutable_metrics()));
    return resp;
  }
  PP_ASSIGN_OR_RETURN(auto c, Find(id));
  if (c->status == Container::Status::kCreating) return NotRunning(id, "read stats");
  v1::StatsContainerResponse resp;
  PP_TRY(ReadCgroupMetrics(CgroupDir(id), resp.mutable_metrics()));
  return resp;
}

Result<v1::ListProcessesResponse> ContainerManager::ListProcesses(const std::string& id) {
  PP_ASSIGN_OR_RETURN(auto c, Find(id));
  v1::ListProcessesResponse resp;
  std::map<pid_t, std::string> exec_of;
  for (const auto& [eid, p] : c->execs) {
    if (!p->exit_code) exec_of[p->pid] = eid;
  }
  std::vector<pid_t> pids;
  if (!opts_.cgroup_root.empty()) {
    auto procs = ReadFile(CgroupDir(id) + "/cgroup.procs");
    if (procs.ok()) {
      std::istringstream ss(*procs);
      pid_t pid;
      while (ss >> pid) pids.push_back(pid);
    }
  } else {
    if (!c->init.exit_code && c->init.pid > 0) pids.push_back(c->init.pid);
    for (const auto& [pid, eid] : exec_of) pids.push_back(pid);
  }
  for (pid_t pid : pids) {
    auto* info = resp.add_processes();
    info->set_pid(static_cast<uint32_t>(pid));
    if (auto it = exec_of.find(pid); it != exec_of.end()) info->set_exec_id(it->second);
  }
  return resp;
}

Result<v1::StateContainerResponse> ContainerManager::State(const std::string& id) {
  PP_ASSIGN_OR_RETURN(auto c, Find(id));
  v1::StateContainerResponse resp;
  switch (c->status) {
    case Container::Status::kCreating:
      resp.set_status(Status::UNKNOWN);
      break;
    case Container::Status::kCreated:
      resp.set_status(Status::CREATED);
      break;
    case Container::Status::kRunning:
      resp.set_status(Status::RUNNING);
      break;
    case Container::Status::kPaused:
      resp.set_status(Status::PAUSED);
      break;
    case Container::Status::kStopped:
      resp.set_status(Status::STOPPED);
      break;
  }
  resp.set_pid(static_cast<uint32_t>(c->init.pid));
  if (c->init.exit_code) {
    resp.set_exit_status(*c->init.exit_code);
    *resp.mutable_exited_at() = c->init.exited_at;
  }
  return resp;
}

void ContainerManager::Remove(const std::string& id, bool force, Reply<void> reply) {
  auto c = Find(id);
  if (!c.ok()) return reply(c.error());
  auto ct = *c;
  if (ct->status == Container::Status::kCreating || ct->busy) {
    return reply(Error::Make(Code::kFailedPrecondition,
                             "container {} is busy (being created or changed); retry", id));
  }
  bool live = ct->status == Container::Status::kRunning || ct->status == Container::Status::kPaused;
  if (live && !force) {
    return reply(Error::Make(Code::kFailedPrecondition,
                             "container {} is running: kill it first, or remove with force", id));
  }
  ct->busy = true;
  const auto t0 = std::chrono::steady_clock::now();
  RunCommand(loop_, reaper_, Crun({"delete", "--force", id}),
             [this, ct, reply, t0](Result<std::string> r) {
               const auto crun_ms = MsSince(t0);
               ct->busy = false;
               if (!r.ok()) {
                 spdlog::warn("agent: {}", r.error().ToString());
                 // crun already forgot it (state dir gone) is fine; anything else is not.
                 if (r.error().message().find("does not exist") == std::string::npos &&
                     r.error().message().find("No such file") == std::string::npos) {
                   return reply(std::move(r).error().Wrap("remove container " + ct->id));
                 }
               }
               Error gone(Code::kNotFound, "container " + ct->id + " was removed");
               ct->init.FailWaiters(gone);
               for (auto& [eid, p] : ct->execs) p->FailWaiters(gone);
               if (ct->oom_wd >= 0 && inotify_) {
                 ::inotify_rm_watch(inotify_.get(), ct->oom_wd);
                 oom_watches_.erase(ct->oom_wd);
               }
               CleanupFailedCreate(ct);
               // crun delete of an exited container is little but crun's own start-up: the
               // figure to set against crun create's.
               spdlog::info("agent: removed container {} (crun delete {} ms)", ct->id, crun_ms);
               reply(Ok());
             });
}

void ContainerManager::WatchOOM(const ContainerPtr& c) {
  if (!inotify_) return;
  std::string events = CgroupDir(c->id) + "/memory.events";
  int wd = ::inotify_add_watch(inotify_.get(), events.c_str(), IN_MODIFY);
  if (wd < 0) {
    spdlog::warn("agent: cannot watch {}: {}", events, std::strerror(errno));
    return;
  }
  c->oom_wd = wd;
  oom_watches_[wd] = c->id;
  c->oom_kills = ReadOOMKills(events).value_or(0);
}

void ContainerManager::OnInotify() {
  alignas(inotify_event) char buf[4096];
  std::set<std::string> changed;
  for (;;) {
    ssize_t n = ::read(inotify_.get(), buf, sizeof(buf));
    if (n <= 0) break;
    for (char* p = buf; p < buf + n;) {
      auto* ev = reinterpret_cast<inotify_event*>(p);
      if (auto it = oom_watches_.find(ev->wd); it != oom_watches_.end()) {
        if (ev->mask & IN_IGNORED) {
          oom_watches_.erase(it);
        } else {
          changed.insert(it->second);
        }
      }
      p += sizeof(inotify_event) + ev->len;
    }
  }
  for (const auto& id : changed) {
    auto it = containers_.find(id);
    if (it == containers_.end()) continue;
    auto kills = ReadOOMKills(CgroupDir(id) + "/memory.events");
    if (!kills || *kills <= it->second->oom_kills) continue;
    it->second->oom_kills = *kills;
    spdlog::info("agent: container {} OOM-killed ({} kills)", id, *kills);
    oom_events_.push_back(id);
  }
  DeliverOOMEvents();
}

void ContainerManager::DeliverOOMEvents() {
  std::erase_if(oom_waiters_, [](const OOMWaiter& w) { return !w.waiting(); });
  for (auto e = oom_events_.begin(); e != oom_events_.end();) {
    auto w = std::find_if(oom_waiters_.begin(), oom_waiters_.end(), [&](const OOMWaiter& w) {
      return w.container_id.empty() || w.container_id == *e;
    });
    if (w == oom_waiters_.end()) {
      ++e;
      continue;
    }
    v1::OOMEvent ev;
    ev.set_container_id(*e);
    auto reply = std::move(w->reply);
    oom_waiters_.erase(w);
    e = oom_events_.erase(e);
    reply(std::move(ev));
  }
  // Kills nobody asks about are not kept forever.
  while (oom_events_.size() > 1024) oom_events_.pop_front();
}

void ContainerManager::NextOOMEvent(const std::string& container_id, std::function<bool()> waiting,
                                    Reply<v1::OOMEvent> reply) {
  oom_waiters_.push_back({container_id, std::move(waiting), std::move(reply)});
  DeliverOOMEvents();
}

Result<OutputStream*> ContainerManager::Output(const std::string& id, const std::string& exec_id,
                                               bool stderr) {
  PP_ASSIGN_OR_RETURN(auto* p, FindProcess(id, exec_id));
  OutputStream* s = stderr ? p->err.get() : p->out.get();
  if (!s) {
    return Error::Make(Code::kFailedPrecondition, "{} of {} has no {}: {}",
                       exec_id.empty() ? "init" : exec_id, id, stderr ? "stderr" : "stdout",
                       p->terminal ? "a terminal process writes everything to stdout"
                                   : "the process is not started yet");
  }
  return s;
}

Result<InputStream*> ContainerManager::Input(const std::string& id, const std::string& exec_id) {
  PP_ASSIGN_OR_RETURN(auto* p, FindProcess(id, exec_id));
  if (!p->in) {
    return Error::Make(Code::kFailedPrecondition, "{} of {} was created without stdin",
                       exec_id.empty() ? "init" : exec_id, id);
  }
  return p->in.get();
}

Result<void> ContainerManager::ResizePty(const v1::ResizePtyRequest& req) {
  PP_ASSIGN_OR_RETURN(auto* p, FindProcess(req.container_id(), req.exec_id()));
  if (!p->console) {
    return Error::Make(Code::kFailedPrecondition, "process has no terminal to resize");
  }
  winsize ws{};
  ws.ws_col = static_cast<unsigned short>(req.width());
  ws.ws_row = static_cast<unsigned short>(req.height());
  if (::ioctl(p->console.get(), TIOCSWINSZ, &ws) < 0) return Error::Errno("TIOCSWINSZ");
  return Ok();
}

void ContainerManager::KillAll() {
  for (auto& [id, c] : containers_) {
    if (!c->init.exit_code && c->init.pid > 0) ::kill(c->init.pid, SIGKILL);
    for (auto& [eid, p] : c->execs) {
      if (!p->exit_code && p->pid > 0) ::kill(p->pid, SIGKILL);
    }
  }
}

}  // namespace peapod::agent
