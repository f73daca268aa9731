#include "tests/sandboxer/fakes.h"

#include <sys/stat.h>

#include <filesystem>
#include <fstream>
#include <future>

#include "common/agentapi/agent_client.h"
#include "common/base/unique_fd.h"

namespace peapod::sandboxer::testing {

namespace fs = std::filesystem;
namespace v1 = peapod::agent::v1;

void Faults::FailNext(const std::string& op, Error e, int after) {
  std::lock_guard lock(mu_);
  next_[op].emplace_back(after, std::move(e));
}

std::optional<Error> Faults::Take(const std::string& op) {
  std::lock_guard lock(mu_);
  auto it = next_.find(op);
  if (it == next_.end() || it->second.empty()) return std::nullopt;
  auto& [after, e] = it->second.front();
  if (after > 0) {
    --after;
    return std::nullopt;
  }
  Error out = std::move(e);
  it->second.pop_front();
  return out;
}

#define PP_FAKE_FAULT(op)                              \
  do {                                                 \
    if (auto pp_e = Take(op)) return *std::move(pp_e); \
  } while (0)

// ---- FakeNetwork

void FakeNetwork::AddNetns(const std::string& path) {
  std::lock_guard lock(mu_);
  netns_.insert(path);
}

void FakeNetwork::VanishTap(const std::string& tap) {
  std::lock_guard lock(mu_);
  taps_.erase(tap);
}

std::map<std::string, std::string> FakeNetwork::taps() {
  std::lock_guard lock(mu_);
  return taps_;
}

bool FakeNetwork::NetnsExists(const std::string& netns) {
  std::lock_guard lock(mu_);
  return netns_.count(netns) > 0;
}

namespace {
PodNetwork CniInterface(const std::string& netns) {
  PodNetwork n;
  n.netns = netns;
  n.cni_ifname = "eth0";
  n.mac = "0a:58:0a:00:00:07";
  n.mtu = 1500;
  auto* ifc = n.guest.add_interfaces();
  ifc->set_name("eth0");
  ifc->set_mac(n.mac);
  return n;
}
}  // namespace

Result<PodNetwork> FakeNetwork::PrepareTap(const std::string& pod_id, const std::string& netns) {
  PP_FAKE_FAULT("PrepareTap");
  std::lock_guard lock(mu_);
  if (!netns_.count(netns)) return Error::NotFound("netns {} does not exist", netns);
  PodNetwork n = CniInterface(netns);
  n.tap = TapName(pod_id);
  if (taps_.count(n.tap)) return Error::Make(Code::kAlreadyExists, "TAP {} exists", n.tap);
  taps_[n.tap] = "";
  return n;
}

Result<PodNetwork> FakeNetwork::ReadPodNetwork(const std::string& netns) {
  PP_FAKE_FAULT("ReadPodNetwork");
  std::lock_guard lock(mu_);
  if (!netns_.count(netns)) return Error::NotFound("netns {} does not exist", netns);
  return CniInterface(netns);
}

Result<void> FakeNetwork::CreateTap(const std::string& tap) {
  PP_FAKE_FAULT("CreateTap");
  std::lock_guard lock(mu_);
  if (taps_.count(tap)) return Error::Make(Code::kAlreadyExists, "TAP {} exists", tap);
  taps_[tap] = "";
  return Ok();
}

Result<void> FakeNetwork::AttachTap(const PodNetwork& net) {
  PP_FAKE_FAULT("AttachTap");
  std::lock_guard lock(mu_);
  auto it = taps_.find(net.tap);
  if (it == taps_.end()) return Error::NotFound("no TAP {} (it vanished)", net.tap);
  if (!netns_.count(net.netns)) return Error::NotFound("netns {} is gone", net.netns);
  it->second = net.netns;
  return Ok();
}

void FakeNetwork::RemoveTap(const std::string& tap, const std::string&) {
  std::lock_guard lock(mu_);
  taps_.erase(tap);
}

// ---- FakeStorage

std::map<std::string, PodRecord> FakeStorage::records() {
  std::lock_guard lock(mu_);
  return records_;
}
std::set<std::string> FakeStorage::dirs() {
  std::lock_guard lock(mu_);
  return dirs_;
}
std::set<std::string> FakeStorage::scratch_disks() {
  std::lock_guard lock(mu_);
  return scratch_;
}
std::set<std::string> FakeStorage::binds() {
  std::lock_guard lock(mu_);
  return binds_;
}
std::map<std::string, std::string> FakeStorage::files() {
  std::lock_guard lock(mu_);
  return files_;
}
std::vector<PodRecord> FakeStorage::history() {
  std::lock_guard lock(mu_);
  return history_;
}
void FakeStorage::PutRecord(const PodRecord& rec) {
  std::lock_guard lock(mu_);
  records_[rec.id] = rec;
}
void FakeStorage::HoldShares() {
  std::lock_guard lock(mu_);
  hold_shares_ = true;
}
void FakeStorage::ReleaseShares() {
  {
    std::lock_guard lock(mu_);
    hold_shares_ = false;
  }
  shares_cv_.notify_all();
}

void FakeStorage::HoldSaves(PodRecord::Phase phase) {
  std::lock_guard lock(mu_);
  hold_saves_ = phase;
}
void FakeStorage::ReleaseSaves() {
  {
    std::lock_guard lock(mu_);
    hold_saves_.reset();
  }
  shares_cv_.notify_all();
}

Result<void> FakeStorage::SaveRecord(const PodRecord& rec) {
  {
    std::unique_lock lock(mu_);
    shares_cv_.wait(lock, [&] { return hold_saves_ != rec.phase; });
  }
  PP_FAKE_FAULT("SaveRecord");
  std::lock_guard lock(mu_);
  records_[rec.id] = rec;
  history_.push_back(rec);
  return Ok();
}

Result<void> FakeStorage::RemoveRecord(const std::string& id) {
  PP_FAKE_FAULT("RemoveRecord");
  std::lock_guard lock(mu_);
  records_.erase(id);
  ErasePrefix(RecordDir(id));  // the pod's record dir goes, with its scratch disk
  return Ok();
}

Result<std::vector<PodRecord>> FakeStorage::LoadRecords() {
  std::lock_guard lock(mu_);
  std::vector<PodRecord> out;
  for (const auto& [id, r] : records_) out.push_back(r);
  return out;
}

std::string FakeStorage::RecordDir(const std::string& id) const {
  return state_dir_ + "/pods/" + id;
}

Result<void> FakeStorage::PrepareRunRoot(const std::string& run_dir) {
  std::error_code ec;
  fs::create_directories(run_dir + "/pods", ec);
  if (ec) return Error::Errno("mkdir " + run_dir, ec.value());
  return Ok();
}

Result<void> FakeStorage::PrepareShare(const std::string& run_dir) {
  PP_FAKE_FAULT("PrepareShare");
  std::error_code ec;
  fs::create_directories(run_dir + "/share", ec);  // real: sockets go into the run dir
  if (ec) return Error::Errno("mkdir " + run_dir, ec.value());
  return Ok();
}

Result<void> FakeStorage::WriteShareFile(const std::string& run_dir, const std::string& name,
                                         const std::string& content) {
  PP_FAKE_FAULT("WriteShareFile");
  std::lock_guard lock(mu_);
  files_[run_dir + "/share/" + name] = content;
  return Ok();
}

Result<SharedVolumes> FakeStorage::ShareVolumes(const std::string& run_dir,
                                                const std::string& container, size_t first,
                                                const std::vector<VolumeRequest>& volumes,
                                                const std::string&) {
  {
    std::unique_lock lock(mu_);
    shares_cv_.wait(lock, [&] { return !hold_shares_; });
  }
  PP_FAKE_FAULT("ShareVolumes");
  std::lock_guard lock(mu_);
  SharedVolumes out;
  for (size_t i = 0; i < volumes.size(); ++i) {
    std::string rel = "volumes/" + container + "/" + std::to_string(first + i);
    binds_.insert(run_dir + "/share/" + rel);
    out.rels.push_back(rel);
    SharedVolume v;
    v.guest_path = std::string(kGuestShareDir) + "/" + rel;
    out.guest.push_back(v);
  }
  return out;
}

void FakeStorage::ErasePrefix(const std::string& prefix) {
  auto under = [&](const std::string& p) { return p == prefix || p.rfind(prefix + "/", 0) == 0; };
  std::erase_if(binds_, under);
  std::erase_if(scratch_, under);
  std::erase_if(dirs_, under);
  std::erase_if(files_, [&](const auto& kv) { return under(kv.first); });
}

Result<void> FakeStorage::RemoveFromShare(const std::string& run_dir, const std::string& rel) {
  PP_FAKE_FAULT("RemoveFromShare");
  std::lock_guard lock(mu_);
  ErasePrefix(run_dir + "/share/" + rel);
  return Ok();
}

Result<void> FakeStorage::WriteFile(const std::string& path, const std::string& content) {
  PP_FAKE_FAULT("WriteFile");
  std::lock_guard lock(mu_);
  files_[path] = content;
  return Ok();
}

void FakeStorage::RemoveFile(const std::string& path) {
  std::lock_guard lock(mu_);
  files_.erase(path);
  scratch_.erase(path);
}

Result<void> FakeStorage::MakeDirs(const std::string& path) {
  std::lock_guard lock(mu_);
  dirs_.insert(path);
  return Ok();
}

Result<void> FakeStorage::RemoveTree(const std::string& path) {
  PP_FAKE_FAULT("RemoveTree");
  std::error_code ec;
  fs::remove_all(path, ec);
  std::lock_guard lock(mu_);
  ErasePrefix(path);
  return Ok();
}

Result<void> FakeStorage::Rename(const std::string& from, const std::string& to, bool missing_ok) {
  PP_FAKE_FAULT("Rename");
  std::error_code ec;
  bool real = fs::exists(from, ec);
  if (real) {
    fs::rename(from, to, ec);
    if (ec) return Error::Errno("rename " + from, ec.value());
  }
  std::lock_guard lock(mu_);
  bool found = real;
  auto move = [&](auto& set) {
    std::vector<std::string> moved;
    for (auto it = set.begin(); it != set.end();) {
      if (*it == from || it->rfind(from + "/", 0) == 0) {
        moved.push_back(to + it->substr(from.size()));
        it = set.erase(it);
      } else {
        ++it;
      }
    }
    found |= !moved.empty();
    set.insert(moved.begin(), moved.end());
  };
  move(binds_);
  move(scratch_);
  move(dirs_);
  if (!found && !missing_ok) return Error::NotFound("rename {}: no such file", from);
  return Ok();
}

std::vector<std::string> FakeStorage::List(const std::string& dir) {
  std::set<std::string> names;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) names.insert(e.path().filename());
  std::lock_guard lock(mu_);
  for (const auto& d : dirs_) {
    if (d.rfind(dir + "/", 0) != 0) continue;
    std::string rest = d.substr(dir.size() + 1);
    names.insert(rest.substr(0, rest.find('/')));
  }
  return {names.begin(), names.end()};
}

