// The 9p server of a pod's share when QEMU runs confined (a uid of its own, no capabilities):
// QEMU cannot create files owned by the guest's users, so QEMU's 9p "proxy" backend hands every
// file operation to virtfs-proxy-helper, a root process that keeps only the file capabilities
// 9p passthrough needs and chroots into the share. docs/security.md says why this and not
// virtio-fs.
//
// The helper serves one QEMU: it listens on `socket` (owned by QEMU's uid/gid, so only that
// QEMU can connect), serves the first connection, and exits when QEMU closes it, i.e. with the
// VM. It is started detached (its own session), so it outlives a sandboxer restart as QEMU
// does. A seccomp filter refuses it device nodes and set-user/group-ID bits: a guest's mknod
// of a character or block device, or a chmod/create with S_ISUID or S_ISGID, fails with
// EPERM; FIFOs, sockets and ordinary modes work.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>

#include "common/base/result.h"

namespace peapod::sandboxer {

struct ShareServerSpec {
  std::string helper = "/usr/lib/qemu/virtfs-proxy-helper";
  std::string export_dir;  // the share (read-only bind with the volumes under it)
  // Where QEMU connects; any file there is replaced. Its directory (root's, 0700 until then)
  // is opened to gid (0710) once the socket is uid's alone.
  std::string socket;
  uint32_t uid = 0, gid = 0;  // QEMU's
};

// Starts the helper and returns once it listens (or fails, with what it said).
Result<pid_t> StartShareServer(const ShareServerSpec& spec);

// Kills (SIGKILL) any share server listening on `socket` (found by its command line): one
// a crash left waiting for a QEMU that never came.
void KillShareServers(const std::string& socket);

// Installs, in the calling process, that filter (exposed for the test that checks it).
Result<void> InstallShareServerFilter();

}  // namespace peapod::sandboxer
