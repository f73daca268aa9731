#include "podagent/exec.h"

#include <fcntl.h>
#include <linux/capability.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sys/personality.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstring>
#include <map>
#include <memory>
#include <sstream>

#include <spdlog/spdlog.h>

#include "common/base/files.h"

namespace peapod::agent {
namespace {

// The kernel's capability numbers (linux/capability.h), by the names specs use.
constexpr const char* kCapNames[] = {"CAP_CHOWN",
                                     "CAP_DAC_OVERRIDE",
                                     "CAP_DAC_READ_SEARCH",
                                     "CAP_FOWNER",
                                     "CAP_FSETID",
                                     "CAP_KILL",
                                     "CAP_SETGID",
                                     "CAP_SETUID",
                                     "CAP_SETPCAP",
                                     "CAP_LINUX_IMMUTABLE",
                                     "CAP_NET_BIND_SERVICE",
                                     "CAP_NET_BROADCAST",
                                     "CAP_NET_ADMIN",
                                     "CAP_NET_RAW",
                                     "CAP_IPC_LOCK",
                                     "CAP_IPC_OWNER",
                                     "CAP_SYS_MODULE",
                                     "CAP_SYS_RAWIO",
                                     "CAP_SYS_CHROOT",
                                     "CAP_SYS_PTRACE",
                                     "CAP_SYS_PACCT",
                                     "CAP_SYS_ADMIN",
                                     "CAP_SYS_BOOT",
                                     "CAP_SYS_NICE",
                                     "CAP_SYS_RESOURCE",
                                     "CAP_SYS_TIME",
                                     "CAP_SYS_TTY_CONFIG",
                                     "CAP_MKNOD",
                                     "CAP_LEASE",
                                     "CAP_AUDIT_WRITE",
                                     "CAP_AUDIT_CONTROL",
                                     "CAP_SETFCAP",
                                     "CAP_MAC_OVERRIDE",
                                     "CAP_MAC_ADMIN",
                                     "CAP_SYSLOG",
                                     "CAP_WAKE_ALARM",
                                     "CAP_BLOCK_SUSPEND",
                                     "CAP_AUDIT_READ",
                                     "CAP_PERFMON",
                                     "CAP_BPF",
                                     "CAP_CHECKPOINT_RESTORE"};

// crun warns about a capability name it does not know and goes on without it: so does this.
uint64_t CapMask(const std::vector<std::string>& names) {
  uint64_t mask = 0;
  for (const auto& n : names) {
    for (size_t i = 0; i < std::size(kCapNames); ++i) {
      if (n == kCapNames[i]) mask |= uint64_t{1} << i;
    }
  }
  return mask;
}

std::optional<int> RlimitOf(std::string_view name) {
  static const std::map<std::string_view, int> kRlimits = {{"RLIMIT_AS", RLIMIT_AS},
                                                           {"RLIMIT_CORE", RLIMIT_CORE},
                                                           {"RLIMIT_CPU", RLIMIT_CPU},
                                                           {"RLIMIT_DATA", RLIMIT_DATA},
                                                           {"RLIMIT_FSIZE", RLIMIT_FSIZE},
                                                           {"RLIMIT_LOCKS", RLIMIT_LOCKS},
                                                           {"RLIMIT_MEMLOCK", RLIMIT_MEMLOCK},
                                                           {"RLIMIT_MSGQUEUE", RLIMIT_MSGQUEUE},
                                                           {"RLIMIT_NICE", RLIMIT_NICE},
                                                           {"RLIMIT_NOFILE", RLIMIT_NOFILE},
                                                           {"RLIMIT_NPROC", RLIMIT_NPROC},
                                                           {"RLIMIT_RSS", RLIMIT_RSS},
                                                           {"RLIMIT_RTPRIO", RLIMIT_RTPRIO},
                                                           {"RLIMIT_RTTIME", RLIMIT_RTTIME},
                                                           {"RLIMIT_SIGPENDING", RLIMIT_SIGPENDING},
                                                           {"RLIMIT_STACK", RLIMIT_STACK}};
  auto it = kRlimits.find(name);
  if (it == kRlimits.end()) return std::nullopt;
  return it->second;
}

// What the child reports on the status pipe: the pid it forked into the container's PID
// namespace, or the step that failed and its errno. Fixed size, so a read gets whole messages.
struct Message {
  int32_t kind;  // kPid or kFailed
  int32_t step;
  int32_t err;
  int32_t pid;
};
enum : int32_t { kPid = 1, kFailed = 2 };
enum Step : int32_t {
  kStepFds,
  kStepRlimit,
  kStepCgroup,
  kStepSetns,
  kStepFork,
  kStepStdio,
  kStepNotFound,
  kStepPersonality,
  kStepSeccomp,
  kStepGroups,
  kStepBounding,
  kStepIds,
  kStepCaps,
  kStepNoNewPrivs,
  kStepChdir,
  kStepExec,
};

std::string StepText(int32_t step, const ExecPlan& plan) {
  switch (step) {
    case kStepFds:
      return "close the agent's descriptors";
    case kStepRlimit:
      return "set the process's rlimits";
    case kStepCgroup:
      return "join the container's cgroup";
    case kStepSetns:
      return "join the container's namespaces";
    case kStepFork:
      return "fork into the container's PID namespace";
    case kStepStdio:
      return "set up stdio";
    case kStepNotFound:
      return fmt::format("executable file `{}` not found in $PATH", plan.argv[0]);
    case kStepPersonality:
      return "set the container's persona";
    case kStepSeccomp:
      return "load the container's seccomp filter";
    case kStepGroups:
      return "set the additional groups";
    case kStepBounding:
      return "drop capabilities from the bounding set";
    case kStepIds:
      return fmt::format("become uid {} gid {}", plan.uid, plan.gid);
    case kStepCaps:
      return "set the capabilities";
    case kStepNoNewPrivs:
      return "set no_new_privs";
    case kStepChdir:
      return fmt::format("chdir to `{}`", plan.cwd);
    case kStepExec:
      return fmt::format("exec `{}`", plan.argv[0]);
    default:
      return "start the process";
  }
}

// Pointers into the plan, made before the fork: the child only reads them and makes syscalls.
struct ChildArgs {
  const ExecPlan* plan;
  char* const* argv;
  char* const* envp;
  const std::vector<const char*>* candidates;
  char* home;  // "HOME=" and room after it, the last entry of envp; null: HOME is set
  size_t home_size;
  std::array<int, 3> stdio;
  std::array<bool, 3> own_stdio;  // given by the caller (not /dev/null)
  int status_fd;
  const std::vector<int>* keep;  // sorted: every other descriptor is closed first
  const sock_fprog* seccomp;
  const __user_cap_data_struct* cap_data;  // [2]
};

// The home directory of uid in /etc/passwd, into slot (after its "HOME="), or "/" as crun
// has it. Runs in the child, inside the container's root and still as root (as crun's lookup):
// the file is the container's, so it is read with a fixed buffer, at most 1 MiB of it, only if
// it is a regular file, and without blocking on it; a line longer than the buffer is skipped.
void FindHome(uid_t uid, char* slot, size_t slot_size) {
  const size_t at = 5;  // after "HOME="
  slot[at] = '/';
  slot[at + 1] = 0;
  int fd = ::open("/etc/passwd", O_RDONLY | O_NONBLOCK | O_CLOEXEC | O_NOCTTY);
  if (fd < 0) return;
  struct stat sb {};
  if (::fstat(fd, &sb) < 0 || !S_ISREG(sb.st_mode)) {
    ::close(fd);
    return;
  }
  char buf[4096];
  size_t have = 0, total = 0;
  bool eof = false, skipping = false;  // skipping: in the rest of an over-long line
  for (;;) {
    if (!eof && have < sizeof(buf)) {
      ssize_t n = total < (1u << 20) ? ::read(fd, buf + have, sizeof(buf) - have) : 0;
      if (n <= 0) {
        eof = true;
      } else {
        have += static_cast<size_t>(n);
        total += static_cast<size_t>(n);
      }
    }
    if (have == 0) break;
    char* nl = static_cast<char*>(std::memchr(buf, '\n', have));
    if (!nl && !eof && have < sizeof(buf)) continue;  // read more of this line
    size_t len = nl ? static_cast<size_t>(nl - buf) : have;
    if (!skipping && (nl || eof)) {
      // name:password:uid:gid:gecos:home:shell
      const char* field[7] = {};
      size_t flen[7] = {};
      size_t k = 0, start = 0;
      for (size_t i = 0; i <= len && k < 7; ++i) {
        if (i == len || buf[i] == ':') {
          field[k] = buf + start;
          flen[k++] = i - start;
          start = i + 1;
        }
      }
      uint64_t value = 0;
      bool numeric = k >= 6 && flen[2] > 0 && flen[2] < 11;
      for (size_t i = 0; numeric && i < flen[2]; ++i) {
        if (field[2][i] < '0' || field[2][i] > '9') numeric = false;
        value = value * 10 + static_cast<uint64_t>(field[2][i] - '0');
      }
      if (numeric && value == uid && flen[5] > 0 && flen[5] < slot_size - at) {
        std::memcpy(slot + at, field[5], flen[5]);
        slot[at + flen[5]] = 0;
        break;
      }
    }
    // A full buffer with no newline: the line is too long; drop what we have of it.
    skipping = !nl && !eof;
    size_t used = nl ? len + 1 : have;
    std::memmove(buf, buf + used, have - used);
    have -= used;
  }
  ::close(fd);
}

[[noreturn]] void Fail(int status_fd, Step step, int err) {
  Message m{kFailed, step, err, 0};
  (void)!::write(status_fd, &m, sizeof(m));
  ::_exit(127);
}

bool ApplySeccomp(const ChildArgs& a) {
  if (::syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, a.plan->seccomp_flags, a.seccomp) == 0) {
    return true;
  }
  // As crun: a flag this kernel does not know is dropped rather than failing the exec.
  return errno == EINVAL && ::syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0u, a.seccomp) == 0;
}