Result<void> FakeStorage::MakeScratchDisk(const std::string& path, uint64_t) {
  PP_FAKE_FAULT("MakeScratchDisk");
  std::lock_guard lock(mu_);
  scratch_.insert(path);
  return Ok();
}

// ---- FakeClock

Clock::TimePoint FakeClock::Now() const {
  return EventLoop::Clock::now() + std::chrono::nanoseconds(offset_ns_.load());
}

int64_t FakeClock::WallNs() const {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::system_clock::now().time_since_epoch())
             .count() +
         wall_offset_ns_.load();
}

void FakeClock::After(std::chrono::milliseconds after, std::function<void()> fn) {
  timers_.emplace(Now() + after, std::move(fn));
  loop_->AddTimer(after, [this, alive = alive_] {
    if (*alive) FireDue();
  });
}

void FakeClock::Jump(std::chrono::milliseconds d) {
  offset_ns_ += std::chrono::duration_cast<std::chrono::nanoseconds>(d).count();
  loop_->Post([this, alive = alive_] {
    if (*alive) FireDue();
  });
}

void FakeClock::JumpWall(std::chrono::milliseconds d) {
  wall_offset_ns_ += std::chrono::duration_cast<std::chrono::nanoseconds>(d).count();
}

void FakeClock::FireDue() {
  auto now = Now();
  std::vector<std::function<void()>> due;
  while (!timers_.empty() && timers_.begin()->first <= now) {
    due.push_back(std::move(timers_.begin()->second));
    timers_.erase(timers_.begin());
  }
  for (auto& fn : due) fn();
}

