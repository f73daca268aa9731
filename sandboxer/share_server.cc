#include "sandboxer/share_server.h"

#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <signal.h>
#include <stddef.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <thread>
#include <vector>

#include "common/base/unique_fd.h"

namespace peapod::sandboxer {

namespace {

// A seccomp program of rules, one per syscall, each of which ends in the shared "allow",
// "refuse" (EPERM) or "kill" at the end of the program.
class Filter {
 public:
  Filter() {
    // Another syscall table (x32 numbers, the i386 entry) could reach the same calls under
    // other numbers: those are killed outright.
    Add(BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)));
    Jump(BPF_JEQ, AUDIT_ARCH_X86_64, 0, kKill);
    LoadNr();
    Jump(BPF_JGE, 0x40000000, kKill, 0);  // __X32_SYSCALL_BIT
  }
  // Refuses syscall nr when (argument arg & mask) != 0.
  void RefuseBits(uint32_t nr, unsigned arg, uint32_t mask) {
    LoadNr();
    Jump(BPF_JEQ, nr, 0, 2);
    LoadArg(arg);
    Jump(BPF_JSET, mask, kRefuse, kAllow);
  }
  // Refuses mknod-like syscall nr when its mode (argument arg) has S_ISUID or S_ISGID (a
  // regular file made by mknod keeps them) or names a character or block device.
  void RefuseNodes(uint32_t nr, unsigned arg) {
    LoadNr();
    Jump(BPF_JEQ, nr, 0, 5);
    LoadArg(arg);
    Jump(BPF_JSET, S_ISUID | S_ISGID, kRefuse, 0);
    Add(BPF_STMT(BPF_ALU | BPF_AND | BPF_K, S_IFMT));
    Jump(BPF_JEQ, S_IFCHR, kRefuse, 0);
    Jump(BPF_JEQ, S_IFBLK, kRefuse, kAllow);
  }
  // Refuses syscall nr whatever its arguments (EPERM).
  void Refuse(uint32_t nr) {
    LoadNr();
    Jump(BPF_JEQ, nr, kRefuse, 0);
  }
  // Fails syscall nr with ENOSYS: its arguments are in memory, where a filter cannot look.
  void Unavailable(uint32_t nr) {
    LoadNr();
    Jump(BPF_JEQ, nr, 0, 1);
    Add(BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (ENOSYS & SECCOMP_RET_DATA)));
  }
  Result<void> Install() {
    size_t end = prog_.size();
    Add(BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW));
    Add(BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | (EPERM & SECCOMP_RET_DATA)));
    Add(BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS));
    for (const auto& [pc, jt, target] : fixups_) {
      size_t to = end + static_cast<size_t>(target - kAllow);
      if (to - pc - 1 > 255)
        return Error::Internal("the share server's seccomp program is too long");
      (jt ? prog_[pc].jt : prog_[pc].jf) = static_cast<uint8_t>(to - pc - 1);
    }
    struct sock_fprog fp = {static_cast<unsigned short>(prog_.size()), prog_.data()};
    if (::prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &fp) < 0) {
      return Error::Errno("install the share server's seccomp filter");
    }
    return Ok();
  }

 private:
  // Jump targets past any relative offset: the three returns at the end.
  static constexpr int kAllow = 1000, kRefuse = 1001, kKill = 1002;
  void Add(struct sock_filter f) { prog_.push_back(f); }
  void LoadNr() { Add(BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr))); }
  void LoadArg(unsigned arg) {
    // The low 32 bits (little endian): modes and file types live there.
    Add(BPF_STMT(BPF_LD | BPF_W | BPF_ABS,
                 static_cast<uint32_t>(offsetof(struct seccomp_data, args) + 8 * arg)));
  }
  // A conditional jump; each target is a relative offset (< kAllow) or one of the returns.
  void Jump(uint16_t op, uint32_t k, int jt, int jf) {
    size_t pc = prog_.size();
    Add(BPF_JUMP(BPF_JMP | op | BPF_K, k, 0, 0));
    for (auto [is_jt, target] : {std::pair{true, jt}, std::pair{false, jf}}) {
      if (target >= kAllow) {
        fixups_.push_back({pc, is_jt, target});
      } else {
        (is_jt ? prog_[pc].jt : prog_[pc].jf) = static_cast<uint8_t>(target);
      }
    }
  }
  struct Fixup {
    size_t pc;
    bool jt;
    int target;
  };
  std::vector<struct sock_filter> prog_;
  std::vector<Fixup> fixups_;
};

}  // namespace