[[noreturn]] void RunChild(const ChildArgs& a) {
  const ExecPlan& p = *a.plan;
  const int st = a.status_fd;
  // Nothing of the agent's goes into the container: not even until the exec.
  unsigned lo = 3;
  for (int fd : *a.keep) {
    auto ufd = static_cast<unsigned>(fd);
    if (ufd > lo && ::syscall(SYS_close_range, lo, ufd - 1, 0u) < 0) Fail(st, kStepFds, errno);
    lo = std::max(lo, ufd + 1);
  }
  if (::syscall(SYS_close_range, lo, ~0u, 0u) < 0) Fail(st, kStepFds, errno);
  sigset_t none;
  sigemptyset(&none);
  ::sigprocmask(SIG_SETMASK, &none, nullptr);
  for (int sig = 1; sig < NSIG; ++sig) ::signal(sig, SIG_DFL);
  // Not dumpable while it holds the agent's view: the container's processes cannot ptrace it.
  ::prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
  for (const auto& [resource, limit] : p.rlimits) {
    if (::setrlimit(static_cast<__rlimit_resource_t>(resource), &limit) < 0) {
      Fail(st, kStepRlimit, errno);
    }
  }
  if (p.cgroup_procs && ::write(p.cgroup_procs.get(), "0", 1) != 1) Fail(st, kStepCgroup, errno);
  for (const auto& ns : p.namespaces) {
    if (::setns(ns.get(), 0) < 0) Fail(st, kStepSetns, errno);
  }
  // A session of its own (as crun): otherwise the process would share the agent's process
  // group, and kill(0, ...) from it would signal the agent and every other exec.
  if (::setsid() < 0) Fail(st, kStepSetns, errno);
  if (p.joins_pid_ns) {
    pid_t child = ::fork();
    if (child < 0) Fail(st, kStepFork, errno);
    if (child > 0) {
      Message m{kPid, 0, 0, child};
      (void)!::write(st, &m, sizeof(m));
      ::_exit(0);
    }
  }
  // stdio: the sources moved out of the way first, so one target cannot clobber another's.
  int high[3];
  for (int i = 0; i < 3; ++i) {
    high[i] = ::fcntl(a.stdio[i], F_DUPFD_CLOEXEC, 10);
    if (high[i] < 0) Fail(st, kStepStdio, errno);
  }
  for (int i = 0; i < 3; ++i) {
    if (::dup2(high[i], i) < 0) Fail(st, kStepStdio, errno);
  }
  const bool chdir_done = ::chdir(p.cwd.c_str()) == 0;
  const char* exe = nullptr;
  int last_error = ENOENT;
  for (const char* c : *a.candidates) {
    struct stat sb {};
    if (::stat(c, &sb) == 0 && S_ISREG(sb.st_mode) && ::access(c, X_OK) == 0) {
      exe = c;
      break;
    }
    if (errno != ENOENT) last_error = errno;
  }
  if (!exe) Fail(st, kStepNotFound, last_error);
  if (a.home) FindHome(p.uid, a.home, a.home_size);
  if (::personality(p.persona) < 0) Fail(st, kStepPersonality, errno);
  // Everything left (the status pipe, the namespaces' and cgroup's descriptors) closes at exec.
  if (::syscall(SYS_close_range, 3u, ~0u, CLOSE_RANGE_CLOEXEC) < 0) Fail(st, kStepFds, errno);
  if (!p.no_new_privs && !p.seccomp.empty() && !ApplySeccomp(a)) Fail(st, kStepSeccomp, errno);
  if (::syscall(SYS_setgroups, p.groups.size(), p.groups.data()) < 0) {
    Fail(st, kStepGroups, errno);
  }
  // The process's own pipes become its user's, as crun does (so it can reopen them through
  // /proc/self/fd); /dev/null stays root's.
  for (int i = 0; i < 3; ++i) {
    if (!a.own_stdio[i]) continue;
    if (::fchown(i, p.uid, p.gid) < 0 && errno != EINVAL && errno != EPERM && errno != EROFS) {
      Fail(st, kStepStdio, errno);
    }
  }
  for (int cap = 0; cap <= p.last_cap; ++cap) {
    if ((p.caps[ExecPlan::kBounding] >> cap) & 1) continue;
    if (::prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 && errno != EINVAL) {
      Fail(st, kStepBounding, errno);
    }
  }
  if (::prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0) < 0) Fail(st, kStepIds, errno);
  if (::syscall(SYS_setresgid, p.gid, p.gid, p.gid) < 0) Fail(st, kStepIds, errno);
  if (::syscall(SYS_setresuid, p.uid, p.uid, p.uid) < 0) Fail(st, kStepIds, errno);
  __user_cap_header_struct hdr{_LINUX_CAPABILITY_VERSION_3, 0};
  if (::syscall(SYS_capset, &hdr, a.cap_data) < 0) Fail(st, kStepCaps, errno);
  // Still not dumpable with its new ids, until the exec.
  ::prctl(PR_SET_DUMPABLE, 0, 0, 0, 0);
  if (::prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) < 0 && errno != EINVAL &&
      errno != EPERM) {
    Fail(st, kStepCaps, errno);
  }
  for (int cap = 0; cap <= p.last_cap; ++cap) {
    if (!((p.caps[ExecPlan::kAmbient] >> cap) & 1)) continue;
    if (::prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_RAISE, cap, 0, 0) < 0 && errno != EINVAL &&
        errno != EPERM) {
      Fail(st, kStepCaps, errno);
    }
  }
  if (p.no_new_privs && ::prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0) {
    Fail(st, kStepNoNewPrivs, errno);
  }
  if (!chdir_done && ::chdir(p.cwd.c_str()) < 0) Fail(st, kStepChdir, errno);
  if (p.no_new_privs && !p.seccomp.empty() && !ApplySeccomp(a)) Fail(st, kStepSeccomp, errno);
  ::umask(p.umask);
  ::execve(exe, a.argv, a.envp);
  Fail(st, kStepExec, errno);
}