// ---- FakeVms

struct FakeVms::Vm {
  std::string name;
  int pid = 0;
  bool hang = false;
  std::unique_ptr<ttrpc::Server> server;  // guest loop
  std::optional<v1::CreateSandboxRequest> sandbox;
  std::optional<v1::ConfigureNetworkRequest> network;
  std::function<void()> held_network_answer;  // HoldNetworkUntilSandbox
};

FakeVms::FakeVms() {
  auto loop = EventLoop::Create();
  if (!loop.ok()) throw std::runtime_error(loop.error().ToString());
  loop_ = std::move(loop).value();
  thread_ = std::thread([this] { loop_->Run(); });
}

FakeVms::~FakeVms() {
  SetOnStopped(nullptr);
  for (const auto& name : running()) StopVm(name);
  loop_->Stop();
  thread_.join();
}

namespace {
template <typename Fn>
auto OnLoop(EventLoop* loop, Fn fn) -> decltype(fn()) {
  std::packaged_task<decltype(fn())()> task(std::move(fn));
  auto f = task.get_future();
  loop->Post([&task] { task(); });
  return f.get();
}
}  // namespace

void FakeVms::Serve(const std::shared_ptr<Vm>& vm) {
  auto& s = *vm->server;
  std::weak_ptr<Vm> weak = vm;
  using ttrpc::RegisterTyped;
  const std::string svc = agentapi::kService;
  RegisterTyped<v1::CheckRequest, v1::CheckResponse>(
      s, svc, "Check", [weak](const ttrpc::CallContext&, v1::CheckRequest&&, auto done) {
        auto vm = weak.lock();
        if (!vm || vm->hang) return;  // never answered
        done(v1::CheckResponse());
      });
  auto note = [this, weak](const char* call) {
    auto vm = weak.lock();
    if (!vm) return;
    std::lock_guard lock(mu_);
    calls_[vm->name].push_back(call);
  };
  RegisterTyped<v1::ConfigureNetworkRequest, agentapi::Empty>(
      s, svc, "ConfigureNetwork",
      [this, weak, note](const ttrpc::CallContext&, v1::ConfigureNetworkRequest&& req, auto done) {
        bool standby = req.interfaces_size() == 1 && req.interfaces(0).standby();
        note(standby ? "ConfigureNetwork(standby)" : "ConfigureNetwork");
        if (standby) return done(agentapi::Empty());  // a pool VM's NIC, up ahead of its pod
        if (auto e = Take("ConfigureNetwork")) return done(std::move(*e));
        auto vm = weak.lock();
        if (vm) vm->network = std::move(req);
        if (vm && hold_network_) {
          vm->held_network_answer = [done] { done(agentapi::Empty()); };
          return;
        }
        done(agentapi::Empty());
      });
  RegisterTyped<v1::CreateSandboxRequest, agentapi::Empty>(
      s, svc, "CreateSandbox",
      [weak, note](const ttrpc::CallContext&, v1::CreateSandboxRequest&& req, auto done) {
        note("CreateSandbox");
        auto vm = weak.lock();
        if (vm) vm->sandbox = std::move(req);
        if (vm && vm->held_network_answer) std::exchange(vm->held_network_answer, nullptr)();
        done(agentapi::Empty());
      });
  RegisterTyped<v1::PrepareTemplateRequest, agentapi::Empty>(
      s, svc, "PrepareTemplate",
      [note](const ttrpc::CallContext&, v1::PrepareTemplateRequest&&, auto done) {
        note("PrepareTemplate");
        done(agentapi::Empty());
      });
  RegisterTyped<v1::ResumedRequest, agentapi::Empty>(
      s, svc, "Resumed", [note](const ttrpc::CallContext&, v1::ResumedRequest&& req, auto done) {
        if (req.entropy().size() < 32) return done(Error::Invalid("too little entropy"));
        note("Resumed");
        done(agentapi::Empty());
      });
  RegisterTyped<v1::ContainerRequest, v1::StatsContainerResponse>(
      s, svc, "StatsContainer",
      [this](const ttrpc::CallContext&, v1::ContainerRequest&&, auto done) {
        if (!hold_stats_) done(v1::StatsContainerResponse());
      });
  RegisterTyped<v1::DestroySandboxRequest, agentapi::Empty>(
      s, svc, "DestroySandbox",
      [this, weak](const ttrpc::CallContext&, v1::DestroySandboxRequest&&, auto done) {
        done(agentapi::Empty());
        // The guest powers off once it has answered.
        if (auto vm = weak.lock()) {
          loop_->AddTimer(std::chrono::milliseconds(20),
                          [this, name = vm->name] { StopVm(name, /*on_loop=*/true); });
        }
      });
}

