// Who a pod's QEMU is (docs/security.md, "QEMU confined per VM"): a uid of its own, taken
// from the configured range for as long as the VM and its files exist, and the group all pod
// VMs share. The VM's files live in two directories the sandboxer owns:
//
//   <state_dir>/vm/<domain>/   root 0710 :vm_gid   uid (the record, root 0600), scratch.img
//                                                   (the VM's uid, 0600)
//   <run_dir>/vm/<domain>/     root 0700, 0710 :vm_gid once the 9p server's socket `9p` is
//                                                   the VM's uid's alone (share_server.cc)
//
// QEMU can open what is its own and nothing else: no directory is writable by it (it cannot
// fill the host's disk or /run with files), another VM's QEMU (same group) finds scratch
// disks and sockets owned by another uid. The group can traverse state_dir, run_dir, the two
// vm/ directories and the layer cache (images readable by the group: every pod VM may read
// every cached layer, as it could pull the image itself); nobody else can.
//
// Thread-safe: Starts acquire on the worker pool.
#pragma once

#include <cstdint>
#include <mutex>
#include <set>
#include <string>

#include "common/base/result.h"

namespace peapod::sandboxer {

class VmIdentities {
 public:
  VmIdentities(std::string state_dir, std::string run_dir, uint32_t uid_base, uint32_t uid_count,
               uint32_t gid);

  // False when QEMU runs as root (vm_uid_base 0): nothing below applies.
  bool enabled() const { return uid_base_ != 0; }
  uint32_t gid() const { return gid_; }

  // Lays out the vm/ directories and lets the group through state_dir, run_dir and each of
  // `group_dirs` (root 0710 :gid). Refuses, saying which and how to fix it, a parent of those
  // that a process of another uid cannot pass through (QEMU would fail to open its disks),
  // and any of `readable` (kernel, initrd) that such a process cannot read.
  Result<void> Init(const std::set<std::string>& group_dirs, const std::set<std::string>& readable);
  // Removes the directories (and so frees the uids) of every domain not in `keep`.
  void Sweep(const std::set<std::string>& keep);

  std::string StateDir(const std::string& domain) const;
  std::string RunDir(const std::string& domain) const;
  std::string ScratchPath(const std::string& domain) const {
    return StateDir(domain) + "/scratch.img";
  }
  std::string SocketPath(const std::string& domain) const { return RunDir(domain) + "/9p"; }

  // A free uid for domain, recorded; both directories made afresh (whatever a previous VM of
  // the same name left is removed first). Free: neither recorded nor held by any process.
  Result<uint32_t> Acquire(const std::string& domain);
  // Gives a file of domain's to its QEMU: owner uid, group gid, mode 0600.
  Result<void> GiveFile(const std::string& path, uint32_t uid) const;
  // Removes both directories (the scratch disk with them); the uid is free again once no
  // process runs as it. only_uid: only if domain's record still names that uid (a cleanup
  // that runs late must not remove a newer VM's files).
  void Release(const std::string& domain, uint32_t only_uid = 0);
  // The uid recorded for domain, 0 if none.
  uint32_t UidOf(const std::string& domain) const;

 private:
  std::string state_vm_, run_vm_;
  std::string state_dir_, run_dir_;
  uint32_t uid_base_, uid_count_, gid_;
  mutable std::mutex mu_;
};

}  // namespace peapod::sandboxer