// Reads the child's status pipe on the loop until it closes (at exec, or when the child dies).
struct Waiting {
  EventLoop* loop;
  Reaper* reaper;
  ExecPlan plan;
  pid_t child = 0;
  UniqueFd status;
  EventLoop::WatchId watch = 0;
  std::string bytes;
  std::function<void(Result<pid_t>)> done;

  // A child stopped (SIGSTOP from the container, a frozen cgroup) before its exec would hold
  // the exec, and its descriptors, forever: it gets this long.
  static constexpr std::chrono::seconds kDeadline{30};

  void Expire() {
    if (!status) return;  // finished
    loop->Unwatch(watch);
    status.Reset();
    ::kill(child, SIGKILL);
    Message m{};
    for (size_t at = 0; at + sizeof(m) <= bytes.size(); at += sizeof(m)) {
      std::memcpy(&m, bytes.data() + at, sizeof(m));
      if (m.kind == kPid && m.pid > 0) {
        ::kill(m.pid, SIGKILL);
        reaper->OnExit(m.pid, [](int) {});
        break;
      }
    }
    reaper->OnExit(child, [](int) {});
    auto fn = std::move(done);
    fn(Error::Make(Code::kDeadlineExceeded,
                   "the exec's set-up did not reach its exec in {} s (stopped or frozen?): killed",
                   kDeadline.count()));
  }