Result<void> FakeVms::SaveState(const std::string& name, const std::string& path) {
  {
    std::lock_guard lock(mu_);
    if (!vms_.count(name)) return Error::NotFound("no domain {}", name);
  }
  std::ofstream f(path, std::ios::trunc);
  f << "the saved state of " << name << "\n";
  f.close();
  if (!f) return Error::Errno("write " + path);
  ::chmod(path.c_str(), 0600);
  return Ok();
}

std::vector<std::string> FakeVms::CallsOf(const std::string& name) {
  std::lock_guard lock(mu_);
  return calls_[name];
}

bool FakeVms::Restored(const std::string& name) {
  std::lock_guard lock(mu_);
  return restored_.count(name) > 0;
}

Result<VmInfo> FakeVms::Start(const VmSpec& spec) {
  PP_FAKE_FAULT("Start");
  if (!spec.restore_from.empty()) {
    std::ifstream f(spec.restore_from);
    std::string head;
    std::getline(f, head);
    if (!f || head.rfind("bad", 0) == 0) {
      return Error(Code::kDataLoss, "VM " + spec.name + ": the state does not load");
    }
  }
  auto vm = std::make_shared<Vm>();
  vm->name = spec.name;
  {
    std::lock_guard lock(mu_);
    ++start_calls_;
    if (vms_.count(spec.name)) {
      return Error::Make(Code::kAlreadyExists, "domain {} is already running", spec.name);
    }
    vm->pid = next_pid_++;
    vm->hang = std::exchange(hang_next_, false);
  }
  ::unlink(spec.agent_socket.c_str());
  PP_ASSIGN_OR_RETURN(auto listener, ListenUnix(spec.agent_socket));
  auto served = OnLoop(loop_.get(), [&]() -> Result<void> {
    vm->server = std::make_unique<ttrpc::Server>(loop_.get());
    vm->server->set_max_queued_bytes(ttrpc::kNoQueueCap);
    Serve(vm);
    return vm->server->ServeListener(std::move(listener));
  });
  if (!served.ok()) return std::move(served).error();
  std::lock_guard lock(mu_);
  vms_[spec.name] = vm;
  specs_[spec.name] = spec;
  calls_[spec.name].clear();
  if (spec.restore_from.empty()) {
    restored_.erase(spec.name);
  } else {
    restored_.insert(spec.name);
  }
  disks_[spec.name].clear();
  return VmInfo{spec.name, vm->pid};
}

