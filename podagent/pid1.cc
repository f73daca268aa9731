#include "podagent/pid1.h"

#include <fcntl.h>
#include <linux/magic.h>
#include <net/if.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/sendfile.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/statvfs.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <set>
#include <vector>

#include <spdlog/spdlog.h>

#include "common/base/unique_fd.h"

namespace peapod::agent {

namespace {

// Whether the file is in the guest's RAM (the initramfs is tmpfs; ramfs too), not on a disk
// or the pod's share.
bool InRam(int fd) {
  struct statfs st {};
  return ::fstatfs(fd, &st) == 0 && (st.f_type == TMPFS_MAGIC || st.f_type == RAMFS_MAGIC);
}

struct MountSpec {
  const char* source;
  const char* target;
  const char* fstype;
  unsigned long flags;
  const char* data;
};

Result<void> MountOne(const MountSpec& m) {
  if (::mkdir(m.target, 0755) < 0 && errno != EEXIST) {
    return Error::Errno(fmt::format("mkdir {}", m.target));
  }
  if (::mount(m.source, m.target, m.fstype, m.flags, m.data) < 0 && errno != EBUSY) {
    return Error::Errno(fmt::format("mount {} on {}", m.fstype, m.target));
  }
  return Ok();
}

// The module paths of an image's list (one per line; blank lines and '#' comments skipped).
Result<std::vector<std::string>> ReadModuleList(const std::string& list_path) {
  std::ifstream list(list_path);
  if (!list) return Error::Errno(fmt::format("open module list {}", list_path));
  std::vector<std::string> paths;
  for (std::string line; std::getline(list, line);) {
    if (!line.empty() && line[0] != '#') paths.push_back(std::move(line));
  }
  return paths;
}

}  // namespace

Result<void> MountBasics() {
  constexpr unsigned long kNoExec = MS_NOSUID | MS_NODEV | MS_NOEXEC;
  const MountSpec mounts[] = {
      {"proc", "/proc", "proc", kNoExec, nullptr},
      {"sysfs", "/sys", "sysfs", kNoExec, nullptr},
      {"devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755"},
      {"devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC,
       "newinstance,ptmxmode=0666,mode=0620"},
      {"shm", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"},
      {"cgroup2", "/sys/fs/cgroup", "cgroup2", kNoExec, "nsdelegate"},
      {"tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"},
      {"tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755"},
  };
  for (const auto& m : mounts) PP_TRY(MountOne(m));
  // /dev/ptmx must point at this devpts instance for crun's console sockets.
  ::unlink("/dev/ptmx");
  if (::symlink("pts/ptmx", "/dev/ptmx") < 0) return Error::Errno("symlink /dev/ptmx");
  return Ok();
}

Result<int> LoadModules(const std::string& list_path) {
  PP_ASSIGN_OR_RETURN(auto paths, ReadModuleList(list_path));
  int loaded = 0;
  for (const auto& path : paths) {
    UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd) return Error::Errno(fmt::format("open module {}", path));
    if (::syscall(SYS_finit_module, fd.get(), "", 0) < 0) {
      if (errno == EEXIST) continue;
      return Error::Errno(fmt::format("load module {}", path));
    }
    ++loaded;
  }
  return loaded;
}

uint64_t FreeLoadedModuleFiles(const std::string& list_path, const std::string& lists_dir) {
  auto read_list = [](const std::string& path) {
    auto paths = ReadModuleList(path);
    return paths.ok() ? std::move(*paths) : std::vector<std::string>();
  };
  std::set<std::string> on_demand;
  const std::string prefix = std::filesystem::path(list_path).filename().string() + ".";
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(lists_dir, ec)) {
    if (e.path().filename().string().rfind(prefix, 0) != 0) continue;
    for (auto& m : read_list(e.path().string())) on_demand.insert(m);
  }
  uint64_t freed = 0;
  for (const auto& m : read_list(list_path)) {
    if (on_demand.count(m)) continue;
    UniqueFd fd(::open(m.c_str(), O_WRONLY | O_CLOEXEC | O_NOFOLLOW));
    struct stat st {};
    if (!fd || ::fstat(fd.get(), &st) < 0 || !S_ISREG(st.st_mode) || !InRam(fd.get())) continue;
    if (::ftruncate(fd.get(), 0) == 0) freed += static_cast<uint64_t>(st.st_size);
  }
  return freed;
}