  void Read() {
    char buf[256];
    for (;;) {
      ssize_t n = ::read(status.get(), buf, sizeof(buf));
      if (n > 0) {
        if (bytes.size() < 4 * sizeof(Message)) bytes.append(buf, static_cast<size_t>(n));
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && errno == EAGAIN) return;
      break;
    }
    loop->Unwatch(watch);
    status.Reset();
    Finish();
  }

  void Finish() {
    pid_t forked = 0;
    std::optional<Message> failed;
    for (size_t at = 0; at + sizeof(Message) <= bytes.size(); at += sizeof(Message)) {
      Message m;
      std::memcpy(&m, bytes.data() + at, sizeof(m));
      if (m.kind == kPid && m.pid > 0 && forked == 0) forked = m.pid;
      if (m.kind == kFailed && !failed) failed = m;
    }
    // The exit of the first child is nobody's business when it only forked the process, or
    // failed; the process's own exit is its caller's (through the reaper's unclaimed exits).
    auto fn = std::move(done);
    if (plan.joins_pid_ns || failed) reaper->OnExit(child, [](int) {});
    if (failed) {
      if (forked > 0) reaper->OnExit(forked, [](int) {});
      return fn(Error::Errno(StepText(failed->step, plan), failed->err));
    }
    if (plan.joins_pid_ns && forked <= 0) {
      return fn(Error::Internal("the exec's first process ended before it forked the process"));
    }
    fn(plan.joins_pid_ns ? forked : child);
  }
};

}  // namespace

