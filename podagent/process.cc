#include "podagent/process.h"

#include <cpuid.h>
#include <fcntl.h>
#include <sys/personality.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <cstring>
#include <memory>
#include <string_view>

#include <spdlog/spdlog.h>

namespace peapod::agent {

void Reaper::OnExit(pid_t pid, ExitFn fn) {
  if (auto it = unclaimed_.find(pid); it != unclaimed_.end()) {
    int status = it->second;
    unclaimed_.erase(it);
    fn(status);
    return;
  }
  waiters_[pid] = std::move(fn);
}

void Reaper::Reap() {
  for (;;) {
    int status = 0;
    pid_t pid = ::waitpid(-1, &status, WNOHANG);
    if (pid <= 0) return;
    auto it = waiters_.find(pid);
    if (it == waiters_.end()) {
      unclaimed_[pid] = status;
      unclaimed_order_.push_back(pid);
      while (unclaimed_order_.size() > kMaxUnclaimed) {
        unclaimed_.erase(unclaimed_order_.front());
        unclaimed_order_.pop_front();
      }
      continue;
    }
    ExitFn fn = std::move(it->second);
    waiters_.erase(it);
    fn(status);
  }
}

uint32_t ExitCodeFromWaitStatus(int wait_status) {
  if (WIFEXITED(wait_status)) return static_cast<uint32_t>(WEXITSTATUS(wait_status));
  if (WIFSIGNALED(wait_status)) return 128u + static_cast<uint32_t>(WTERMSIG(wait_status));
  return 255;
}

bool UnderTcg() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  // Leaf 1, ECX bit 31: a hypervisor is present; only then does leaf 0x40000000 name it.
  if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 31))) return false;
  __cpuid(0x40000000, a, b, c, d);
  char vendor[13] = {};
  std::memcpy(vendor, &b, 4);
  std::memcpy(vendor + 4, &c, 4);
  std::memcpy(vendor + 8, &d, 4);
  return std::string_view(vendor) == "TCGTCGTCGTCG";
}

