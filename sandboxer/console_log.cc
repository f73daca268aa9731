#include "sandboxer/console_log.h"

#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <spdlog/spdlog.h>

#include "common/base/unique_fd.h"

namespace peapod::sandboxer {

Result<bool> CapConsoleLog(int dir_fd, const std::string& name, uint64_t cap) {
  // O_NONBLOCK: a FIFO put in its place must not hang the checker; it is refused below.
  UniqueFd fd(
      ::openat(dir_fd, name.c_str(), O_RDWR | O_NOFOLLOW | O_NONBLOCK | O_NOCTTY | O_CLOEXEC));
  if (!fd) {
    if (errno == ENOENT) return false;
    return Error::Errno("open " + name);
  }
  struct stat st;
  if (::fstat(fd.get(), &st) < 0) return Error::Errno("fstat " + name);
  if (!S_ISREG(st.st_mode)) {
    return Error::Make(Code::kFailedPrecondition, "{} is not a regular file", name);
  }
  auto size = static_cast<uint64_t>(st.st_size);
  if (size <= cap) return false;
  uint64_t keep = cap / 2;
  std::string tail(keep, '\0');
  size_t got = 0;
  while (got < keep) {
    ssize_t n =
        ::pread(fd.get(), tail.data() + got, keep - got, static_cast<off_t>(size - keep + got));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Error::Errno("read " + name);
    if (n == 0) break;  // cut by someone else meanwhile
    got += static_cast<size_t>(n);
  }
  tail.resize(got);
  std::string old = name + ".1", tmp = name + ".1.tmp";
  {
    UniqueFd out(
        ::openat(dir_fd, tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0640));
    if (!out) return Error::Errno("create " + tmp);
    PP_TRY_CTX(WriteAll(out.get(), tail.data(), tail.size()), "write " + tmp);
  }
  if (::renameat(dir_fd, tmp.c_str(), dir_fd, old.c_str()) < 0) {
    return Error::Errno("rename " + tmp + " to " + old);
  }
  if (::ftruncate(fd.get(), 0) < 0) return Error::Errno("truncate " + name);
  return true;
}

size_t CapConsoleLogs(const std::vector<std::string>& roots, uint64_t cap) {
  size_t cut = 0;
  for (const auto& root : roots) {
    UniqueFd root_fd(::open(root.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
    if (!root_fd) continue;  // no pods (or pool) yet
    UniqueFd list_fd(::dup(root_fd.get()));
    DIR* d = list_fd ? ::fdopendir(list_fd.get()) : nullptr;
    if (!d) continue;
    list_fd.Release();  // closedir closes it
    while (dirent* e = ::readdir(d)) {
      std::string name = e->d_name;
      if (name == "." || name == ".." || (e->d_type != DT_DIR && e->d_type != DT_UNKNOWN)) {
        continue;
      }
      UniqueFd dir(
          ::openat(root_fd.get(), name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
      if (!dir) continue;  // gone meanwhile, or not a directory
      auto r = CapConsoleLog(dir.get(), "console.log", cap);
      if (!r.ok()) {
        spdlog::warn("console log pod={}: {}", name, r.error().ToString());
      } else if (*r) {
        ++cut;
        spdlog::info("console log pod={}: over {} bytes; the newest {} kept in console.log.1", name,
                     cap, cap / 2);
      }
    }
    ::closedir(d);
  }
  return cut;
}

ConsoleLogCapper::ConsoleLogCapper(std::vector<std::string> roots, uint64_t cap,
                                   std::chrono::milliseconds period)
    : thread_([this, roots = std::move(roots), cap, period] {
        std::unique_lock<std::mutex> l(mu_);
        while (!quit_) {
          l.unlock();
          CapConsoleLogs(roots, cap);
          l.lock();
          cv_.wait_for(l, period, [this] { return quit_; });
        }
      }) {}

ConsoleLogCapper::~ConsoleLogCapper() {
  {
    std::lock_guard<std::mutex> l(mu_);
    quit_ = true;
  }
  cv_.notify_all();
  thread_.join();
}

}  // namespace peapod::sandboxer