Result<std::optional<ExecPlan>> PlanExec(const oci::Spec& spec, const oci::Process& process,
                                         std::string_view process_json, pid_t init_pid,
                                         bool container_may_ptrace, const std::string& crun_state,
                                         const std::string& cgroup_dir, std::string* why) {
  auto crun = [why](std::string reason) -> Result<std::optional<ExecPlan>> {
    *why = std::move(reason);
    return std::optional<ExecPlan>();
  };
  if (process.terminal) return crun("a terminal");
  auto raw = oci::Json::parse(process_json, nullptr, false);
  if (raw.is_discarded() || !raw.is_object())
    return Error::Invalid("exec process is not a JSON object");
  for (const char* field : {"scheduler", "ioPriority", "execCPUAffinity"}) {
    if (raw.contains(field)) return crun(fmt::format("process.{}", field));
  }
  const auto& linux_config = spec.linux_config();
  if (linux_config && linux_config->FindNamespace(oci::NamespaceType::kUser)) {
    return crun("a user namespace");
  }
  ExecPlan plan;
  plan.argv = process.args;
  plan.cwd = process.cwd.empty() ? "/" : process.cwd;
  plan.uid = process.user.uid;
  plan.gid = process.user.gid;
  plan.groups.assign(process.user.additional_gids.begin(), process.user.additional_gids.end());
  plan.umask = static_cast<mode_t>(process.user.umask.value_or(022));
  plan.no_new_privs = process.no_new_privileges;

  // The environment: the process's, or the container's when it has none (crun); one entry per
  // key, the last value at the first one's place; HOME from the container's passwd if unset.
  const auto& env_in = !process.env.empty() || !spec.process() ? process.env : spec.process()->env;
  std::map<std::string, size_t> at;
  for (const auto& e : env_in) {
    auto eq = e.find('=');
    if (eq == std::string::npos) continue;
    auto [it, fresh] = at.emplace(e.substr(0, eq), plan.env.size());
    if (fresh) {
      plan.env.push_back(e);
    } else {
      plan.env[it->second] = e;
    }
  }
  plan.home_from_passwd = !at.count("HOME");

  // Where the executable may be: as crun 1.8's find_executable looks for it.
  const std::string& name = plan.argv[0];
  if (name[0] == '/') {
    plan.candidates.push_back(name);
  } else if (name[0] == '.' || name.find('/') != std::string::npos) {
    plan.candidates.push_back((plan.cwd[0] == '/' ? "" : "/") + plan.cwd + "/" + name);
  } else {
    std::string path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
    if (auto it = at.find("PATH"); it != at.end()) path = plan.env[it->second].substr(5);
    std::istringstream dirs(path + ":");
    for (std::string dir; std::getline(dirs, dir, ':');) {
      plan.candidates.push_back((dir.empty() ? "." : dir) + "/" + name);
    }
  }

  const oci::Capabilities* caps = process.capabilities ? &*process.capabilities : nullptr;
  if (!caps && spec.process() && spec.process()->capabilities) {
    caps = &*spec.process()->capabilities;
  }
  // Until its exec the child is a copy of the agent, whose memory holds every container's spec
  // and environment. Not dumpable, it is out of reach of the container's processes, except of
  // one with CAP_SYS_PTRACE: where the container may have one, crun starts the exec (crun's
  // child holds only crun's memory).
  auto ptrace_in = [](const oci::Capabilities* c) {
    return c &&
           std::find(c->bounding.begin(), c->bounding.end(), "CAP_SYS_PTRACE") != c->bounding.end();
  };
  if (container_may_ptrace || ptrace_in(caps) ||
      (spec.process() && spec.process()->capabilities &&
       ptrace_in(&*spec.process()->capabilities))) {
    return crun("CAP_SYS_PTRACE in the container's bounding set");
  }
  if (caps) {
    plan.caps[ExecPlan::kBounding] = CapMask(caps->bounding);
    plan.caps[ExecPlan::kEffective] = CapMask(caps->effective);
    plan.caps[ExecPlan::kPermitted] = CapMask(caps->permitted);
    plan.caps[ExecPlan::kInheritable] = CapMask(caps->inheritable);
    plan.caps[ExecPlan::kAmbient] = CapMask(caps->ambient);
  }
  if (auto last = ReadFile("/proc/sys/kernel/cap_last_cap"); last.ok()) {
    plan.last_cap = std::clamp(std::atoi(last->c_str()), 0, 63);
  }
  for (const auto& r : process.rlimits) {
    auto resource = RlimitOf(r.type);
    if (!resource) return crun("rlimit " + r.type);
    plan.rlimits.push_back({*resource, rlimit{r.soft, r.hard}});
  }

  const auto& doc = spec.doc();
  const oci::Json no_linux = oci::Json::object();
  const auto& linux_doc =
      doc.contains("linux") && doc["linux"].is_object() ? doc["linux"] : no_linux;
  if (linux_doc.contains("personality") && linux_doc["personality"].is_object() &&
      linux_doc["personality"].value("domain", "") == "LINUX32") {
    plan.persona = PER_LINUX32;
  }
  if (linux_doc.contains("seccomp") && !linux_doc["seccomp"].is_null()) {
    const auto& sc = linux_doc["seccomp"];
    if (!sc.value("listenerPath", "").empty()) return crun("a seccomp notify listener");
    // crun compiled the filter at create and keeps it in its state for its own execs.
    auto bpf = ReadFile(crun_state + "/seccomp.bpf");
    if (!bpf.ok()) return crun("no compiled seccomp filter in crun's state");
    if (bpf->empty() || bpf->size() % sizeof(sock_filter) != 0 ||
        bpf->size() > BPF_MAXINSNS * sizeof(sock_filter)) {
      return crun("a compiled seccomp filter of an unexpected size");
    }
    plan.seccomp = std::move(*bpf);
    plan.seccomp_flags = SECCOMP_FILTER_FLAG_SPEC_ALLOW;
    if (sc.contains("flags") && sc["flags"].is_array() && !sc["flags"].empty()) {
      plan.seccomp_flags = 0;
      for (const auto& f : sc["flags"]) {
        std::string flag = f.is_string() ? f.get<std::string>() : "";
        if (flag == "SECCOMP_FILTER_FLAG_TSYNC") {
          plan.seccomp_flags |= SECCOMP_FILTER_FLAG_TSYNC;
        } else if (flag == "SECCOMP_FILTER_FLAG_SPEC_ALLOW") {
          plan.seccomp_flags |= SECCOMP_FILTER_FLAG_SPEC_ALLOW;
        } else if (flag == "SECCOMP_FILTER_FLAG_LOG") {
          plan.seccomp_flags |= SECCOMP_FILTER_FLAG_LOG;
        } else {
          return crun("seccomp flag " + f.dump());
        }
      }
    }
  }

  // The init's namespaces that are not the agent's own; the mount namespace last (after it,
  // paths mean the container's).
  for (const char* ns : {"cgroup", "ipc", "uts", "net", "time", "pid", "mnt"}) {
    std::string path = fmt::format("/proc/{}/ns/{}", init_pid, ns);
    UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd && errno == ENOENT && std::string_view(ns) == "time" &&
        ::access(fmt::format("/proc/{}", init_pid).c_str(), F_OK) == 0) {
      continue;  // a kernel without time namespaces
    }
    if (!fd) {
      return Error::Make(Code::kFailedPrecondition, "the container's init (pid {}) is gone: {}",
                         init_pid, Error::Errno("open " + path).message());
    }
    struct stat theirs {
    }, ours{};
    if (::fstat(fd.get(), &theirs) < 0) return Error::Errno("stat " + path);
    if (::stat(fmt::format("/proc/self/ns/{}", ns).c_str(), &ours) == 0 &&
        ours.st_ino == theirs.st_ino && ours.st_dev == theirs.st_dev) {
      continue;
    }
    if (std::string_view(ns) == "pid") plan.joins_pid_ns = true;
    plan.namespaces.push_back(std::move(fd));
  }
  if (!cgroup_dir.empty()) {
    std::string procs = cgroup_dir + "/cgroup.procs";
    plan.cgroup_procs.Reset(::open(procs.c_str(), O_WRONLY | O_CLOEXEC));
    if (!plan.cgroup_procs) return Error::Errno("open " + procs);
  }
  return std::optional<ExecPlan>(std::move(plan));
}

