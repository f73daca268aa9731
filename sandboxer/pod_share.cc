#include "sandboxer/pod_share.h"

#include <fcntl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <climits>

#include <fmt/format.h>

#include "common/base/beneath.h"
#include "common/base/mountinfo.h"
#include "common/base/unique_fd.h"

namespace peapod::sandboxer {

namespace {

std::pair<std::string, std::string> SplitLast(const std::string& path) {
  auto slash = path.find_last_of('/');
  if (slash == std::string::npos) return {"", path};
  return {path.substr(0, slash), path.substr(slash + 1)};
}

// The run dir, made 0700 if missing (its parent is configuration: the host's own).
Result<UniqueFd> OpenRunDir(const std::string& run_dir, bool create) {
  auto [parent, name] = SplitLast(run_dir);
  if (parent.empty() || name.empty()) return Error::Invalid("run dir {} is not absolute", run_dir);
  PP_ASSIGN_OR_RETURN(UniqueFd pfd, OpenHostDir(parent));
  if (create && ::mkdirat(pfd.get(), name.c_str(), 0700) < 0 && errno != EEXIST) {
    return Error::Errno("mkdir " + run_dir);
  }
  return OpenBeneath(pfd.get(), name, O_RDONLY | O_DIRECTORY);
}

// The share mount of run dir rfd; an error if it is not mounted.
Result<UniqueFd> OpenShare(int rfd, const std::string& run_dir) {
  PP_ASSIGN_OR_RETURN(UniqueFd share, OpenBeneath(rfd, kShareDir, O_PATH | O_DIRECTORY));
  PP_ASSIGN_OR_RETURN(bool mounted, IsMountRoot(share.get()));
  if (!mounted) {
    return Error::Make(Code::kFailedPrecondition,
                       "{}/{} is not mounted (a pod run dir from before the read-only share?)",
                       run_dir, kShareDir);
  }
  return share;
}

// A detached copy of what fd is (not its submounts) with attrs and propagation set, then
// mounted on target. A copy of a shared mount would be its peer: an unmount of the copy would
// then unmount the host's own mounts below it, and mounts the host makes later would arrive
// with their own flags; so a copy is private, or at most the source's slave.
Result<void> BindFd(int source_fd, int target_fd, uint64_t attrs, uint64_t propagation) {
  UniqueFd tree(::open_tree(source_fd, "", AT_EMPTY_PATH | OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC));
  if (!tree) return Error::Errno("open_tree");
  struct mount_attr attr {};
  attr.attr_set = attrs;
  attr.propagation = propagation;
  if (::mount_setattr(tree.get(), "", AT_EMPTY_PATH, &attr, sizeof(attr)) < 0) {
    return Error::Errno("mount_setattr");
  }
  if (::move_mount(tree.get(), "", target_fd, "",
                   MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH) < 0) {
    return Error::Errno("move_mount");
  }
  return Ok();
}

}  // namespace

Result<void> PrepareShare(const std::string& run_dir) {
  PP_ASSIGN_OR_RETURN(UniqueFd rfd, OpenRunDir(run_dir, /*create=*/true));
  PP_ASSIGN_OR_RETURN(UniqueFd host, MakeDirsBeneath(rfd.get(), kShareHostDir, 0700));
  if (::mkdirat(rfd.get(), kShareDir, 0700) < 0 && errno != EEXIST) {
    return Error::Errno("mkdir " + run_dir + "/" + kShareDir);
  }
  PP_ASSIGN_OR_RETURN(UniqueFd share, OpenBeneath(rfd.get(), kShareDir, O_PATH | O_DIRECTORY));
  PP_ASSIGN_OR_RETURN(bool mounted, IsMountRoot(share.get()));
  if (mounted) return Ok();
  PP_TRY_CTX(BindFd(host.get(), share.get(),
                    MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC,
                    MS_PRIVATE),
             "mount the pod share " + run_dir + "/" + kShareDir);
  return Ok();
}

Result<void> MakePrivateMount(const std::string& dir) {
  PP_ASSIGN_OR_RETURN(UniqueFd fd, OpenHostDir(dir));
  PP_ASSIGN_OR_RETURN(bool mounted, IsMountRoot(fd.get()));
  if (!mounted) {
    UniqueFd tree(::open_tree(fd.get(), "", AT_EMPTY_PATH | OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC));
    if (!tree) return Error::Errno("open_tree " + dir);
    if (::move_mount(tree.get(), "", fd.get(), "",
                     MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH) < 0) {
      return Error::Errno("bind " + dir + " onto itself");
    }
    PP_ASSIGN_OR_RETURN(fd, OpenHostDir(dir));  // the new mount, not the directory below it
  }
  struct mount_attr attr {};
  attr.propagation = MS_PRIVATE;
  if (::mount_setattr(fd.get(), "", AT_EMPTY_PATH, &attr, sizeof(attr)) < 0) {
    return Error::Errno("make " + dir + " a private mount");
  }
  return Ok();
}

Result<void> WriteShareFile(const std::string& run_dir, const std::string& name,
                            const std::string& content) {
  if (name.empty() || name.find('/') != std::string::npos || name == "." || name == "..") {
    return Error::Invalid("share file name '{}' is not a plain name", name);
  }
  PP_ASSIGN_OR_RETURN(UniqueFd rfd, OpenRunDir(run_dir, false));
  PP_ASSIGN_OR_RETURN(UniqueFd host, OpenBeneath(rfd.get(), kShareHostDir, O_RDONLY | O_DIRECTORY));
  return WriteFileBeneath(host.get(), name, content, 0644);
}

Result<void> BindIntoShare(const std::string& run_dir, int source_fd, const std::string& rel,
                           bool readonly, bool from_host) {
  struct stat st {};
  if (::fstat(source_fd, &st) < 0) return Error::Errno("stat volume");
  PP_ASSIGN_OR_RETURN(UniqueFd rfd, OpenRunDir(run_dir, false));
  PP_ASSIGN_OR_RETURN(UniqueFd share, OpenShare(rfd.get(), run_dir));
  PP_ASSIGN_OR_RETURN(UniqueFd host, OpenBeneath(rfd.get(), kShareHostDir, O_RDONLY | O_DIRECTORY));
  auto [parent, name] = SplitLast(rel);
  PP_ASSIGN_OR_RETURN(UniqueFd pdir, MakeDirsBeneath(host.get(), parent, 0700));
  if (S_ISDIR(st.st_mode)) {
    if (::mkdirat(pdir.get(), name.c_str(), 0700) < 0 && errno != EEXIST) {
      return Error::Errno("mkdir " + rel);
    }
  } else {
    UniqueFd f(::openat(pdir.get(), name.c_str(),
                        O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600));
    if (!f && errno != EEXIST) return Error::Errno("create " + rel);
  }
  // The target is reached through the share (the mount QEMU exports), by fd, below it.
  PP_ASSIGN_OR_RETURN(UniqueFd target, OpenBeneath(share.get(), rel, O_PATH));
  PP_ASSIGN_OR_RETURN(bool taken, IsMountRoot(target.get()));
  if (taken) return Error::Make(Code::kAlreadyExists, "{} in the pod share is in use", rel);
  uint64_t attrs = MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | (readonly ? MOUNT_ATTR_RDONLY : 0);
  PP_TRY_CTX(BindFd(source_fd, target.get(), attrs, from_host ? MS_SLAVE : MS_PRIVATE),
             "bind a volume at " + rel + " in the share");
  return Ok();
}

Result<void> RemoveFromShare(const std::string& run_dir, const std::string& rel) {
  auto rfd = OpenRunDir(run_dir, false);
  if (!rfd.ok()) {
    return rfd.error().sys_errno() == ENOENT ? Result<void>(Ok()) : Result<void>(rfd.error());
  }
  auto share = OpenBeneath(rfd->get(), kShareDir, O_PATH | O_DIRECTORY);
  if (share.ok()) PP_TRY(UnmountAllBeneath(share->get(), rel));
  // The tree the host made the targets in: host/, or share/ itself in a run dir laid out before
  // the read-only share.
  auto host = OpenBeneath(rfd->get(), kShareHostDir, O_RDONLY | O_DIRECTORY);
  if (host.ok()) return RemoveTreeBeneath(host->get(), rel);
  if (host.error().sys_errno() != ENOENT) return host.error();
  auto old = OpenBeneath(rfd->get(), kShareDir, O_RDONLY | O_DIRECTORY);
  if (!old.ok()) return Ok();
  return RemoveTreeBeneath(old->get(), rel);
}

}  // namespace peapod::sandboxer

