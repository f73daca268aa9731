// RAII owners for kernel objects: file descriptors, pidfds (child processes) and mounts.
#pragma once

#include <sys/types.h>

#include <string>
#include <utility>

#include "common/base/result.h"

namespace peapod {

// Owns one file descriptor. close() is called exactly once and never retried on EINTR: on Linux
// the descriptor is released even when close reports EINTR, so a retry could close a stranger's.
class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(UniqueFd&& other) noexcept : fd_(other.Release()) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept {
    if (this != &other) Reset(other.Release());
    return *this;
  }
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  ~UniqueFd() { Reset(); }

  int get() const { return fd_; }
  bool valid() const { return fd_ >= 0; }
  explicit operator bool() const { return valid(); }
  int Release() { return std::exchange(fd_, -1); }
  void Reset(int fd = -1);

 private:
  int fd_ = -1;
};

// Sets or clears O_NONBLOCK.
Result<void> SetNonBlocking(int fd, bool on = true);
// Writes all of buf, retrying short writes and EINTR (blocking fds only).
Result<void> WriteAll(int fd, const void* buf, size_t len);
// Reads exactly len bytes; kUnavailable on EOF before len (blocking fds only).
Result<void> ReadExact(int fd, void* buf, size_t len);
// A connected AF_UNIX stream socketpair, both ends close-on-exec.
Result<std::pair<UniqueFd, UniqueFd>> SocketPair();
// Listens on a unix stream socket path (removing a stale socket file first).
Result<UniqueFd> ListenUnix(const std::string& path, int backlog = 64);
// Connects to a unix stream socket path (blocking connect, fd returned blocking).
Result<UniqueFd> ConnectUnix(const std::string& path);
// The same without ever blocking (for an event loop's thread): a listener whose backlog is full
// is UNAVAILABLE at once instead of a connect that waits for it. The fd is non-blocking.
Result<UniqueFd> ConnectUnixNow(const std::string& path);

// A child process held by pidfd, so signals and waits can never hit a recycled pid.
class Pidfd {
 public:
  Pidfd() = default;
  static Result<Pidfd> Open(pid_t pid);

  pid_t pid() const { return pid_; }
  int fd() const { return fd_.get(); }
  bool valid() const { return fd_.valid(); }

  Result<void> Signal(int sig) const;
  // Reaps the child (blocking unless nohang). Returns the wait status as from waitpid(2), or
  // nullopt with nohang when it has not exited yet.
  Result<std::optional<int>> Wait(bool nohang = false) const;

 private:
  Pidfd(pid_t pid, UniqueFd fd) : pid_(pid), fd_(std::move(fd)) {}
  pid_t pid_ = -1;
  UniqueFd fd_;
};

// A mount that is detached (MNT_DETACH) when the owner goes away, unless Release()d.
class ScopedMount {
 public:
  ScopedMount() = default;
  explicit ScopedMount(std::string target) : target_(std::move(target)) {}
  ScopedMount(ScopedMount&& o) noexcept : target_(std::exchange(o.target_, {})) {}
  ScopedMount& operator=(ScopedMount&& o) noexcept;
  ScopedMount(const ScopedMount&) = delete;
  ScopedMount& operator=(const ScopedMount&) = delete;
  ~ScopedMount() { (void)Unmount(); }  // nothing useful to do with a failure here

  // mount(2) with the given arguments; the result owns the mount.
  static Result<ScopedMount> Mount(const std::string& source, const std::string& target,
                                   const std::string& fstype, unsigned long flags,
                                   const std::string& data = "");
  const std::string& target() const { return target_; }
  std::string Release() { return std::exchange(target_, {}); }
  Result<void> Unmount();

 private:
  std::string target_;
};

}  // namespace peapod
