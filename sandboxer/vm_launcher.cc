#include "sandboxer/vm_launcher.h"

#include <fcntl.h>
#include <unistd.h>

#include <chrono>

#include "sandboxer/node_check.h"

namespace peapod::sandboxer {

bool UsesKvm(const Config& cfg) {
  if (cfg.accel == "kvm") return true;
  if (cfg.accel == "tcg") return false;
  static const bool works = KvmWorks();  // auto: asked once
  return works;
}

bool VmLauncher::UseKvm() const { return UsesKvm(cfg_); }

VmSpec VmLauncher::BaseSpec(const std::string& domain, const std::string& run_dir,
                            const std::string& state_dir, unsigned vcpus,
                            uint64_t memory_mib) const {
  VmSpec s;
  s.name = domain;
  s.kernel = cfg_.kernel;
  s.initrd = cfg_.initrd;
  s.cmdline = cfg_.cmdline;
  s.vcpus = vcpus;
  s.memory_mib = memory_mib;
  s.kvm = UseKvm();
  s.tcg_tb_cache_mib = cfg_.tcg_tb_cache_mib;
  s.agent_socket = run_dir + "/vm-agent.sock";
  s.share_dir = run_dir + "/share";
  s.console_log = state_dir + "/console.log";
  if (ids_->enabled()) {
    s.gid = ids_->gid();  // the uid comes with PrepareVmFiles
    s.share_socket = ids_->SocketPath(domain);
  }
  if (backend_->SupportsDisks()) {
    std::string scratch = ids_->enabled() ? ids_->ScratchPath(domain) : state_dir + "/scratch.img";
    s.disks.push_back({scratch, 0, /*readonly=*/false});
  }
  return s;
}

Result<void> VmLauncher::PrepareVmFiles(VmSpec& spec) {
  if (ids_->enabled()) {
    PP_ASSIGN_OR_RETURN(spec.uid, ids_->Acquire(spec.name));
  }
  for (const auto& d : spec.disks) {
    if (d.readonly) continue;
    auto made = storage_->MakeScratchDisk(d.path, cfg_.scratch_size_mib);
    if (made.ok() && ids_->enabled()) made = ids_->GiveFile(d.path, spec.uid);
    if (!made.ok()) {
      DiscardVmFiles(spec.name, d.path, spec.uid);
      return made;
    }
  }
  return Ok();
}

void VmLauncher::DiscardVmFiles(const std::string& domain, const std::string& scratch,
                                uint32_t uid) {
  if (!scratch.empty() && (uid == 0 || ids_->UidOf(domain) == uid)) storage_->RemoveFile(scratch);
  ids_->Release(domain, uid);
}

Result<VmInfo> VmLauncher::Run(Launch& l) {
  VmSpec& spec = l.spec;
  auto at = std::chrono::steady_clock::now();
  auto step = [&](const char* name) {
    auto now = std::chrono::steady_clock::now();
    l.steps.emplace_back(name, std::chrono::duration<double, std::milli>(now - at).count());
    at = now;
  };
  auto discard = [&] {
    std::string scratch;
    for (const auto& d : spec.disks) {
      if (!d.readonly) scratch = d.path;
    }
    DiscardVmFiles(spec.name, scratch, spec.uid);
  };
  Result<void> files = PrepareVmFiles(spec);
  step("scratch_disk");
  if (!files.ok()) {
    discard();
    return std::move(files).error().Wrap("scratch disk");
  }
  if (l.tap == Launch::Tap::kPodNetns) {
    auto n = net_->PrepareTap(l.pod_id, l.netns);
    if (!n.ok()) {
      discard();
      return std::move(n).error().Wrap("pod network");
    }
    l.net = std::move(*n);
    spec.tap = l.net->tap;
    spec.mac = l.net->mac;
  } else if (l.tap == Launch::Tap::kHost) {
    if (auto t = net_->CreateTap(spec.tap); !t.ok()) {
      discard();
      return std::move(t).error();
    }
  }
  step("tap_create");
  Result<VmInfo> vm = backend_->Start(spec);
  if (!vm.ok() && !spec.restore_from.empty() && vm.error().code() == Code::kDataLoss) {
    // A template state that does not load is no reason to fail the VM: it boots, with the uid,
    // disk and TAP it has. (Any other failure is the VM's own; a boot would fail the same way.)
    l.restore_failed = vm.error().ToString();
    spec.restore_from.clear();
    spec.restore_identity.clear();
    vm = backend_->Start(spec);
  }
  step("vm_define_start");
  if (vm.ok() && l.net) {
    if (auto a = net_->AttachTap(*l.net); !a.ok()) {
      (void)backend_->Destroy(spec.name);
      vm = std::move(a).error().Wrap("pod network");
    }
  }
  step("tap_attach");
  if (!vm.ok()) {
    if (l.net) net_->RemoveTap(l.net->tap, l.netns);
    if (l.tap == Launch::Tap::kHost) net_->RemoveTap(spec.tap, "");
    l.net.reset();
    discard();
  }
  return vm;
}

}  // namespace peapod::sandboxer
