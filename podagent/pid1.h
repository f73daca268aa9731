// What peapod-agent does as the guest's PID 1: mount the basics, load the kernel modules the
// image lists, reap orphans, and power the VM off.
#pragma once

#include <optional>
#include <string>

#include "common/base/result.h"
#include "common/loop/event_loop.h"
#include "podagent/process.h"

namespace peapod::agent {

// Mounts proc, sys, dev (devtmpfs), devpts, /dev/shm, cgroup2, /tmp and /run.
Result<void> MountBasics();
// Loads every module listed (one path per line, dependencies first) with finit_module.
// Already-loaded modules are fine. Returns how many were loaded.
Result<int> LoadModules(const std::string& list_path);
// Empties the module files of list `list_path` once they are loaded (the initramfs holds them in
// the guest's RAM, and a loaded module is never read again), except those another list in
// `lists_dir` (modules.<name>, loaded on demand) names too. Returns the bytes freed.
uint64_t FreeLoadedModuleFiles(const std::string& list_path, const std::string& lists_dir);
// Loads the image's list for `name` (/etc/peapod/modules.<name>, a module or an alias) if it
// has one: how many modules were loaded, or nullopt when there is no such list.
Result<std::optional<int>> LoadModulesFor(const std::string& name);
// The guest's /sbin/modprobe (a link to the agent): the kernel runs "modprobe -q -- NAME" when
// it wants a module it lacks (a bridge for brctl, a veth pair, a filesystem). Loads the list
// /etc/peapod/modules.NAME (NAME a module name or an alias the image build wrote a list for).
// Returns the exit status: 0 when every named module is loaded.
int ModprobeMain(int argc, char** argv);

// Local mode on a host whose /sys/fs/cgroup is not a pure cgroup v2 mount (crun refuses
// hybrid hierarchies): moves the agent into a private mount namespace with cgroup2 mounted
// there, so the crun it runs (with --cgroup-manager=disabled) sees a v2-only host. No-op on
// v2 hosts. Must run before any thread starts.
Result<void> PrivateCgroup2();

// Brings the loopback interface up (the pod's localhost).
Result<void> LoopbackUp();
// Syncs and powers off. Never returns when running as PID 1.
[[noreturn]] void PowerOff();

// crun cannot pivot_root when the current root is the initramfs (rootfs, the one mount
// without a parent). Rather than run every container with --no-pivot (a chroot, which a
// process with CAP_SYS_CHROOT can leave), the agent bind-mounts the initramfs onto a
// subdirectory, moves that mount over / and chroots into it: the new root is an ordinary
// mount whose parent is rootfs, which pivot_root accepts, and nothing is copied. Must run
// before anything else is mounted.
Result<void> LeaveInitramfs();

// crun (1.8) binds its binary read-only onto a temporary file (or, failing that, copies it into
// a sealed memfd) and execs that before every command, so a container cannot write the binary
// through /proc/<crun>/exe (CVE-2019-5736). It skips that only when its binary is not a shmem
// file and is on a read-only mount: a read-only bind on the initramfs does not do (the
// initramfs is tmpfs, which answers F_GET_SEALS, and crun then never looks at the mount).
// Under TCG the guard is two or three execs and a copy of the binary per crun command.
//
// Copies the file at `path` into a ramfs mounted at `dir` (ramfs has no seals), makes that
// ramfs read-only, bind-mounts the copy over `path` read-only, and empties the original when
// it is in RAM (its pages go back to the guest; a file on a disk or a share stays as it is).
// On failure nothing is left mounted and `path` is as it was.
Result<void> ServeFromReadOnlyRamfs(const std::string& path, const std::string& dir);

// crun 1.8's own test, asked of `path`: true when crun run from it skips copying itself (a
// fully sealed memfd, or not a shmem file and on a read-only mount).
Result<bool> CrunSkipsItsCopy(const std::string& path);

// Routes exit statuses of every exited child (PID 1 inherits all orphans; a local agent is a
// child subreaper) to reaper, from a signalfd on the loop; stops (powers off as PID 1) on
// SIGTERM/SIGINT. Blocks SIGCHLD/SIGTERM/SIGINT for the process.
Result<void> WatchSignals(EventLoop* loop, bool pid1, Reaper* reaper);

}  // namespace peapod::agent