bool FakeVms::StopVm(const std::string& name, bool on_loop) {
  std::shared_ptr<Vm> vm;
  {
    std::lock_guard lock(mu_);
    auto it = vms_.find(name);
    if (it == vms_.end()) return false;
    vm = it->second;
    vms_.erase(it);
    disks_.erase(name);
  }
  if (on_loop) {
    vm->server.reset();  // its connections close
  } else {
    OnLoop(loop_.get(), [&] { vm->server.reset(); });
  }
  std::lock_guard cb(cb_mu_);
  if (on_stopped_) on_stopped_(name);
  return true;
}

Result<void> FakeVms::Destroy(const std::string& name) {
  PP_FAKE_FAULT("Destroy");
  StopVm(name);
  return Ok();
}

bool FakeVms::Kill(const std::string& name) { return StopVm(name); }

Result<void> FakeVms::AttachDisk(const std::string& name, const DiskSpec& disk) {
  PP_FAKE_FAULT("AttachDisk");
  std::lock_guard lock(mu_);
  if (!vms_.count(name)) return Error::NotFound("domain {} is not running", name);
  if (!disks_[name].insert(disk.unit).second) {
    return Error::Make(Code::kAlreadyExists, "unit {} of {} is taken", disk.unit, name);
  }
  return Ok();
}

