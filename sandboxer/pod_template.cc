// The sandboxer's VM template (template.h, docs/sandboxer.md "Templates"): loaded or built once
// per set of inputs, then the state pods and pool VMs are restored from.
#include <sys/stat.h>

#include <chrono>

#include <spdlog/spdlog.h>

#include "common/agentapi/agent_client.h"
#include "peapod/agent/v1/agent.pb.h"
#include "sandboxer/pods.h"
#include "sandboxer/pods_internal.h"
#include "sandboxer/template.h"

namespace peapod::sandboxer {

namespace v1 = peapod::agent::v1;
using namespace std::chrono_literals;
using agentapi::Empty;

namespace {

constexpr char kBuildName[] = "template-build";  // its run dir, TAP and domain name
constexpr char kQemu[] = "/usr/bin/qemu-system-x86_64";
// Filesystems every pod mounts: their modules are loaded in the template, once.
constexpr const char* kPodFilesystems[] = {"ext4"};

}  // namespace

std::string PodManager::TemplatesDir() const { return cfg_.state_dir + "/templates"; }

VmSpec PodManager::TemplateSpec(const std::string& domain, const std::string& dir) const {
  VmSpec s = launcher_.BaseSpec(domain, RunDir(kBuildName), dir, cfg_.vcpus, cfg_.memory_mib);
  s.tap = TapName(kBuildName);
  return s;
}

uint64_t PodManager::UseTemplate(VmSpec& spec) const {
  if (!tmpl_.ready || cfg_.start_from != "template") return 0;
  if (spec.vcpus != cfg_.vcpus || spec.memory_mib != cfg_.memory_mib) return 0;
  spec.restore_from = tmpl_.ready->state;
  spec.restore_identity = tmpl_.ready->identity;
  return tmpl_.ready->generation;
}

void PodManager::TemplateReady(TemplateInfo t) {
  tmpl_.building = false;
  t.generation = ++tmpl_.generations;
  tmpl_.ready = std::move(t);
  FillPool();
}

void PodManager::PrepareTemplate() {
  if (cfg_.start_from != "template" || !backend_->SupportsTemplates() || tmpl_.building ||
      quitting_) {
    FillPool();
    return;
  }
  tmpl_.building = true;
  auto found = std::make_shared<Result<TemplateInfo>>(Error(Code::kUnknown, "not looked"));
  auto key = std::make_shared<std::string>();
  VmSpec shape = TemplateSpec("peapod-" + std::string(kBuildName), "");
  Off(
      vm_workers_,
      [this, shape, found, key]() -> Result<void> {
        PP_ASSIGN_OR_RETURN(*key, TemplateKey(shape, cfg_.scratch_size_mib, kQemu));
        *found = LoadTemplate(TemplatesDir() + "/" + *key, *key);
        return Ok();
      },
      [this, found, key](Result<void> r) {
        if (!r.ok()) {
          tmpl_.building = false;
          spdlog::warn("template: cannot key the template ({}); pods boot", r.error().ToString());
          return FillPool();
        }
        if (found->ok()) {
          spdlog::info("template: {} loaded; pods start from it", (*found)->state);
          return TemplateReady(std::move(**found));
        }
        if (found->error().code() != Code::kNotFound) {
          spdlog::warn("template: {}: building it again", found->error().ToString());
        }
        BuildTemplate(*key);
      });
}

void PodManager::BuildTemplate(const std::string& key) {
  const std::string dir = TemplatesDir() + "/" + key;
  const std::string domain = "peapod-" + std::string(kBuildName);
  VmSpec s = TemplateSpec(domain, dir);
  s.mac = "02:" + RandomBytesHex(5, ":");
  tmpl_.build_key = key;
  tmpl_.build_mac = s.mac;
  tmpl_.build_started = std::chrono::steady_clock::now();
  spdlog::info("template: booting {} to save as {}", domain, dir);
  auto deadline = clock_->Now() + std::chrono::seconds(cfg_.boot_timeout_seconds);
  auto vm = std::make_shared<Result<VmInfo>>(Error(Code::kUnknown, "not started"));
  // Counted with the pool's boots: a Quit waits for them (DestroyPool) and then removes the
  // build VM; a job that finds the sandboxer closing removes its own.
  ++*pool_booting_;
  Off(
      vm_workers_,
      [this, s, dir, key, vm, booting = pool_booting_, closed = pool_closed_]() -> Result<void> {
        auto done = [&](Result<void> r) {
          if (*closed) RemoveTemplateVmNow(key);
          --*booting;
          return r;
        };
        RemoveTemplateVmNow(key);
        // Templates of other inputs are stale: one template per sandboxer.
        for (const auto& name : storage_->List(TemplatesDir())) {
          if (name != key) (void)storage_->RemoveTree(TemplatesDir() + "/" + name);
        }
        if (auto r = storage_->RemoveTree(dir); !r.ok()) return done(r);
        // The template's files are the backend's and ours, not a pod's storage: made here.
        // Root's alone: confined QEMUs pass through the state dir.
        for (const std::string& d : {TemplatesDir(), dir}) {
          if (::mkdir(d.c_str(), 0700) < 0 && errno != EEXIST) {
            return done(Error::Errno("mkdir " + d));
          }
          if (::chmod(d.c_str(), 0700) < 0) return done(Error::Errno("chmod " + d));
        }
        if (auto r = storage_->PrepareShare(RunDir(kBuildName)); !r.ok()) return done(r);
        VmLauncher::Launch l;
        l.spec = s;
        l.tap = VmLauncher::Launch::Tap::kHost;
        *vm = launcher_.Run(l);
        return done(Ok());
      },
      [this, vm, deadline](Result<void> r) {
        if (r.ok() && !vm->ok()) r = vm->error();
        if (r.ok()) {
          auto ch = ConnectAgent(RunDir(kBuildName));
          if (ch.ok()) {
            tmpl_.build_channel = std::move(*ch);
            return TemplateVmUp(deadline);
          }
          r = ch.error();
        }
        TemplateBuildFailed(r.error().Wrap("boot"));
      });
}

void PodManager::TemplateVmUp(Clock::TimePoint deadline) {
  if (quitting_) return TemplateBuildFailed(Error(Code::kUnavailable, "the sandboxer is exiting"));
  if (clock_->Now() >= deadline) {
    return TemplateBuildFailed(Error::Make(
        Code::kDeadlineExceeded, "its agent did not answer within {} s (see {}/console.log)",
        cfg_.boot_timeout_seconds, TemplatesDir() + "/" + tmpl_.build_key));
  }
  std::weak_ptr<bool> alive = alive_;
  auto agent = agentapi::AgentClient::Over(tmpl_.build_channel.agent);
  agent.Check(
      v1::CheckRequest(),
      [this, alive, deadline, agent](Result<v1::CheckResponse> r) {
        if (alive.expired()) return;
        if (!r.ok()) {
          clock_->After(200ms, [this, alive, deadline] {
            if (!alive.expired()) TemplateVmUp(deadline);
          });
          return;
        }
        // Its NIC is saved up, on standby (no addresses, no link-local), as a pool VM's
        // waits: every restored pod's network then changes the MAC live instead of raising
        // the link, the costliest netlink path a restored guest would run cold.
        agent.ConfigureNetwork(StandbyNetwork(tmpl_.build_mac),
                               [this, alive, agent](Result<Empty> r) {
                                 if (alive.expired()) return;
                                 if (!r.ok())
                                   return TemplateBuildFailed(r.error().Wrap("NIC on standby"));
                                 v1::PrepareTemplateRequest prep;
                                 for (const char* fs : kPodFilesystems) prep.add_fstypes(fs);
                                 agent.PrepareTemplate(prep, [this, alive](Result<Empty> r) {
                                   if (alive.expired()) return;
                                   if (!r.ok())
                                     return TemplateBuildFailed(r.error().Wrap("prepare"));
                                   // The host leaves the channel before the save: a restored VM's
                                   // agent waits for a new host, as after a sandboxer restart.
                                   tmpl_.build_channel = {};
                                   clock_->After(200ms, [this, alive] {
                                     if (!alive.expired()) SaveTemplateVm();
                                   });
                                 });
                               });
      },
      1s);
}

void PodManager::SaveTemplateVm() {
  const std::string key = tmpl_.build_key, mac = tmpl_.build_mac;
  const std::string dir = TemplatesDir() + "/" + key;
  auto info = std::make_shared<Result<TemplateInfo>>(Error(Code::kUnknown, "not saved"));
  ++*pool_booting_;
  Off(
      vm_workers_,
      [this, dir, key, mac, info, booting = pool_booting_,
       closed = pool_closed_]() -> Result<void> {
        auto done = [&](Result<void> r) {
          --*booting;
          return r;
        };
        if (*closed) {
          RemoveTemplateVmNow(key);
          return done(Error(Code::kUnavailable, "the sandboxer is exiting"));
        }
        auto saved = backend_->SaveState("peapod-" + std::string(kBuildName), dir + "/state.tmp");
        RemoveTemplateVmNow(key);
        if (saved.ok()) saved = storage_->Rename(dir + "/state.tmp", dir + "/state");
        if (saved.ok()) *info = WriteTemplateManifest(dir, key, mac);
        if (!saved.ok() || !info->ok()) {
          (void)storage_->RemoveTree(dir);
          return done(saved.ok() ? Result<void>(info->error()) : saved);
        }
        return done(Ok());
      },
      [this, info](Result<void> r) {
        if (r.ok() && !info->ok()) r = info->error();
        if (!r.ok()) return TemplateBuildFailed(r.error().Wrap("save"));
        spdlog::info(
            "template: saved {} in {:.1f} s; pods start from it", (*info)->state,
            std::chrono::duration<double>(std::chrono::steady_clock::now() - tmpl_.build_started)
                .count());
        TemplateReady(std::move(**info));
      });
}

void PodManager::TemplateBuildFailed(const Error& why) {
  spdlog::warn("template: building it failed: {}; pods boot", why.ToString());
  tmpl_.build_channel = {};
  Off(
      vm_workers_,
      [this, key = tmpl_.build_key] {
        RemoveTemplateVmNow(key);
        return Ok();
      },
      [this](Result<void>) {
        tmpl_.building = false;
        FillPool();
      });
}

void PodManager::TemplateBroken(uint64_t generation, const std::string& why) {
  // A launch that began with an older template reports late: the current one is not at fault.
  if (!tmpl_.ready || tmpl_.ready->generation != generation) return;
  spdlog::warn("template: {} failed to restore ({}): pods boot; building it again",
               tmpl_.ready->state, why);
  tmpl_.ready.reset();
  if (tmpl_.broke_before) return;  // one that breaks twice is left off until a restart
  tmpl_.broke_before = true;
  // Its files go, so the check finds nothing and builds a new one.
  Off(
      vm_workers_, [this] { return storage_->RemoveTree(TemplatesDir()); },
      [this](Result<void>) { PrepareTemplate(); });
}

void PodManager::RemoveTemplateVmNow(const std::string& key) {
  const std::string domain = "peapod-" + std::string(kBuildName);
  (void)backend_->Destroy(domain);
  net_->RemoveTap(TapName(kBuildName), "");
  (void)storage_->RemoveTree(RunDir(kBuildName));
  std::string scratch;
  if (!ids_.enabled()) scratch = TemplatesDir() + "/" + key + "/scratch.img";
  launcher_.DiscardVmFiles(domain, scratch, ids_.UidOf(domain));
}

void PodManager::CleanTemplateLeftovers() {
  // A crash during a build leaves the build VM's TAP (Recover destroyed the VM itself, its run
  // dir and uid) and perhaps a half-written state; the next build would remove them, but with
  // start_from "boot" none comes.
  net_->RemoveTap(TapName(kBuildName), "");
  for (const auto& key : storage_->List(TemplatesDir())) {
    storage_->RemoveFile(TemplatesDir() + "/" + key + "/state.tmp");
  }
}

bool IsReservedPodId(const std::string& id) {
  return id == kBuildName || id.rfind("pool-", 0) == 0;
}

void PodManager::SendResumed(const std::shared_ptr<ttrpc::Client>& client,
                             std::function<void(Result<void>)> done) {
  v1::ResumedRequest req;
  auto entropy = HostRandomBytes(64);
  if (!entropy.ok()) return done(entropy.error());
  req.set_entropy(std::move(*entropy));
  req.set_realtime_ns(clock_->WallNs());
  agentapi::AgentClient::Over(client).Resumed(req, [done](Result<Empty> r) {
    if (!r.ok()) return done(r.error().Wrap("fresh randomness and clock for the restored VM"));
    done(Ok());
  });
}

}  // namespace peapod::sandboxer