Result<std::optional<int>> LoadModulesFor(const std::string& name) {
  if (name.empty() || name.find('/') != std::string::npos) return std::optional<int>();
  std::string list = "/etc/peapod/modules." + name;
  if (::access(list.c_str(), R_OK) != 0) return std::optional<int>();
  PP_ASSIGN_OR_RETURN(int n, LoadModules(list));
  return std::optional<int>(n);
}

int ModprobeMain(int argc, char** argv) {
  bool quiet = false, names = false;
  int status = 0;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (!names && a == "--") {
      names = true;
      continue;
    }
    if (!names && !a.empty() && a[0] == '-') {
      quiet = quiet || a == "-q" || a == "--quiet";
      continue;
    }
    // Module names spell '_' where requests may spell '-'.
    std::string underscored = a;
    std::replace(underscored.begin(), underscored.end(), '-', '_');
    auto loaded = LoadModulesFor(a);
    if (loaded.ok() && !*loaded && underscored != a) loaded = LoadModulesFor(underscored);
    if (!loaded.ok()) {
      if (!quiet) std::fprintf(stderr, "modprobe: %s\n", loaded.error().ToString().c_str());
      status = 1;
    } else if (!*loaded) {
      if (!quiet) {
        std::fprintf(stderr, "modprobe: module %s not found in the guest image\n", a.c_str());
      }
      status = 1;
    }
  }
  return status;
}

Result<void> LeaveInitramfs() {
  constexpr char kNewRoot[] = "/.peapod-root";
  if (::mkdir(kNewRoot, 0755) < 0 && errno != EEXIST) return Error::Errno("mkdir /.peapod-root");
  if (::mount("/", kNewRoot, nullptr, MS_BIND, nullptr) < 0) {
    return Error::Errno("bind-mount / on /.peapod-root");
  }
  if (::chdir(kNewRoot) < 0) return Error::Errno("chdir /.peapod-root");
  if (::mount(".", "/", nullptr, MS_MOVE, nullptr) < 0) return Error::Errno("move root mount");
  if (::chroot(".") < 0) return Error::Errno("chroot into the root mount");
  if (::chdir("/") < 0) return Error::Errno("chdir /");
  return Ok();
}

Result<void> ServeFromReadOnlyRamfs(const std::string& path, const std::string& dir) {
  UniqueFd src(::open(path.c_str(), O_RDWR | O_CLOEXEC | O_NOFOLLOW));
  if (!src) return Error::Errno(fmt::format("open {}", path));
  struct stat st {};
  if (::fstat(src.get(), &st) < 0) return Error::Errno(fmt::format("stat {}", path));
  if (!S_ISREG(st.st_mode)) return Error::Invalid("{} is not a file", path);
  if (::mkdir(dir.c_str(), 0755) < 0 && errno != EEXIST) {
    return Error::Errno(fmt::format("mkdir {}", dir));
  }
  if (::mount("ramfs", dir.c_str(), "ramfs", MS_NOSUID | MS_NODEV, "mode=0755") < 0) {
    return Error::Errno(fmt::format("mount a ramfs on {}", dir));
  }
  bool bound = false;
  auto fail = [&](Error err) -> Result<void> {
    if (bound) ::umount2(path.c_str(), MNT_DETACH);
    ::umount2(dir.c_str(), MNT_DETACH);
    return err;
  };
  const std::string copy = dir + "/" + path.substr(path.rfind('/') + 1);
  {
    UniqueFd dst(::open(copy.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0755));
    if (!dst) return fail(Error::Errno(fmt::format("create {}", copy)));
    off_t off = 0;
    while (off < st.st_size) {
      ssize_t n = ::sendfile(dst.get(), src.get(), &off, static_cast<size_t>(st.st_size - off));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return fail(Error::Errno(fmt::format("copy {} into {}", path, copy)));
      if (n == 0) return fail(Error::Internal("{} got shorter while it was copied", path));
    }
  }
  if (::mount(nullptr, dir.c_str(), nullptr, MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV,
              nullptr) < 0) {
    return fail(Error::Errno(fmt::format("make the ramfs on {} read-only", dir)));
  }
  if (::mount(copy.c_str(), path.c_str(), nullptr, MS_BIND, nullptr) < 0) {
    return fail(Error::Errno(fmt::format("bind-mount {} over {}", copy, path)));
  }
  bound = true;
  if (::mount(nullptr, path.c_str(), nullptr,
              MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, nullptr) < 0) {
    return fail(Error::Errno(fmt::format("make the bind mount over {} read-only", path)));
  }
  // The original, now under the bind, holds the only other copy in the guest's RAM. Only a file
  // in RAM is emptied: the path may name one on a disk or a share, which must stay as it is.
  if (InRam(src.get()) && ::ftruncate(src.get(), 0) < 0) {
    spdlog::warn("agent: could not empty the initramfs copy of {}: {}", path, std::strerror(errno));
  }
  return Ok();
}

