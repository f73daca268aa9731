#include "tests/sandboxer/fake_backend.h"

#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <thread>
#include <utility>

#include "common/base/unique_fd.h"

namespace peapod::sandboxer::testing {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

struct FakeBackend::Proc {
  std::string name;
  Pidfd pidfd;
  bool exited = false;  // reaped by its watcher (under mu_)
};

FakeBackend::FakeBackend(std::string agent_binary, std::string base_dir)
    : agent_binary_(std::move(agent_binary)), base_dir_(std::move(base_dir)) {}

FakeBackend::~FakeBackend() {
  SetOnStopped(nullptr);
  std::vector<std::thread> watchers;
  {
    std::lock_guard l(mu_);
    for (auto& [name, proc] : procs_) (void)proc->pidfd.Signal(SIGKILL);
    watchers = std::move(watchers_);
  }
  for (auto& t : watchers) t.join();
}

namespace {

// posix_spawn of argv with stdin from /dev/null, stdout and stderr into log_fd, and default
// signal dispositions and an empty mask (whatever the calling thread had).
Result<pid_t> Spawn(const std::vector<std::string>& args, int log_fd) {
  std::vector<char*> argv;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  posix_spawn_file_actions_t fa;
  posix_spawnattr_t attr;
  ::posix_spawn_file_actions_init(&fa);
  ::posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
  ::posix_spawn_file_actions_adddup2(&fa, log_fd, 1);
  ::posix_spawn_file_actions_adddup2(&fa, log_fd, 2);
  ::posix_spawnattr_init(&attr);
  sigset_t none, defaults;
  sigemptyset(&none);
  sigemptyset(&defaults);
  for (int sig : {SIGPIPE, SIGTERM, SIGINT, SIGCHLD}) sigaddset(&defaults, sig);
  ::posix_spawnattr_setsigmask(&attr, &none);
  ::posix_spawnattr_setsigdefault(&attr, &defaults);
  ::posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF);
  pid_t pid = 0;
  int rc = ::posix_spawn(&pid, argv[0], &fa, &attr, argv.data(), environ);
  ::posix_spawn_file_actions_destroy(&fa);
  ::posix_spawnattr_destroy(&attr);
  if (rc != 0) return Error::Errno("spawn " + args[0], rc);
  return pid;
}

}  // namespace

Result<VmInfo> FakeBackend::Start(const VmSpec& spec) {
  bool kill_now = false;
  std::vector<std::string> wrap;
  {
    std::lock_guard l(mu_);
    ++start_calls_;
    if (fail_next_) {
      Error e = std::move(*fail_next_);
      fail_next_.reset();
      return e;
    }
    if (procs_.count(spec.name)) {
      return Error::Make(Code::kAlreadyExists, "fake VM {} is already running", spec.name);
    }
    kill_now = std::exchange(kill_next_, false);
    wrap = std::exchange(wrap_next_, {});
  }
  if (spec.name.empty() || spec.agent_socket.empty()) {
    return Error::Invalid("fake VM spec needs a name and an agent socket");
  }
  std::string run_dir = base_dir_ + "/" + spec.name;
  std::string log =
      spec.console_log.empty() ? base_dir_ + "/" + spec.name + ".log" : spec.console_log;
  std::error_code ec;
  fs::create_directories(run_dir, ec);
  if (ec) return Error::Errno("mkdir " + run_dir, ec.value());
  fs::create_directories(fs::path(log).parent_path(), ec);
  fs::remove(spec.agent_socket, ec);  // a stale socket would look like a listening agent
  UniqueFd log_fd(::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644));
  if (!log_fd) return Error::Errno("open " + log);
  std::vector<std::string> argv = {
      agent_binary_, "--listen", spec.agent_socket, "--run-dir", run_dir, "--log-level", "debug"};
  argv.insert(argv.begin(), wrap.begin(), wrap.end());
  PP_ASSIGN_OR_RETURN(pid_t pid, Spawn(argv, log_fd.get()));
  auto pidfd = Pidfd::Open(pid);
  if (!pidfd.ok()) {
    ::kill(pid, SIGKILL);
    ::waitpid(pid, nullptr, 0);
    return std::move(pidfd).error();
  }
  // Up once the socket accepts (the agent listens only after its setup).
  auto deadline = std::chrono::steady_clock::now() + 30s;
  for (;;) {
    if (ConnectUnix(spec.agent_socket).ok()) break;
    auto st = pidfd->Wait(/*nohang=*/true);
    if (!st.ok() || *st) {
      return Error::Make(Code::kUnavailable, "fake VM {}: the agent exited (status {}); see {}",
                         spec.name, st.ok() ? **st : -1, log);
    }
    if (std::chrono::steady_clock::now() > deadline) {
      (void)pidfd->Signal(SIGKILL);
      (void)pidfd->Wait();
      return Error::Make(Code::kDeadlineExceeded, "fake VM {}: the agent did not listen; see {}",
                         spec.name, log);
    }
    std::this_thread::sleep_for(5ms);
  }
  auto proc = std::make_shared<Proc>();
  proc->name = spec.name;
  proc->pidfd = std::move(*pidfd);
  {
    std::lock_guard l(mu_);
    procs_[spec.name] = proc;
    logs_[spec.name] = log;
    watchers_.emplace_back([this, proc] { Watch(proc); });
  }
  if (kill_now) KillAndReap(spec.name);
  return VmInfo{spec.name, pid};
}