Result<void> InstallShareServerFilter() {
#if !defined(__x86_64__)
#error "the seccomp filter below is written for x86_64"
#endif
  Filter f;
  // Device nodes: a guest's mknod of a character or block device (FIFOs and sockets are
  // fine); and set-user-ID / set-group-ID bits, on a mknod'ed regular file too.
  f.RefuseNodes(__NR_mknod, 1);
  f.RefuseNodes(__NR_mknodat, 2);
  // Set-user-ID and set-group-ID bits: a file the guest makes setuid root in a volume would
  // be setuid root at the volume's host path (kubelet's, a hostPath's).
  f.RefuseBits(__NR_chmod, 1, S_ISUID | S_ISGID);
  f.RefuseBits(__NR_fchmod, 1, S_ISUID | S_ISGID);
  f.RefuseBits(__NR_fchmodat, 2, S_ISUID | S_ISGID);
  f.RefuseBits(__NR_open, 2, S_ISUID | S_ISGID);
  f.RefuseBits(__NR_openat, 3, S_ISUID | S_ISGID);
  f.RefuseBits(__NR_creat, 1, S_ISUID | S_ISGID);
  // Calls that carry a mode where a filter cannot read it (a struct or a shared ring).
  f.Unavailable(__NR_openat2);
  f.Unavailable(__NR_io_uring_setup);
  f.Unavailable(__NR_io_uring_enter);
  f.Unavailable(__NR_io_uring_register);
#ifdef __NR_fchmodat2
  f.Unavailable(__NR_fchmodat2);
#else
  f.Unavailable(452);  // fchmodat2 (Linux 6.6), newer than these headers
#endif
  // The helper keeps CAP_SETUID to act as each 9p request's user; were it compromised (by a
  // compromised QEMU, through its protocol), it could become another VM's uid and reach that
  // QEMU. It never needs to touch another process.
  for (uint32_t nr :
       {__NR_ptrace, __NR_process_vm_readv, __NR_process_vm_writev, __NR_kill, __NR_pidfd_open,
        __NR_pidfd_getfd, __NR_pidfd_send_signal, __NR_process_madvise}) {
    f.Refuse(nr);
  }
  return f.Install();
}

void KillShareServers(const std::string& socket) {
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator("/proc", ec)) {
    std::string name = e.path().filename().string();
    if (name.empty() || name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::ifstream f(e.path() / "cmdline");
    std::string cmdline((std::istreambuf_iterator<char>(f)), {});
    // argv as the sandboxer wrote it: ... "-s" <socket> ...
    if (cmdline.find(std::string("\0-s\0", 4) + socket + std::string("\0", 1)) ==
        std::string::npos) {
      continue;
    }
    pid_t pid = static_cast<pid_t>(std::stol(name));
    int pfd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
    if (pfd < 0) continue;
    ::syscall(SYS_pidfd_send_signal, pfd, SIGKILL, nullptr, 0);
    ::close(pfd);
  }
}

Result<pid_t> StartShareServer(const ShareServerSpec& spec) {
  if (spec.uid == 0) return Error::Invalid("the share server needs QEMU's own uid, not root");
  if (::access(spec.helper.c_str(), X_OK) != 0) {
    return Error::Errno(spec.helper +
                        " (the 9p server of confined VMs; Debian: qemu-system-common) is missing");
  }
  if (::unlink(spec.socket.c_str()) < 0 && errno != ENOENT) {
    return Error::Errno("remove " + spec.socket);
  }
  std::string uid = std::to_string(spec.uid), gid = std::to_string(spec.gid);
  const char* argv[] = {spec.helper.c_str(),
                        "-p",
                        spec.export_dir.c_str(),
                        "-s",
                        spec.socket.c_str(),
                        "-u",
                        uid.c_str(),
                        "-g",
                        gid.c_str(),
                        "-n",
                        nullptr};
  pid_t pid = ::fork();
  if (pid < 0) return Error::Errno("fork the share server");
  if (pid == 0) {
    // Its own session, outside the sandboxer's process group: it lives as long as its VM.
    ::setsid();
    ::signal(SIGPIPE, SIG_DFL);
    // What it says goes nowhere: a guest could otherwise fill a host file through it.
    int null = ::open("/dev/null", O_RDWR | O_CLOEXEC);
    if (null >= 0) {
      ::dup2(null, 0);
      ::dup2(null, 1);
      ::dup2(null, 2);
    }
    // Nothing of the sandboxer's may reach the helper (sockets, records, other pods' fds).
    if (::syscall(SYS_close_range, 3, ~0U, 0) < 0) {
      for (int fd = 3; fd < 65536; ++fd) ::close(fd);
    }
    sigset_t none;
    sigemptyset(&none);
    ::sigprocmask(SIG_SETMASK, &none, nullptr);
    if (!InstallShareServerFilter().ok()) ::_exit(126);
    ::execv(argv[0], const_cast<char* const*>(argv));
    ::_exit(127);
  }
  // It creates the socket before it waits for QEMU; give it a few seconds.
  for (int i = 0; i < 500; ++i) {
    struct stat st;
    if (::stat(spec.socket.c_str(), &st) == 0 && S_ISSOCK(st.st_mode)) {
      // The helper leaves the socket open to QEMU's group, which every pod VM shares: it
      // becomes QEMU's uid's alone before its directory lets the group in.
      std::string dir = std::filesystem::path(spec.socket).parent_path();
      if (::chmod(spec.socket.c_str(), 0700) < 0 || ::chown(dir.c_str(), 0, spec.gid) < 0 ||
          ::chmod(dir.c_str(), 0710) < 0) {
        auto e = Error::Errno("give the share server's socket " + spec.socket + " to QEMU");
        ::kill(pid, SIGKILL);
        ::waitpid(pid, nullptr, 0);
        return e;
      }
      return pid;
    }
    int status = 0;
    if (::waitpid(pid, &status, WNOHANG) == pid) {
      return Error::Make(Code::kInternal, "the share server {} for {} exited ({}) before listening",
                         spec.helper, spec.export_dir,
                         WIFEXITED(status) ? "status " + std::to_string(WEXITSTATUS(status))
                                           : "signal " + std::to_string(WTERMSIG(status)));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  ::kill(pid, SIGKILL);
  ::waitpid(pid, nullptr, 0);
  return Error::Make(Code::kDeadlineExceeded, "the share server for {} did not listen on {} in 5 s",
                     spec.export_dir, spec.socket);
}

}  // namespace peapod::sandboxer
