// Pod VMs through libvirt. By default the embedded QEMU driver (qemu:///embed?root=...): no
// daemon to install or start, QEMU runs as the sandboxer's child. qemu:///system by config.
//
// What the embedded driver needs (design, measured facts): a qemu.conf under its root with
// stdio_handler = "file" (the default log handler wants virtlogd) and a QEMU user that exists;
// the connection and a running libvirt event loop held for as long as VMs live (a thread
// here); and the sandboxer as child subreaper that reaps QEMU itself — done per QEMU pid via
// a pidfd on the libvirt loop, never with waitpid(-1), which would steal libvirt's own
// children's statuses.
#pragma once

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>

#include "sandboxer/vm_backend.h"

struct _virConnect;

namespace peapod::sandboxer {

struct LibvirtOptions {
  // Empty: qemu:///embed?root=<embed_root>.
  std::string uri;
  std::string embed_root = "/var/lib/peapod/libvirt";
  // The 9p server of confined VMs (share_server.h).
  std::string share_server = "/usr/lib/qemu/virtfs-proxy-helper";
  // False: the QEMUs the embedded driver starts (our children) get no transparent huge pages
  // (PR_SET_THP_DISABLE, which a child inherits across fork and exec; it covers this process
  // too). Cannot apply to a libvirtd's QEMUs (uri set), which is logged.
  bool guest_huge_pages = true;
};

class LibvirtBackend : public VmBackend {
 public:
  static Result<std::unique_ptr<LibvirtBackend>> Open(const LibvirtOptions& opts);
  ~LibvirtBackend() override;

  Result<VmInfo> Start(const VmSpec& spec) override;
  Result<void> Destroy(const std::string& name) override;
  Result<std::vector<VmInfo>> List() override;
  Result<void> AttachDisk(const std::string& name, const DiskSpec& disk) override;
  Result<void> DetachDisk(const std::string& name, const DiskSpec& disk) override;
  void SetOnStopped(std::function<void(const std::string& name)> cb) override;
  bool ConfinesVms() const override { return true; }
  bool SupportsTemplates() const override { return true; }
  Result<void> SaveState(const std::string& name, const std::string& path) override;

  const std::string& uri() const { return uri_; }

 private:
  // Restores a VM started with "-incoming defer" from the state file fd (read-only; QEMU
  // gets a dup) and waits until its vCPUs run.
  Result<void> RestoreState(const std::string& name, int fd);
  LibvirtBackend() = default;
  Result<pid_t> FindQemuPid(const std::string& name);
  void ReapWhenExits(const std::string& name, pid_t pid, bool our_child = false);
  void Stopped(const std::string& name);
  void DropQemuLog(const std::string& name);

  std::string uri_;
  std::string embed_root_;
  std::string share_server_;
  std::string emulator_;  // a root QEMU behind a capability-bounding wrapper (empty: default)
  _virConnect* conn_ = nullptr;
  int lifecycle_cb_ = -1;
  std::thread event_thread_;
  std::atomic<bool> quit_{false};
  int wake_timer_ = -1;
  int orphan_timer_ = -1;
  std::set<pid_t> orphans_seen_;  // zombie children at the last sweep (libvirt thread)
  std::mutex mu_;
  std::function<void(const std::string&)> on_stopped_;  // guarded by mu_
};

}  // namespace peapod::sandboxer