Result<void> FakeVms::DetachDisk(const std::string& name, const DiskSpec& disk) {
  PP_FAKE_FAULT("DetachDisk");
  std::lock_guard lock(mu_);
  if (auto it = disks_.find(name); it != disks_.end()) it->second.erase(disk.unit);
  return Ok();
}

Result<std::vector<VmInfo>> FakeVms::List() {
  std::lock_guard lock(mu_);
  std::vector<VmInfo> out;
  for (const auto& [name, vm] : vms_) out.push_back({name, vm->pid});
  return out;
}

void FakeVms::SetOnStopped(std::function<void(const std::string&)> cb) {
  std::lock_guard lock(cb_mu_);
  on_stopped_ = std::move(cb);
}

void FakeVms::HangNextBoot() {
  std::lock_guard lock(mu_);
  hang_next_ = true;
}

std::set<std::string> FakeVms::running() {
  std::lock_guard lock(mu_);
  std::set<std::string> out;
  for (const auto& [name, vm] : vms_) out.insert(name);
  return out;
}

std::optional<VmSpec> FakeVms::SpecOf(const std::string& name) {
  std::lock_guard lock(mu_);
  auto it = specs_.find(name);
  if (it == specs_.end()) return std::nullopt;
  return it->second;
}

std::set<unsigned> FakeVms::DisksOf(const std::string& name) {
  std::lock_guard lock(mu_);
  auto it = disks_.find(name);
  return it == disks_.end() ? std::set<unsigned>{} : it->second;
}

std::optional<v1::CreateSandboxRequest> FakeVms::SandboxOf(const std::string& name) {
  return OnLoop(loop_.get(), [&]() -> std::optional<v1::CreateSandboxRequest> {
    std::lock_guard lock(mu_);
    auto it = vms_.find(name);
    return it == vms_.end() ? std::nullopt : it->second->sandbox;
  });
}

std::optional<v1::ConfigureNetworkRequest> FakeVms::NetworkOf(const std::string& name) {
  return OnLoop(loop_.get(), [&]() -> std::optional<v1::ConfigureNetworkRequest> {
    std::lock_guard lock(mu_);
    auto it = vms_.find(name);
    return it == vms_.end() ? std::nullopt : it->second->network;
  });
}

size_t FakeVms::start_calls() {
  std::lock_guard lock(mu_);
  return start_calls_;
}

}  // namespace peapod::sandboxer::testing