void StartExec(EventLoop* loop, Reaper* reaper, ExecPlan plan, std::array<int, 3> stdio,
               std::function<void(Result<pid_t>)> done) {
  auto w = std::make_shared<Waiting>();
  w->loop = loop;
  w->reaper = reaper;
  w->plan = std::move(plan);
  w->done = std::move(done);
  const ExecPlan& p = w->plan;

  std::vector<char*> argv, envp;
  for (const auto& a : p.argv) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  for (const auto& e : p.env) envp.push_back(const_cast<char*>(e.c_str()));
  std::vector<char> home;
  if (p.home_from_passwd) {
    home.assign(5 + 4096 + 1, 0);
    std::memcpy(home.data(), "HOME=", 5);
    envp.push_back(home.data());
  }
  envp.push_back(nullptr);
  std::vector<const char*> candidates;
  for (const auto& c : p.candidates) candidates.push_back(c.c_str());
  UniqueFd devnull(::open("/dev/null", O_RDWR | O_CLOEXEC));
  if (!devnull) return w->done(Error::Errno("open /dev/null"));
  std::array<bool, 3> own_stdio{};
  for (size_t i = 0; i < 3; ++i) {
    own_stdio[i] = stdio[i] >= 0;
    if (stdio[i] < 0) stdio[i] = devnull.get();
  }
  int fds[2];
  if (::pipe2(fds, O_CLOEXEC) < 0) return w->done(Error::Errno("pipe"));
  w->status.Reset(fds[0]);
  UniqueFd status_w(fds[1]);
  std::vector<int> keep = {stdio[0], stdio[1], stdio[2], devnull.get(), status_w.get()};
  for (const auto& ns : p.namespaces) keep.push_back(ns.get());
  if (p.cgroup_procs) keep.push_back(p.cgroup_procs.get());
  std::sort(keep.begin(), keep.end());
  keep.erase(std::unique(keep.begin(), keep.end()), keep.end());
  sock_fprog prog{};
  prog.len = static_cast<unsigned short>(p.seccomp.size() / sizeof(sock_filter));
  prog.filter = reinterpret_cast<sock_filter*>(const_cast<char*>(p.seccomp.data()));
  __user_cap_data_struct cap_data[2] = {};
  auto split = [](uint64_t mask, __u32& low, __u32& high) {
    low = static_cast<__u32>(mask);
    high = static_cast<__u32>(mask >> 32);
  };
  split(p.caps[ExecPlan::kEffective], cap_data[0].effective, cap_data[1].effective);
  split(p.caps[ExecPlan::kPermitted], cap_data[0].permitted, cap_data[1].permitted);
  split(p.caps[ExecPlan::kInheritable], cap_data[0].inheritable, cap_data[1].inheritable);
  ChildArgs args{
      &p,          argv.data(), envp.data(), &candidates,    home.empty() ? nullptr : home.data(),
      home.size(), stdio,       own_stdio,   status_w.get(), &keep,
      &prog,       cap_data};

  pid_t pid = ::fork();
  if (pid < 0) return w->done(Error::Errno("fork"));
  if (pid == 0) RunChild(args);
  status_w.Reset();
  // The child has its own: the parent's would only pile up while an exec is held.
  for (auto& ns : w->plan.namespaces) ns.Reset();
  w->plan.cgroup_procs.Reset();
  w->child = pid;
  if (auto r = SetNonBlocking(w->status.get()); !r.ok()) {
    spdlog::warn("agent: exec status pipe: {}", r.error().ToString());
  }
  auto watch = loop->Watch(w->status.get(), EPOLLIN, [w](uint32_t) { w->Read(); });
  if (!watch.ok()) {
    // Nothing would ever hear from the child: it goes, and the exec fails.
    ::kill(pid, SIGKILL);
    reaper->OnExit(pid, [](int) {});
    return w->done(std::move(watch).error().Wrap("watch the exec's status pipe"));
  }
  w->watch = *watch;
  loop->AddTimer(Waiting::kDeadline, [w] { w->Expire(); });
}

}  // namespace peapod::agent