namespace peapod::sandboxer {

Result<SharedVolumes> ShareVolumesNow(const std::string& run_dir, const std::string& container,
                                      size_t first, const std::vector<VolumeRequest>& volumes,
                                      const std::string& skip_below) {
  SharedVolumes out;
  // Binds what fd is at the next free name; its guest path. A name in use (a record that fell
  // behind what is mounted) is skipped, never unmounted: it may be a running container's.
  size_t next = first;
  auto share = [&](int fd, bool readonly, bool from_host) -> Result<std::string> {
    for (int tries = 0; tries < 1024; ++tries) {
      std::string rel = fmt::format("volumes/{}/{}", container, next++);
      auto r = BindIntoShare(run_dir, fd, rel, readonly, from_host);
      if (!r.ok() && r.error().code() == Code::kAlreadyExists) continue;
      if (!r.ok()) {
        (void)RemoveFromShare(run_dir, rel);
        return std::move(r).error().Wrap("share volume of container " + container);
      }
      out.rels.push_back(rel);
      return std::string(kGuestShareDir) + "/" + rel;
    }
    return Error::Make(Code::kResourceExhausted, "no free volume name for container {}", container);
  };
  auto shared = [&]() -> Result<void> {
    for (const auto& v : volumes) {
      if (v.host_path.empty() || v.host_path[0] != '/') {
        return Error::Invalid("volume path '{}' must be absolute", v.host_path);
      }
      // The volume itself is the host's path (kubelet's or containerd's), followed as runc
      // follows it; everything below it is reached from it by fd.
      UniqueFd src(::open(v.host_path.c_str(), O_PATH | O_CLOEXEC));
      if (!src) return Error::Errno("volume source " + v.host_path);
      PP_ASSIGN_OR_RETURN(std::string root, PathOfFd(src.get()));
      SharedVolume sv;
      const bool from_host = v.propagate_from_host && !v.recursive_readonly;
      PP_ASSIGN_OR_RETURN(sv.guest_path,
                          share(src.get(), v.readonly || v.recursive_readonly, from_host));
      std::string last;
      for (const auto& m : MountsUnder(root, /*below_only=*/true)) {
        if (m.path == skip_below || m.path.rfind(skip_below + "/", 0) == 0 || m.path == last) {
          continue;
        }
        last = m.path;
        std::string below = root == "/" ? m.path.substr(1) : m.path.substr(root.size() + 1);
        auto fd = OpenBeneath(src.get(), below, O_PATH);
        if (!fd.ok()) {
          return std::move(fd).error().Wrap(
              fmt::format("mount {} below volume {}", m.path, v.host_path));
        }
        PP_ASSIGN_OR_RETURN(bool is_mount, IsMountRoot(fd->get()));
        if (!is_mount) continue;  // unmounted since the table was read
        bool ro = m.readonly || v.recursive_readonly;
        PP_ASSIGN_OR_RETURN(std::string guest, share(fd->get(), ro, from_host));
        sv.submounts.push_back({"/" + below, std::move(guest), ro});
      }
      out.guest.push_back(std::move(sv));
    }
    return Ok();
  }();
  if (!shared.ok()) {
    for (const auto& rel : out.rels) (void)RemoveFromShare(run_dir, rel);
    return shared.error();
  }
  return out;
}

}  // namespace peapod::sandboxer