Result<bool> CrunSkipsItsCopy(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return Error::Errno(fmt::format("open {}", path));
  // crun's third way (an environment variable and a file with no links) cannot apply to a file
  // opened by its path.
  constexpr int kCrunSeals = F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE;
  int seals = ::fcntl(fd.get(), F_GET_SEALS);
  if (seals >= 0) return seals == kCrunSeals;
  struct statfs sfs {};
  return ::fstatfs(fd.get(), &sfs) == 0 && (sfs.f_flags & ST_RDONLY) != 0;
}

Result<void> PrivateCgroup2() {
  struct statfs st {};
  if (::statfs("/sys/fs/cgroup", &st) == 0 && st.f_type == CGROUP2_SUPER_MAGIC) return Ok();
  if (::unshare(CLONE_NEWNS) < 0) return Error::Errno("unshare mount namespace");
  if (::mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) < 0) {
    return Error::Errno("make mounts private");
  }
  ::umount2("/sys/fs/cgroup", MNT_DETACH);
  if (::mount("cgroup2", "/sys/fs/cgroup", "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC, nullptr) <
      0) {
    return Error::Errno("mount cgroup2 on /sys/fs/cgroup");
  }
  return Ok();
}

Result<void> LoopbackUp() {
  UniqueFd sock(::socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0));
  if (!sock) return Error::Errno("socket for loopback");
  ifreq ifr{};
  std::strncpy(ifr.ifr_name, "lo", IFNAMSIZ - 1);
  if (::ioctl(sock.get(), SIOCGIFFLAGS, &ifr) < 0) return Error::Errno("SIOCGIFFLAGS lo");
  ifr.ifr_flags = static_cast<short>(ifr.ifr_flags | IFF_UP);
  if (::ioctl(sock.get(), SIOCSIFFLAGS, &ifr) < 0) return Error::Errno("bring lo up");
  return Ok();
}

void PowerOff() {
  ::sync();
  ::reboot(RB_POWER_OFF);
  // Only reached when not PID 1 or without CAP_SYS_BOOT.
  ::_exit(1);
}

Result<void> WatchSignals(EventLoop* loop, bool pid1, Reaper* reaper) {
  // A write to a pipe or fifo whose reader is gone (a container's exec fifo, its stdin) is an
  // EPIPE error to handle, not a signal that ends the agent (in local mode; PID 1 ignores it).
  // Children get default dispositions back (Spawn).
  ::signal(SIGPIPE, SIG_IGN);
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGCHLD);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  if (::sigprocmask(SIG_BLOCK, &set, nullptr) < 0) return Error::Errno("sigprocmask");
  auto fd = std::make_shared<UniqueFd>(::signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK));
  if (!*fd) return Error::Errno("signalfd");
  PP_TRY(loop->Watch(fd->get(), EPOLLIN, [fd, loop, pid1, reaper](uint32_t) {
    signalfd_siginfo info;
    while (::read(fd->get(), &info, sizeof(info)) == sizeof(info)) {
      if (info.ssi_signo == SIGCHLD) {
        reaper->Reap();
      } else if (pid1 && info.ssi_pid != 0) {
        // In the guest only the kernel (ctrl-alt-del) may stop the VM by signal: a container
        // that can signal PID 1 (one sharing the VM's PID namespace, as root) must not.
        spdlog::warn("agent: signal {} from pid {} ignored", info.ssi_signo, info.ssi_pid);
      } else {
        spdlog::info("agent: signal {} received, stopping", info.ssi_signo);
        if (pid1) PowerOff();
        loop->Stop();
      }
    }
  }));
  return Ok();
}

}  // namespace peapod::agent
