// The warm VM pool: pre-booted VMs with no identity, adopted once by a pod's Start.
// See PodManager::PoolVm in pods.h and docs/sandboxer.md ("Warm pool").
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <thread>

#include <spdlog/spdlog.h>

#include "common/agentapi/agent_client.h"
#include "peapod/agent/v1/agent.pb.h"
#include "sandboxer/network.h"
#include "sandboxer/pod_share.h"
#include "sandboxer/pods.h"
#include "sandboxer/pods_internal.h"
#include "sandboxer/storage.h"
#include "sandboxer/template.h"

namespace peapod::sandboxer {

namespace fs = std::filesystem;
namespace v1 = peapod::agent::v1;
using namespace std::chrono_literals;
using agentapi::Empty;

namespace {

constexpr auto kRetryAfter = 10s;  // after a pool VM failed to boot or died

}  // namespace

std::string RandomBytesHex(size_t n, const char* sep) {
  auto bytes = HostRandomBytes(n);
  std::string raw = bytes.ok() ? std::move(*bytes) : std::string(n, '\0');
  if (!bytes.ok()) {
    auto t = std::chrono::steady_clock::now().time_since_epoch().count();
    for (size_t i = 0; i < n; ++i) raw[i] = static_cast<char>((t >> (8 * (i % 8))) ^ ::getpid());
  }
  std::string out;
  for (size_t i = 0; i < n; ++i) {
    char b[3];
    std::snprintf(b, sizeof(b), "%02x", static_cast<unsigned char>(raw[i]));
    if (i) out += sep;
    out += b;
  }
  return out;
}

std::string PodManager::PoolStateDir(const std::string& name) const {
  return cfg_.state_dir + "/pool/" + name;
}

PodManager::PoolVm* PodManager::FindPoolVm(const std::string& name) {
  auto it =
      std::find_if(pool_.begin(), pool_.end(), [&](const auto& p) { return p->name == name; });
  return it == pool_.end() ? nullptr : it->get();
}

void PodManager::RemovePoolVmNow(const std::string& name, const std::string& tap) {
  (void)backend_->Destroy("peapod-" + name);
  if (!tap.empty()) net_->RemoveTap(tap, "");
  for (const auto& dir : {RunDir(name), PoolStateDir(name)}) {
    if (auto r = storage_->RemoveTree(dir); !r.ok()) spdlog::warn("pool: {}", r.error().ToString());
  }
  launcher_.DiscardVmFiles("peapod-" + name, "");
}

size_t PodManager::pool_ready() const {
  return static_cast<size_t>(
      std::count_if(pool_.begin(), pool_.end(), [](const auto& vm) { return vm->ready; }));
}

void PodManager::FillPool() {
  if (*pool_closed_) return;
  while (pool_.size() < cfg_.pool_size) BootPoolVm();
}

void PodManager::DestroyPool(std::function<void()> done) {
  *pool_closed_ = true;
  std::vector<std::pair<std::string, std::string>> vms;  // name, TAP
  for (auto& vm : pool_) {
    vm->channel = {};
    vms.emplace_back(vm->name, vm->tap);
  }
  pool_.clear();
  Off(
      vm_workers_,
      [this, vms, booting = pool_booting_] {
        // A boot in flight sees the pool closed and removes its own VM; wait (at most a
        // minute) for those to finish.
        for (int i = 0; i < 1200 && *booting > 0; ++i) std::this_thread::sleep_for(50ms);
        if (*booting > 0) spdlog::warn("pool: {} boot(s) still in flight", booting->load());
        for (const auto& [name, tap] : vms) {
          RemovePoolVmNow(name, tap);
          spdlog::info("pool: removed {}", name);
        }
        return Ok();
      },
      [done = std::move(done)](Result<void>) { done(); });
}

void PodManager::BootPoolVm() {
  auto vm = std::make_unique<PoolVm>();
  vm->name = "pool-" + RandomBytesHex(6);
  vm->domain = "peapod-" + vm->name;
  // A locally administered unicast MAC; the agent gives the NIC the pod's MAC at adoption.
  vm->mac = "02:" + RandomBytesHex(5, ":");
  vm->tap = TapName(vm->name);
  std::string dir = RunDir(vm->name), sdir = PoolStateDir(vm->name);
  VmSpec s = launcher_.BaseSpec(vm->domain, dir, sdir, cfg_.vcpus, cfg_.memory_mib);
  s.tap = vm->tap;
  uint64_t generation = UseTemplate(s);
  if (generation) {
    vm->mac = tmpl_.ready->mac;  // the guest's NIC has the template's MAC
    vm->restored = true;
  }
  s.mac = vm->mac;
  std::string name = vm->name;
  spdlog::info("pool: {} {}", vm->restored ? "restoring" : "booting", name);
  pool_.push_back(std::move(vm));
  std::weak_ptr<bool> alive = alive_;
  auto deadline = clock_->Now() + std::chrono::seconds(cfg_.boot_timeout_seconds);
  ++*pool_booting_;
  vm_workers_.Run([this, alive, s, name, dir, sdir, deadline, generation, booting = pool_booting_,
                   closed = pool_closed_, tap = s.tap]() mutable {
    Result<VmInfo> vm = Error(Code::kUnknown, "not started");
    std::string restore_failed;  // the VM booted instead (VmLauncher::Launch)
    auto made = storage_->MakeDirs(sdir);
    if (made.ok()) made = storage_->PrepareShare(dir);
    if (!made.ok()) {
      vm = std::move(made).error();
    } else {
      VmLauncher::Launch l;
      l.spec = s;
      l.tap = VmLauncher::Launch::Tap::kHost;
      vm = launcher_.Run(l);
      restore_failed = l.restore_failed;
    }
    if (*closed) {
      // The sandboxer is going away (DestroyPool waits for us): leave nothing behind.
      RemovePoolVmNow(name, tap);
      --*booting;
      return;
    }
    loop_->Post([this, alive, vm = std::move(vm), name, dir, deadline, restore_failed,
                 generation]() mutable {
      if (alive.expired()) return;
      if (!restore_failed.empty()) TemplateBroken(generation, restore_failed);
      PoolVm* pv = FindPoolVm(name);
      if (!pv) return;
      if (!restore_failed.empty()) pv->restored = false;
      if (!vm.ok()) return DropPoolVm(name, vm.error().ToString());
      pv->pid = vm->pid;
      auto ch = ConnectAgent(dir);
      if (!ch.ok()) return DropPoolVm(name, ch.error().ToString());
      pv->channel = std::move(*ch);
      PoolVmUp(name, deadline);
    });
    --*booting;
  });
}

void PodManager::PoolVmUp(const std::string& name, Clock::TimePoint deadline) {
  PoolVm* pv = FindPoolVm(name);
  if (!pv || !pv->channel.agent) return;
  if (clock_->Now() >= deadline) {
    return DropPoolVm(
        name, "its agent did not answer in time (see " + PoolStateDir(name) + "/console.log)");
  }
  std::weak_ptr<bool> alive = alive_;
  auto agent = agentapi::AgentClient::Over(pv->channel.agent);
  agent.Check(
      v1::CheckRequest(),
      [this, alive, name, deadline, agent](Result<v1::CheckResponse> r) {
        if (alive.expired()) return;
        PoolVm* pv = FindPoolVm(name);
        if (!pv) return;
        if (!r.ok()) {
          clock_->After(200ms, [this, alive, name, deadline] {
            if (!alive.expired()) PoolVmUp(name, deadline);
          });
          return;
        }
        // The storage every pod mounts (share, scratch disk: ext4's
        // modules load here, ~1 s under TCG, unless the template has them)
        // is mounted now, off the adopting pod's path; the adopting
        // CreateSandbox names the same mounts, which the agent counts
        // instead of mounting again.
        // Its NIC comes up now too, on standby (no addresses): the adopting pod's network then
        // changes its MAC live instead of taking the link down and up (~40 ms under TCG). A
        // guest that cannot just gets the usual down and up at adoption. A VM restored from
        // the template has its NIC on standby already; the call, repeated, still runs in this
        // QEMU the netlink paths the pod's call will take, before the pod waits on them.
        auto mount = [this, alive, name, agent, mac = pv->mac] {
          agent.ConfigureNetwork(StandbyNetwork(mac), [this, alive, name, agent](Result<Empty> r) {
            if (alive.expired()) return;
            if (!r.ok()) spdlog::warn("pool: {}: NIC on standby: {}", name, r.error().ToString());
            v1::CreateSandboxRequest sb;
            AddPodStorages(sb, backend_->SupportsDisks());
            agent.CreateSandbox(sb, [this, alive, name](Result<Empty> r) {
              if (alive.expired()) return;
              PoolVmMounted(name, std::move(r));
            });
          });
        };
        if (!pv->restored) return mount();
        SendResumed(pv->channel.agent, [this, alive, name, mount](Result<void> r) {
          if (alive.expired()) return;
          if (!r.ok()) return DropPoolVm(name, r.error().ToString());
          mount();
        });
      },
      1s);
}

void PodManager::PoolVmMounted(const std::string& name, Result<Empty> r) {
  PoolVm* pv = FindPoolVm(name);
  if (!pv) return;
  if (!r.ok()) return DropPoolVm(name, "mount its storage: " + r.error().ToString());
  pv->ready = true;
  spdlog::info("pool: {} ready (QEMU pid {}); {} of {} ready", name, pv->pid, pool_ready(),
               cfg_.pool_size);
}

void PodManager::DropPoolVm(const std::string& name, const std::string& why) {
  auto it =
      std::find_if(pool_.begin(), pool_.end(), [&](const auto& p) { return p->name == name; });
  if (it == pool_.end()) return;
  spdlog::warn("pool: dropping {}: {}", name, why);
  auto vm = std::move(*it);
  pool_.erase(it);
  DestroyPoolVm(std::move(vm));
  // Not at once: a VM that cannot boot would otherwise be retried in a tight loop.
  std::weak_ptr<bool> alive = alive_;
  clock_->After(kRetryAfter, [this, alive] {
    if (!alive.expired()) FillPool();
  });
}

void PodManager::DestroyPoolVm(std::unique_ptr<PoolVm> vm) {
  vm->channel = {};
  vm_workers_.Run([this, name = vm->name, tap = vm->tap] { RemovePoolVmNow(name, tap); });
}

std::unique_ptr<PodManager::PoolVm> PodManager::TakePoolVm(const Pod& pod) {
  if (cfg_.pool_size == 0) return nullptr;
  // Only a pod of the pool's VM size (no limits, or limits that come to the default).
  VmSpec want = SpecFor(pod);
  if (want.vcpus != cfg_.vcpus || want.memory_mib != cfg_.memory_mib) return nullptr;
  auto it = std::find_if(pool_.begin(), pool_.end(), [](const auto& p) { return p->ready; });
  if (it == pool_.end()) return nullptr;
  auto vm = std::move(*it);
  pool_.erase(it);
  // The refill waits for the adopting Start to end (PodManager::Start): a restore or boot
  // beside it would take the CPU that start needs.
  return vm;
}

void PodManager::AdoptPoolVm(const std::string& id, std::unique_ptr<PoolVm> vm_in,
                             Reply<PodStatus> reply) {
  Pod* pod = Find(id);
  if (!pod) {
    DestroyPoolVm(std::move(vm_in));
    return reply(UnknownPod(id));
  }
  spdlog::info("pod {}: adopting pool VM {} (QEMU pid {})", id, vm_in->name, vm_in->pid);
  std::shared_ptr<PoolVm> vm(std::move(vm_in));
  auto net = std::make_shared<std::optional<PodNetwork>>();
  // The pod network is read first. The guest then configures it (its NIC is up on standby and
  // changes its MAC live) while the host joins the TAP to the pod network and moves the files:
  // each takes ~25 ms under TCG, and neither needs the other. Until the TAP is attached, what
  // the guest sends on its NIC goes nowhere.
  // The workers get names, never the PoolVm: its channel is the loop's to destroy.
  Off(
      vm_workers_,
      [this, netns = pod->rec.netns, tap = vm->tap, mac = vm->mac, net]() -> Result<void> {
        if (netns.empty()) return Ok();
        auto n = net_->ReadPodNetwork(netns);
        if (!n.ok()) return std::move(n).error().Wrap("pod network");
        n->tap = tap;
        n->guest.mutable_interfaces(0)->set_current_mac(mac);
        *net = std::move(*n);
        return Ok();
      },
      [this, id, vm, net, reply](Result<void> read) mutable {
        Pod* pod = Find(id);
        if (!pod) {
          DestroyPoolVm(std::make_unique<PoolVm>(std::move(*vm)));
          return reply(UnknownPod(id));
        }
        // FailStart destroys the VM (the record names it) and the TAP wherever it went.
        if (!read.ok()) return FailStart(id, read.error().Wrap("adopt pool VM"), true, reply);
        if (*net) pod->net_call = SendPodNetwork(vm->channel.agent, (*net)->guest);
        Off(
            vm_workers_,
            [this, rec = pod->rec, name = vm->name, net] { return AdoptOnHost(rec, name, *net); },
            [this, id, vm, reply](Result<void> done) mutable {
              Pod* pod = Find(id);
              if (!pod) {
                DestroyPoolVm(std::make_unique<PoolVm>(std::move(*vm)));
                return reply(UnknownPod(id));
              }
              if (!done.ok()) {
                return FailStart(id, done.error().Wrap("adopt pool VM"), true, reply);
              }
              pod->rec.pid = vm->pid;
              pod->rec.scratch = backend_->SupportsDisks();
              pod->mux = std::move(vm->channel.mux);
              pod->agent = std::move(vm->channel.agent);
              SaveThen(*pod, [this, id, reply](Result<void> r) {
                if (!r.ok()) return FailStart(id, std::move(r).error(), true, reply);
                Pod* pod = Find(id);
                if (!pod) return reply(UnknownPod(id));
                pod->Step("adopt_pool_vm");
                // Then as for a VM of its own: hostname and storage (the network's answer is
                // awaited there), and ready. Its agent has answered (the pool VM was ready); a
                // channel gone since fails the calls.
                if (!pod->mux || !pod->mux->upstream_attached()) {
                  return FailStart(id, Error(Code::kUnavailable, "the pool VM went away"), true,
                                   reply);
                }
                SetUpGuest(id, reply);
              });
            });
      });
}

Result<void> PodManager::AdoptOnHost(const PodRecord& rec, const std::string& name,
                                     const std::optional<PodNetwork>& net) {
  // The pod network: the pool VM's TAP joins the CNI interface in the pod netns.
  if (net) PP_TRY_CTX(net_->AttachTap(*net), "pod network");
  // Its files become the pod's: the run dir (sockets, the share QEMU exports, which keeps
  // exporting the same directory under its new name), the console log and scratch disk.
  PP_TRY(storage_->RemoveTree(RunDir(rec.id)));
  PP_TRY(storage_->Rename(RunDir(name), RunDir(rec.id)));
  for (const char* f : {"console.log", "console.log.1", "scratch.img"}) {
    PP_TRY(storage_->Rename(PoolStateDir(name) + "/" + f, storage_->RecordDir(rec.id) + "/" + f,
                            /*missing_ok=*/true));
  }
  (void)storage_->RemoveTree(PoolStateDir(name));
  // The pod's own files in the share it now exports.
  return PreparePodFiles(rec);
}

void PodManager::CleanPoolLeftovers() {
  for (const auto& name : storage_->List(cfg_.state_dir + "/pool")) {
    std::string domain = "peapod-" + name;
    bool owned = std::any_of(pods_.begin(), pods_.end(),
                             [&](const auto& p) { return p.second->rec.domain == domain; });
    if (!owned) {
      spdlog::warn("recover: destroying pool VM {} left by a previous sandboxer", name);
      RemovePoolVmNow(name, TapName(name));
    } else {
      (void)storage_->RemoveTree(PoolStateDir(name));
    }
  }
}

}  // namespace peapod::sandboxer
