// A pod's 9p share on the host, laid out so that the host never resolves a path the guest can
// write (docs/security.md):
//
//   <pod run dir>/host    0700, the host's own tree: the pod files and the empty targets
//                         volumes/<container>/<n>. Never exported; only the sandboxer writes it.
//   <pod run dir>/share   a read-only, nosuid, nodev, noexec bind mount of host/: what QEMU
//                         exports. The guest can change nothing in it, not a name, a mode or a
//                         link. Volumes are bind-mounted onto its targets through file
//                         descriptors (open_tree + move_mount), each nosuid and nodev, and
//                         read-only from the moment it appears when asked.
//
// A guest can write inside a writable volume, never in the directories that lead to one, so
// every path the host walks here is its own; the walks are by fd and refuse symlinks anyway.
#pragma once

#include <string>
#include <vector>

#include "common/base/result.h"

namespace peapod::sandboxer {

struct VolumeRequest {
  std::string host_path;
  bool readonly = false;
  bool recursive_readonly = false;  // mounts below host_path read-only too
  // Mounts the host makes below host_path later reach the guest (the bind is the host mount's
  // slave; never its peer, so nothing the pod does to its copy reaches the host). Otherwise the
  // bind is private. Never under recursive_readonly: a later mount would come in writable.
  bool propagate_from_host = false;
};

// A mount below a volume's host path, shared on its own (see ShareVolumes).
struct SharedSubmount {
  std::string path;        // relative to the volume root, starting with '/'
  std::string guest_path;  // in the guest
  bool readonly = false;
};

struct SharedVolume {
  std::string guest_path;
  std::vector<SharedSubmount> submounts;  // parents first
};

// Where the guest mounts the share (the agent is told in CreateSandbox).
inline constexpr char kGuestShareDir[] = "/run/peapod/share";
inline constexpr char kShareHostDir[] = "host";
inline constexpr char kShareDir[] = "share";

// Lays out run dir `run_dir` (made 0700 if missing) with host/ and share/. Idempotent: a share
// already mounted is kept.
Result<void> PrepareShare(const std::string& run_dir);

// Writes the file `name` (no slashes) at the top of the share, mode 0644, atomically.
Result<void> WriteShareFile(const std::string& run_dir, const std::string& name,
                            const std::string& content);

// Bind-mounts what `source_fd` is (a directory or file, any open mode, O_PATH included; not its
// submounts) at `rel` in the share, e.g. "volumes/c1/0"; the target and its parents are made
// in host/. nosuid and nodev always, read-only if asked; private, or the source's slave when
// `from_host`. ALREADY_EXISTS if something is mounted at rel already (it is left alone).
Result<void> BindIntoShare(const std::string& run_dir, int source_fd, const std::string& rel,
                           bool readonly, bool from_host = false);

// Makes `dir` (the pods' run dirs' parent) a private mount of its own, so that nothing mounted
// below it propagates to other mount namespaces or back to the host's mounts. Idempotent.
Result<void> MakePrivateMount(const std::string& dir);

// Unmounts what is mounted at or below `rel` in the share and removes rel from host/.
Result<void> RemoveFromShare(const std::string& run_dir, const std::string& rel);

// Shares a container's volumes: each host path is bound (not recursively) at
// volumes/<container>/<n> from n = first on, and every mount below it on its own (so the host
// can still unmount and remove those mount points while the pod runs, as with runc); mounts
// at or below `skip_below` (the pods' run dirs) are not a volume's. The mounts below a volume are
// reached from the volume by fd without following symlinks. All or nothing: on failure what
// was bound is removed again.
struct SharedVolumes {
  std::vector<SharedVolume> guest;  // one per volume, in order
  std::vector<std::string> rels;    // what was bound, relative to the share
};
Result<SharedVolumes> ShareVolumesNow(const std::string& run_dir, const std::string& container,
                                      size_t first, const std::vector<VolumeRequest>& volumes,
                                      const std::string& skip_below);

}  // namespace peapod::sandboxer
