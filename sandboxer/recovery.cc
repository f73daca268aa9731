// A restarted sandboxer's Recover: records loaded, running VMs re-adopted, what a crash left
// half-done given back (see PodManager::Recover in pods.h).
#include <set>

#include <spdlog/spdlog.h>

#include "sandboxer/pods.h"
#include "sandboxer/pods_internal.h"

namespace peapod::sandboxer {

using Phase = PodRecord::Phase;

Result<void> PodManager::Recover() {
  PP_TRY(storage_->InitRecords());
  // Root's alone and private: the pods' sockets, shares and volume binds (docs/security.md).
  PP_TRY(storage_->PrepareRunRoot(cfg_.run_dir));
  PP_TRY(cache_.Init());
  // Confined QEMUs pass through state_dir and run_dir to their own files and read the cached
  // layer images (vm_identity.h).
  PP_TRY(ids_.Init({cache_.dir()}, {cfg_.kernel, cfg_.initrd}));
  PP_ASSIGN_OR_RETURN(auto records, storage_->LoadRecords());
  PP_ASSIGN_OR_RETURN(auto running, backend_->List());
  std::map<std::string, VmInfo> live;
  for (auto& vm : running) live[vm.name] = vm;
  std::set<std::string> known;
  for (auto& rec : records) {
    known.insert(rec.domain);
    RecoverPod(rec, live);
  }
  SweepLeftovers(known, live);
  return Ok();
}

void PodManager::RecoverPod(const PodRecord& rec, const std::map<std::string, VmInfo>& live) {
  auto pod = std::make_unique<Pod>();
  pod->rec = rec;
  auto vm = live.find(rec.domain);
  bool alive = vm != live.end();
  if (rec.phase == Phase::kRunning && alive) {
    if (vm->second.pid) pod->rec.pid = vm->second.pid;
    if (auto r = AttachChannel(*pod); !r.ok()) {
      // A VM nobody can reach is no pod: stop it rather than report it ready.
      spdlog::error("pod {}: cannot reattach its agent channel ({}); stopping its VM", rec.id,
                    r.error().ToString());
      alive = false;
    } else {
      spdlog::info("pod {}: re-adopted running VM {} (pid {})", rec.id, rec.domain, pod->rec.pid);
      (void)storage_->SaveRecord(pod->rec);
      StartPortForwarder(*pod);
    }
  }
  if ((rec.phase == Phase::kRunning && !alive) || rec.phase == Phase::kStarting) {
    // It died (or never finished starting, or cannot be reached) while we were away.
    if (vm != live.end()) (void)backend_->Destroy(rec.domain);
    pod->rec.phase = rec.phase == Phase::kStarting ? Phase::kCreated : Phase::kStopped;
    if (pod->rec.phase == Phase::kStopped) {
      pod->rec.exited_at_ns = clock_->WallNs();
      pod->rec.exit_status = 255;
    }
    (void)storage_->SaveRecord(pod->rec);
    spdlog::warn("pod {}: its VM is gone; now {}", rec.id, PhaseName(pod->rec.phase));
  } else if (rec.phase != Phase::kRunning && vm != live.end()) {
    // A VM under a pod that is not running: a failed Start's (or a Stop's) cleanup the crash
    // interrupted, after the record was written back.
    spdlog::warn("pod {}: destroying VM {} of a {} pod", rec.id, rec.domain, PhaseName(rec.phase));
    (void)backend_->Destroy(rec.domain);
  }
  if (pod->rec.phase != Phase::kRunning) UnplaceVm(*pod);  // a crash before it went
  // A stopped VM holds no disk and no TAP any more: give them back now rather than at
  // Shutdown, which may never come if containerd forgot the pod. (RemoveTap looks in our
  // netns too, where a Start interrupted between creating and moving the TAP left it.)
  if (pod->rec.phase == Phase::kRunning) {
    for (const auto& d : pod->rec.disks) {
      if (d.cached && !cache_.Adopt(d.path)) {
        spdlog::warn("pod {}: layer image {} is gone", rec.id, d.path);
      }
    }
  } else {
    pod->rec.disks.clear();
    pod->rec.rootfs.clear();
    if (HasTap(pod->rec)) net_->RemoveTap(TapOf(pod->rec), pod->rec.netns);
    pod->rec.tap.clear();
    // A pool VM it was adopting is gone: its next Start boots (or adopts) afresh.
    if (pod->rec.phase == Phase::kCreated) pod->rec.domain = "peapod-" + rec.id;
    (void)storage_->SaveRecord(pod->rec);
  }
  pods_[rec.id] = std::move(pod);
}

void PodManager::SweepLeftovers(const std::set<std::string>& known,
                                const std::map<std::string, VmInfo>& live) {
  // Run dirs (share mounts, sockets) of pods that have no record: a crash between removing the
  // record and the dir, or a record deleted by hand.
  for (const auto& id : storage_->List(cfg_.run_dir + "/pods")) {
    if (pods_.count(id)) continue;
    spdlog::warn("recover: removing {} (no pod record)", RunDir(id));
    if (auto r = storage_->RemoveTree(RunDir(id)); !r.ok()) {
      spdlog::error("recover: {}", r.error().ToString());
    }
  }
  cache_.Collect();
  CleanPoolLeftovers();
  CleanTemplateLeftovers();
  // The files of VMs that are gone (a crash between a VM's end and their removal).
  std::set<std::string> running_domains;
  for (const auto& [id, pod] : pods_) {
    if (pod->rec.phase == Phase::kRunning) running_domains.insert(pod->rec.domain);
  }
  ids_.Sweep(running_domains);
  for (const auto& [name, vm] : live) {
    if (!known.count(name)) {
      spdlog::warn("recover: destroying VM {} that has no pod record", name);
      (void)backend_->Destroy(name);
    }
  }
}

}  // namespace peapod::sandboxer