Result<pid_t> Spawn(const SpawnOptions& opts) {
  if (opts.argv.empty()) return Error::Invalid("spawn: empty argv");
  // Everything the child touches is prepared before fork: after it, only async-signal-safe calls.
  std::vector<char*> argv;
  for (const auto& a : opts.argv) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  UniqueFd devnull(::open("/dev/null", O_RDWR | O_CLOEXEC));
  if (!devnull) return Error::Errno("open /dev/null");
  const int src[3] = {opts.stdin_fd >= 0 ? opts.stdin_fd : devnull.get(),
                      opts.stdout_fd >= 0 ? opts.stdout_fd : devnull.get(),
                      opts.stderr_fd >= 0 ? opts.stderr_fd : devnull.get()};

  // The persona to run with, computed here: 0xffffffff only reads the current one.
  const int persona = ::personality(0xffffffff);
  const unsigned long fixed =
      static_cast<unsigned long>(persona < 0 ? 0 : persona) | ADDR_NO_RANDOMIZE;

  pid_t pid = ::fork();
  if (pid < 0) return Error::Errno("fork");
  if (pid == 0) {
    sigset_t all;
    sigemptyset(&all);
    ::sigprocmask(SIG_SETMASK, &all, nullptr);
    for (int sig = 1; sig < NSIG; ++sig) ::signal(sig, SIG_DFL);
    // Move the sources out of the way first, so one target cannot clobber another's source.
    int high[3];
    for (int i = 0; i < 3; ++i) {
      high[i] = ::fcntl(src[i], F_DUPFD_CLOEXEC, 10);
      if (high[i] < 0) ::_exit(127);
    }
    for (int i = 0; i < 3; ++i) {
      if (::dup2(high[i], i) < 0) ::_exit(127);
    }
    ::syscall(SYS_close_range, 3u, ~0u, 0u);
    if (opts.fixed_addresses && ::personality(fixed) < 0) ::_exit(127);
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
  return pid;
}

namespace {

// One RunCommand in flight: the exit status and whatever has been read from its pipes.
struct Command : std::enable_shared_from_this<Command> {
  static constexpr size_t kMaxCapture = 64 << 10;

  EventLoop* loop = nullptr;
  std::string name;
  std::function<void(Result<std::string>)> done;
  UniqueFd out, err;
  EventLoop::WatchId out_watch = 0, err_watch = 0;
  std::string out_text, err_text;
  std::optional<int> status;

  Result<void> WatchPipe(UniqueFd& fd, EventLoop::WatchId& watch, std::string& text) {
    if (!fd) return Ok();
    PP_TRY(SetNonBlocking(fd.get()));
    auto self = shared_from_this();
    PP_ASSIGN_OR_RETURN(watch, loop->Watch(fd.get(), EPOLLIN, [self, &fd, &watch, &text](uint32_t) {
      char buf[4096];
      for (;;) {
        ssize_t n = ::read(fd.get(), buf, sizeof(buf));
        if (n > 0) {
          if (text.size() < kMaxCapture) text.append(buf, static_cast<size_t>(n));
          continue;
        }
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) return;
        self->loop->Unwatch(watch);
        watch = 0;
        fd.Reset();
        self->MaybeDone();
        return;
      }
    }));
    return Ok();
  }

  void MaybeDone() {
    if (!status || out || err || !done) return;
    auto fn = std::move(done);
    done = nullptr;
    if (WIFEXITED(*status) && WEXITSTATUS(*status) == 0) {
      fn(std::move(out_text));
      return;
    }
    while (!err_text.empty() && (err_text.back() == '\n' || err_text.back() == ' ')) {
      err_text.pop_back();
    }
    std::string how = WIFEXITED(*status) ? fmt::format("exit status {}", WEXITSTATUS(*status))
                                         : fmt::format("killed by signal {}", WTERMSIG(*status));
    fn(Error::Internal("{} failed ({}){}{}", name, how, err_text.empty() ? "" : ": ", err_text));
  }
};

}  // namespace

void RunCommand(EventLoop* loop, Reaper* reaper, SpawnOptions opts,
                std::function<void(Result<std::string>)> done) {
  auto cmd = std::make_shared<Command>();
  cmd->loop = loop;
  cmd->done = std::move(done);
  for (size_t i = 0; i < opts.argv.size() && i < 3; ++i) {
    cmd->name += (i ? " " : "") + opts.argv[i];
  }
  auto fail = [&](Error e) {
    auto fn = std::move(cmd->done);
    cmd->done = nullptr;
    if (fn) fn(std::move(e).Wrap(cmd->name));
  };
  UniqueFd out_w, err_w;
  for (auto [want, read_end, write_end, slot] :
       {std::tuple{opts.stdout_fd < 0, &cmd->out, &out_w, &opts.stdout_fd},
        std::tuple{opts.stderr_fd < 0, &cmd->err, &err_w, &opts.stderr_fd}}) {
    if (!want) continue;
    int p[2];
    if (::pipe2(p, O_CLOEXEC) < 0) return fail(Error::Errno("pipe"));
    read_end->Reset(p[0]);
    write_end->Reset(p[1]);
    *slot = p[1];
  }
  auto pid = Spawn(opts);
  if (!pid.ok()) return fail(std::move(pid).error());
  out_w.Reset();
  err_w.Reset();
  if (auto r = cmd->WatchPipe(cmd->out, cmd->out_watch, cmd->out_text); !r.ok()) {
    spdlog::warn("agent: {}: {}", cmd->name, r.error().ToString());
    cmd->out.Reset();
  }
  if (auto r = cmd->WatchPipe(cmd->err, cmd->err_watch, cmd->err_text); !r.ok()) {
    spdlog::warn("agent: {}: {}", cmd->name, r.error().ToString());
    cmd->err.Reset();
  }
  reaper->OnExit(*pid, [cmd](int status) {
    cmd->status = status;
    cmd->MaybeDone();
  });
}

}  // namespace peapod::agent
