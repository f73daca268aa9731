#include "common/base/unique_fd.h"

#include <fcntl.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>
#include <cstring>

namespace peapod {

void UniqueFd::Reset(int fd) {
  if (fd_ >= 0) ::close(fd_);  // no EINTR retry: see the class comment
  fd_ = fd;
}

Result<void> SetNonBlocking(int fd, bool on) {
  int flags = ::fcntl(fd, F_GETFL);
  if (flags < 0) return Error::Errno("fcntl(F_GETFL)");
  int wanted = on ? (flags | O_NONBLOCK) : (flags & ~O_NONBLOCK);
  if (wanted != flags && ::fcntl(fd, F_SETFL, wanted) < 0) return Error::Errno("fcntl(F_SETFL)");
  return Ok();
}

Result<void> WriteAll(int fd, const void* buf, size_t len) {
  const char* p = static_cast<const char*>(buf);
  while (len > 0) {
    ssize_t n = ::write(fd, p, len);
    if (n < 0) {
      if (errno == EINTR) continue;
      return Error::Errno("write");
    }
    p += n;
    len -= static_cast<size_t>(n);
  }
  return Ok();
}

Result<void> ReadExact(int fd, void* buf, size_t len) {
  char* p = static_cast<char*>(buf);
  while (len > 0) {
    ssize_t n = ::read(fd, p, len);
    if (n < 0) {
      if (errno == EINTR) continue;
      return Error::Errno("read");
    }
    if (n == 0) return Error(Code::kUnavailable, "read: unexpected end of stream");
    p += n;
    len -= static_cast<size_t>(n);
  }
  return Ok();
}

Result<std::pair<UniqueFd, UniqueFd>> SocketPair() {
  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) < 0) {
    return Error::Errno("socketpair");
  }
  return std::make_pair(UniqueFd(fds[0]), UniqueFd(fds[1]));
}

namespace {
Result<sockaddr_un> UnixAddress(const std::string& path) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(addr.sun_path)) {
    return Error::Invalid("unix socket path '{}' must be 1 to {} bytes long", path,
                          sizeof(addr.sun_path) - 1);
  }
  std::memcpy(addr.sun_path, path.data(), path.size());
  return addr;
}
}  // namespace

Result<UniqueFd> ListenUnix(const std::string& path, int backlog) {
  PP_ASSIGN_OR_RETURN(sockaddr_un addr, UnixAddress(path));
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) return Error::Errno("socket(AF_UNIX)");
  if (::unlink(path.c_str()) < 0 && errno != ENOENT) {
    return Error::Errno(fmt::format("remove stale socket {}", path));
  }
  if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) < 0) {
    return Error::Errno(fmt::format("bind {}", path));
  }
  if (::listen(fd.get(), backlog) < 0) return Error::Errno(fmt::format("listen {}", path));
  return fd;
}

Result<UniqueFd> ConnectUnix(const std::string& path) {
  PP_ASSIGN_OR_RETURN(sockaddr_un addr, UnixAddress(path));
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) return Error::Errno("socket(AF_UNIX)");
  int rc;
  do {
    rc = ::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  } while (rc < 0 && errno == EINTR);
  if (rc < 0) return Error::Errno(fmt::format("connect {}", path));
  return fd;
}

Result<UniqueFd> ConnectUnixNow(const std::string& path) {
  PP_ASSIGN_OR_RETURN(sockaddr_un addr, UnixAddress(path));
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd) return Error::Errno("socket(AF_UNIX)");
  int rc;
  do {
    rc = ::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  } while (rc < 0 && errno == EINTR);
  if (rc < 0 && errno == EAGAIN) {
    return Error::Make(Code::kUnavailable, "connect {}: its listener's backlog is full", path);
  }
  if (rc < 0) return Error::Errno(fmt::format("connect {}", path));
  return fd;
}

Result<Pidfd> Pidfd::Open(pid_t pid) {
  int fd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  if (fd < 0) return Error::Errno(fmt::format("pidfd_open({})", pid));
  return Pidfd(pid, UniqueFd(fd));
}

Result<void> Pidfd::Signal(int sig) const {
  if (::syscall(SYS_pidfd_send_signal, fd_.get(), sig, nullptr, 0) < 0) {
    return Error::Errno(fmt::format("signal {} to pid {}", sig, pid_));
  }
  return Ok();
}

Result<std::optional<int>> Pidfd::Wait(bool nohang) const {
  siginfo_t info{};
  int options = WEXITED | (nohang ? WNOHANG : 0);
  int rc;
  do {
    rc = ::waitid(static_cast<idtype_t>(P_PIDFD), static_cast<id_t>(fd_.get()), &info, options);
  } while (rc < 0 && errno == EINTR);
  if (rc < 0) return Error::Errno(fmt::format("wait for pid {}", pid_));
  if (info.si_pid == 0) return std::optional<int>();  // WNOHANG and still running
  // Rebuild a waitpid-style status so callers can use WIFEXITED & co.
  int status = info.si_code == CLD_EXITED ? (info.si_status & 0xff) << 8 : (info.si_status & 0x7f);
  return std::optional<int>(status);
}

ScopedMount& ScopedMount::operator=(ScopedMount&& o) noexcept {
  if (this != &o) {
    (void)Unmount();
    target_ = std::exchange(o.target_, {});
  }
  return *this;
}

Result<ScopedMount> ScopedMount::Mount(const std::string& source, const std::string& target,
                                       const std::string& fstype, unsigned long flags,
                                       const std::string& data) {
  if (::mount(source.c_str(), target.c_str(), fstype.empty() ? nullptr : fstype.c_str(), flags,
              data.empty() ? nullptr : data.c_str()) < 0) {
    return Error::Errno(fmt::format("mount {} on {} (type {})", source, target, fstype));
  }
  return ScopedMount(target);
}

Result<void> ScopedMount::Unmount() {
  if (target_.empty()) return Ok();
  std::string target = std::exchange(target_, {});
  if (::umount2(target.c_str(), MNT_DETACH) < 0) {
    return Error::Errno(fmt::format("unmount {}", target));
  }
  return Ok();
}

}  // namespace peapod
