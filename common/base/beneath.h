// Working in a directory tree that someone else may change while we work (a pod's share, which
// a hostile guest can write) by file descriptor, never by path string: every name is resolved
// below a directory fd the caller holds, never through a symlink and never out of that
// directory, so a name swapped for a symlink to a host path makes the call fail (ELOOP, EXDEV)
// instead of taking the host somewhere the guest chose. See docs/security.md.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>

#include "common/base/result.h"
#include "common/base/unique_fd.h"

namespace peapod {

// Opens `rel` below `dirfd` with openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS |
// RESOLVE_NO_MAGICLINKS). "" or "." is dirfd's directory itself. O_CLOEXEC is added.
Result<UniqueFd> OpenBeneath(int dirfd, const std::string& rel, int flags, mode_t mode = 0);

// Opens the directory at absolute host path `path` (a path the host owns: configuration, not
// anything a guest can write), refusing a symlink as its last component.
Result<UniqueFd> OpenHostDir(const std::string& path);

// Makes directory `rel` below dirfd and any missing parents, each with `mode` (existing ones
// must be directories, not symlinks). Returns the directory, opened.
Result<UniqueFd> MakeDirsBeneath(int dirfd, const std::string& rel, mode_t mode);

// Writes `content` to `rel` below dirfd atomically: a temp file in the same directory, then
// rename over the name. The file has `mode`.
Result<void> WriteFileBeneath(int dirfd, const std::string& rel, const std::string& content,
                              mode_t mode);

// Removes `rel` below dirfd and everything in it by fd: symlinks are removed, never followed;
// a directory on another mount than rel's own is not entered and fails the call with
// FAILED_PRECONDITION (something is still mounted there; nothing is deleted through it).
// Trees deeper than 64 levels are refused the same way. Absent is OK.
Result<void> RemoveTreeBeneath(int dirfd, const std::string& rel);

// The host path fd stands for, as the mount table spells it (no trailing slash).
Result<std::string> PathOfFd(int fd);

// Whether fd (any kind, O_PATH included) is the root of a mount.
Result<bool> IsMountRoot(int fd);

// Lazily unmounts the mount whose root fd is (MNT_DETACH: what is mounted below it goes too).
Result<void> UnmountFd(int fd);

// Unmounts every mount at or below `rel` under dirfd (found in the mount table), walking to
// each by fd without following symlinks: a mount point someone moved behind a symlink is not
// reached by name (it goes with its parent). Absent is OK.
Result<void> UnmountAllBeneath(int dirfd, const std::string& rel);

}  // namespace peapod