void FakeBackend::Watch(std::shared_ptr<Proc> proc) {
  (void)proc->pidfd.Wait();  // an error (none expected) counts as gone too
  {
    std::lock_guard l(mu_);
    proc->exited = true;
    auto it = procs_.find(proc->name);
    if (it != procs_.end() && it->second == proc) procs_.erase(it);
  }
  exited_cv_.notify_all();
  std::lock_guard l(cb_mu_);
  if (on_stopped_) on_stopped_(proc->name);
}

bool FakeBackend::KillAndReap(const std::string& name) {
  std::unique_lock l(mu_);
  auto it = procs_.find(name);
  if (it == procs_.end()) return false;
  auto proc = it->second;
  (void)proc->pidfd.Signal(SIGKILL);  // ESRCH once reaped: fine
  exited_cv_.wait(l, [&] { return proc->exited; });
  return true;
}

Result<void> FakeBackend::Destroy(const std::string& name) {
  std::chrono::milliseconds delay;
  {
    std::lock_guard l(mu_);
    delay = std::exchange(destroy_delay_, std::chrono::milliseconds(0));
  }
  std::this_thread::sleep_for(delay);
  KillAndReap(name);
  std::lock_guard l(mu_);
  ++destroy_calls_;
  return Ok();
}

Result<void> FakeBackend::AttachDisk(const std::string& name, const DiskSpec& disk) {
  return Error::Make(Code::kUnimplemented, "fake VM {}: no disks ({})", name, disk.path);
}

Result<void> FakeBackend::DetachDisk(const std::string& name, const DiskSpec& disk) {
  return Error::Make(Code::kUnimplemented, "fake VM {}: no disks ({})", name, disk.path);
}

Result<std::vector<VmInfo>> FakeBackend::List() {
  std::lock_guard l(mu_);
  std::vector<VmInfo> out;
  for (const auto& [name, proc] : procs_) {
    if (!proc->exited) out.push_back({name, proc->pidfd.pid()});
  }
  return out;
}

void FakeBackend::SetOnStopped(std::function<void(const std::string&)> cb) {
  std::lock_guard l(cb_mu_);
  on_stopped_ = std::move(cb);
}

void FakeBackend::FailNextStart(Error e) {
  std::lock_guard l(mu_);
  fail_next_ = std::move(e);
}

void FakeBackend::WrapNextAgent(std::vector<std::string> prefix) {
  std::lock_guard l(mu_);
  wrap_next_ = std::move(prefix);
}

void FakeBackend::KillAfterNextStart() {
  std::lock_guard l(mu_);
  kill_next_ = true;
}

bool FakeBackend::Kill(const std::string& name) { return KillAndReap(name); }

std::optional<pid_t> FakeBackend::PidOf(const std::string& name) {
  std::lock_guard l(mu_);
  auto it = procs_.find(name);
  if (it == procs_.end()) return std::nullopt;
  return it->second->pidfd.pid();
}

void FakeBackend::DelayNextDestroy(std::chrono::milliseconds d) {
  std::lock_guard l(mu_);
  destroy_delay_ = d;
}

size_t FakeBackend::destroy_calls() {
  std::lock_guard l(mu_);
  return destroy_calls_;
}

size_t FakeBackend::start_calls() {
  std::lock_guard l(mu_);
  return start_calls_;
}

std::string FakeBackend::LogPath(const std::string& name) {
  std::lock_guard l(mu_);
  auto it = logs_.find(name);
  return it == logs_.end() ? base_dir_ + "/" + name + ".log" : it->second;
}

}  // namespace peapod::sandboxer::testing
