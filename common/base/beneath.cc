#include "common/base/beneath.h"

#include <dirent.h>
#include <fcntl.h>
#include <linux/openat2.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <climits>
#include <random>
#include <vector>

#include "common/base/mountinfo.h"

namespace peapod {

namespace {

constexpr int kMaxDepth = 64;

// The parent part and last name of a relative path ("a/b/c" -> "a/b", "c"; "c" -> "", "c").
std::pair<std::string, std::string> SplitLast(const std::string& rel) {
  auto slash = rel.find_last_of('/');
  if (slash == std::string::npos) return {"", rel};
  return {rel.substr(0, slash), rel.substr(slash + 1)};
}

Result<uint64_t> MountIdOf(int fd) {
  struct statx stx {};
  if (::statx(fd, "", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW, STATX_MNT_ID, &stx) < 0) {
    return Error::Errno("statx");
  }
  if (!(stx.stx_mask & STATX_MNT_ID)) {
    return Error(Code::kUnimplemented, "the kernel reports no mount ids (statx STATX_MNT_ID)");
  }
  return stx.stx_mnt_id;
}

// Every name in directory dirfd but . and ..
Result<std::vector<std::string>> ListNames(int dirfd) {
  int dup = ::openat(dirfd, ".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dup < 0) return Error::Errno("open directory");
  DIR* d = ::fdopendir(dup);
  if (!d) {
    int e = errno;
    ::close(dup);
    return Error::Errno("read directory", e);
  }
  std::vector<std::string> names;
  errno = 0;
  while (struct dirent* e = ::readdir(d)) {
    std::string n = e->d_name;
    if (n != "." && n != "..") names.push_back(std::move(n));
  }
  int err = errno;
  ::closedir(d);
  if (err) return Error::Errno("read directory", err);
  return names;
}

// Empties directory dirfd (on mount mnt), depth levels below the top.
Result<void> RemoveEntries(int dirfd, uint64_t mnt, int depth, const std::string& where) {
  if (depth > kMaxDepth) {
    return Error::Make(Code::kFailedPrecondition,
                       "{} is more than {} directories deep; not removing it", where, kMaxDepth);
  }
  PP_ASSIGN_OR_RETURN(auto names, ListNames(dirfd));
  for (const auto& name : names) {
    std::string path = where + "/" + name;
    struct stat st {};
    if (::fstatat(dirfd, name.c_str(), &st, AT_SYMLINK_NOFOLLOW) < 0) {
      if (errno == ENOENT) continue;
      return Error::Errno("stat " + path);
    }
    if (!S_ISDIR(st.st_mode)) {
      if (::unlinkat(dirfd, name.c_str(), 0) < 0 && errno != ENOENT) {
        return Error::Errno("remove " + path);
      }
      continue;
    }
    // O_NOFOLLOW: if the name became a symlink since the stat, this fails instead of following.
    UniqueFd sub(::openat(dirfd, name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
    if (!sub) {
      if (errno == ENOENT) continue;
      return Error::Errno("open " + path);
    }
    PP_ASSIGN_OR_RETURN(uint64_t sub_mnt, MountIdOf(sub.get()));
    if (sub_mnt != mnt) {
      return Error::Make(Code::kFailedPrecondition,
                         "{} is another mount (one that could not be unmounted); not deleting "
                         "through it",
                         path);
    }
    PP_TRY(RemoveEntries(sub.get(), mnt, depth + 1, path));
    if (::unlinkat(dirfd, name.c_str(), AT_REMOVEDIR) < 0 && errno != ENOENT) {
      return Error::Errno("rmdir " + path);
    }
  }
  return Ok();
}

}  // namespace

Result<UniqueFd> OpenBeneath(int dirfd, const std::string& rel, int flags, mode_t mode) {
  struct open_how how {};
  how.flags = static_cast<uint64_t>(flags | O_CLOEXEC);
  how.mode = (flags & (O_CREAT | O_TMPFILE)) ? mode : 0;
  how.resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS;
  const char* p = rel.empty() ? "." : rel.c_str();
  for (;;) {
    long fd = ::syscall(SYS_openat2, dirfd, p, &how, sizeof(how));
    if (fd >= 0) return UniqueFd(static_cast<int>(fd));
    if (errno == EAGAIN || errno == EINTR) continue;  // a rename raced the lookup: retry
    if (errno == ELOOP || errno == EXDEV) {
      return Error(Code::kPermissionDenied,
                   "open " + rel + ": a symlink or a path out of its directory is in the way",
                   errno);
    }
    return Error::Errno("open " + rel);
  }
}

Result<UniqueFd> OpenHostDir(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
  if (!fd) return Error::Errno("open " + path);
  return fd;
}

Result<UniqueFd> MakeDirsBeneath(int dirfd, const std::string& rel, mode_t mode) {
  PP_ASSIGN_OR_RETURN(UniqueFd cur, OpenBeneath(dirfd, "", O_RDONLY | O_DIRECTORY));
  size_t start = 0;
  while (start <= rel.size()) {
    size_t slash = rel.find('/', start);
    if (slash == std::string::npos) slash = rel.size();
    std::string name = rel.substr(start, slash - start);
    start = slash + 1;
    if (name.empty() || name == ".") continue;
    if (name == "..") return Error::Invalid("path {} goes up with ..", rel);
    if (::mkdirat(cur.get(), name.c_str(), mode) < 0 && errno != EEXIST) {
      return Error::Errno("mkdir " + rel);
    }
    PP_ASSIGN_OR_RETURN(UniqueFd next, OpenBeneath(cur.get(), name, O_RDONLY | O_DIRECTORY));
    cur = std::move(next);
  }
  return cur;
}

Result<void> WriteFileBeneath(int dirfd, const std::string& rel, const std::string& content,
                              mode_t mode) {
  auto [parent, name] = SplitLast(rel);
  PP_ASSIGN_OR_RETURN(UniqueFd dir, OpenBeneath(dirfd, parent, O_RDONLY | O_DIRECTORY));
  std::string tmp = "." + name + ".tmp-" + std::to_string(std::random_device{}());
  UniqueFd fd(
      ::openat(dir.get(), tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode));
  if (!fd) return Error::Errno("create " + rel);
  auto done = WriteAll(fd.get(), content.data(), content.size());
  if (done.ok() && ::fchmod(fd.get(), mode) < 0) done = Error::Errno("chmod " + rel);
  if (done.ok() && ::renameat(dir.get(), tmp.c_str(), dir.get(), name.c_str()) < 0) {
    done = Error::Errno("rename to " + rel);
  }
  if (!done.ok()) ::unlinkat(dir.get(), tmp.c_str(), 0);
  return done;
}

Result<void> RemoveTreeBeneath(int dirfd, const std::string& rel) {
  auto [parent, name] = SplitLast(rel);
  auto pfd = OpenBeneath(dirfd, parent, O_RDONLY | O_DIRECTORY);
  if (!pfd.ok()) {
    return pfd.error().sys_errno() == ENOENT ? Result<void>(Ok()) : Result<void>(pfd.error());
  }
  struct stat st {};
  if (::fstatat(pfd->get(), name.c_str(), &st, AT_SYMLINK_NOFOLLOW) < 0) {
    return errno == ENOENT ? Result<void>(Ok()) : Error::Errno("stat " + rel);
  }
  if (!S_ISDIR(st.st_mode)) {
    if (::unlinkat(pfd->get(), name.c_str(), 0) < 0 && errno != ENOENT) {
      return Error::Errno("remove " + rel);
    }
    return Ok();
  }
  PP_ASSIGN_OR_RETURN(uint64_t mnt, MountIdOf(pfd->get()));
  UniqueFd top(::openat(pfd->get(), name.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
  if (!top) return errno == ENOENT ? Result<void>(Ok()) : Error::Errno("open " + rel);
  PP_ASSIGN_OR_RETURN(uint64_t top_mnt, MountIdOf(top.get()));
  if (top_mnt != mnt) {
    return Error::Make(Code::kFailedPrecondition,
                       "{} is still a mount point; not deleting through it", rel);
  }
  PP_TRY(RemoveEntries(top.get(), mnt, 1, rel));
  if (::unlinkat(pfd->get(), name.c_str(), AT_REMOVEDIR) < 0 && errno != ENOENT) {
    return Error::Errno("rmdir " + rel);
  }
  return Ok();
}

Result<std::string> PathOfFd(int fd) {
  char buf[PATH_MAX];
  std::string self = "/proc/self/fd/" + std::to_string(fd);
  ssize_t n = ::readlink(self.c_str(), buf, sizeof(buf) - 1);
  if (n <= 0) return Error::Errno("readlink " + self);
  std::string p(buf, static_cast<size_t>(n));
  while (p.size() > 1 && p.back() == '/') p.pop_back();
  return p;
}

Result<bool> IsMountRoot(int fd) {
  struct statx stx {};
  if (::statx(fd, "", AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW, STATX_BASIC_STATS, &stx) < 0) {
    return Error::Errno("statx");
  }
  if (!(stx.stx_attributes_mask & STATX_ATTR_MOUNT_ROOT)) {
    return Error(Code::kUnimplemented, "the kernel does not report mount roots (statx)");
  }
  return (stx.stx_attributes & STATX_ATTR_MOUNT_ROOT) != 0;
}

Result<void> UnmountFd(int fd) {
  // The magic link names exactly the mount fd refers to; nothing is looked up by name.
  std::string self = "/proc/self/fd/" + std::to_string(fd);
  if (::umount2(self.c_str(), MNT_DETACH) < 0) return Error::Errno("unmount");
  return Ok();
}

Result<void> UnmountAllBeneath(int dirfd, const std::string& rel) {
  auto top = OpenBeneath(dirfd, rel, O_PATH);
  if (!top.ok()) {
    // Absent, or a symlink in the way: nothing is mounted there by that name.
    int e = top.error().sys_errno();
    return e == ENOENT || e == ELOOP || e == EXDEV ? Result<void>(Ok()) : Result<void>(top.error());
  }
  // Where it is in the mount table's terms (the table lists resolved paths).
  PP_ASSIGN_OR_RETURN(std::string base, PathOfFd(top->get()));
  // Parents come first in the table: unmounting a parent lazily takes its children with it,
  // and what went with it is then no mount root any more.
  for (const auto& m : MountsUnder(base, /*below_only=*/false)) {
    std::string below = m.path.size() > base.size() ? m.path.substr(base.size() + 1) : "";
    std::string path = rel.empty() ? below : below.empty() ? rel : rel + "/" + below;
    for (int i = 0; i < 16; ++i) {  // a place mounted over several times: each in turn
      auto fd = OpenBeneath(dirfd, path, O_PATH);
      if (!fd.ok()) break;  // gone, or behind a symlink now: not reachable by name
      auto root = IsMountRoot(fd->get());
      if (!root.ok()) return root.error();
      if (!*root) break;
      PP_TRY_CTX(UnmountFd(fd->get()), m.path);
    }
  }
  return Ok();
}

}  // namespace peapod
