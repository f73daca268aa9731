// The pod state machine (PodManager) over fakes of everything it touches on the host
// (tests/sandboxer/fakes.h): no root, no VM, no kernel; seconds. Every transition, a failure at
// every step of Start (nothing left behind, state as before, a retried Start works), recovery
// from every record a Start writes, requests racing each other, storage and the warm pool, and
// slow host work that must not hold up other pods.
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <memory>
#include <string>
#include <thread>

#include <gtest/gtest.h>

#include "common/base/unique_fd.h"
#include "common/ttrpc/client.h"
#include "peapod/agent/v1/agent.pb.h"
#include "sandboxer/pods.h"
#include "tests/sandboxer/fakes.h"
#include "tests/unit/loop_fixture.h"

namespace peapod::sandboxer {
namespace {

namespace fs = std::filesystem;
namespace v1 = peapod::agent::v1;
using namespace std::chrono_literals;
using testing::FakeClock;
using testing::FakeNetwork;
using testing::FakeStorage;
using testing::FakeVms;

constexpr auto kReplyTimeout = 30s;
constexpr char kNetns[] = "/var/run/netns/cni-fake";

#define ASSERT_OK(expr)                                                 \
  do {                                                                  \
    auto&& pp_r = (expr);                                               \
    ASSERT_TRUE(pp_r.ok()) << #expr << ": " << pp_r.error().ToString(); \
  } while (0)

PodOptions WithNetns() {
  PodOptions o;
  o.netns = kNetns;
  return o;
}

class PodStatesTest : public ::testing::Test {
 public:  // the fault table below reaches in
  void SetUp() override {
    // Short: the pods' sockets live below it (unix socket paths are at most 107 bytes).
    char tmpl[] = "/tmp/pps-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    cfg_.state_dir = dir_ + "/state";
    cfg_.run_dir = dir_ + "/run";
    cfg_.cri_root = dir_ + "/cri";
    cfg_.accel = "tcg";
    cfg_.boot_timeout_seconds = 30;
    cfg_.layer_cache_keep_seconds = 0;
    // A layer build that waits while <dir>/gate exists (a tenant's big image).
    cfg_.mkfs_erofs = dir_ + "/mkfs.erofs";
    {
      std::ofstream f(cfg_.mkfs_erofs);
      f << "#!/bin/sh\nwhile [ -e " << dir_ << "/gate ]; do sleep 0.02; done\n: > \"$2\"\n";
    }
    fs::permissions(cfg_.mkfs_erofs, fs::perms::owner_all);
    Fresh();
  }

  void TearDown() override {
    DropManager();
    vms_.reset();
    clock_.reset();
    lt_.reset();
    fs::remove_all(dir_, ec_);
  }

  // A new world: fakes, loop, manager.
  void Fresh() {
    DropManager();
    vms_.reset();
    clock_.reset();
    lt_.reset();
    fs::remove_all(cfg_.run_dir, ec_);
    vms_ = std::make_unique<FakeVms>();
    net_ = std::make_unique<FakeNetwork>();
    net_->AddNetns(kNetns);
    storage_ = std::make_unique<FakeStorage>(cfg_.state_dir);
    lt_ = std::make_unique<peapod::testing::LoopThread>();
    clock_ = std::make_unique<FakeClock>(lt_->loop());
    auto r = NewManager();
    ASSERT_TRUE(r.ok()) << r.error().ToString();
  }

  // A sandboxer (re)starting over the same host.
  Result<void> NewManager() {
    Seams seams{net_.get(), storage_.get(), clock_.get()};
    lt_->Sync([&] { pm_ = std::make_unique<PodManager>(lt_->loop(), cfg_, vms_.get(), seams); });
    PodManager* pm = pm_.get();
    vms_->SetOnStopped([pm](const std::string& name) { pm->VmStopped(name); });
    return lt_->Sync([&] { return pm_->Recover(); });
  }

  // The sandboxer going away; pods keep running.
  void DropManager() {
    if (!pm_) return;
    vms_->SetOnStopped(nullptr);
    lt_->Sync([&] {
      pm_->CancelWaiters();
      pm_.reset();
    });
  }

  template <typename T, typename Op>
  std::future<Result<T>> Async(Op op) {
    auto p = std::make_shared<std::promise<Result<T>>>();
    auto f = p->get_future();
    lt_->loop()->Post([pm = pm_.get(), op = std::move(op), p]() mutable {
      op(pm, [p](Result<T> r) { p->set_value(std::move(r)); });
    });
    return f;
  }
  template <typename T>
  static Result<T> Get(std::future<Result<T>> f) {
    if (f.wait_for(kReplyTimeout) != std::future_status::ready) {
      return Error(Code::kDeadlineExceeded, "no reply from the PodManager");
    }
    return f.get();
  }
  std::future<Result<void>> CreateAsync(const std::string& id, PodOptions o = {}) {
    return Async<void>([id, o](PodManager* pm, auto done) { pm->Create(id, o, done); });
  }
  std::future<Result<PodStatus>> StartAsync(const std::string& id) {
    return Async<PodStatus>([id](PodManager* pm, auto done) { pm->Start(id, done); });
  }
  std::future<Result<void>> StopAsync(const std::string& id) {
    return Async<void>([id](PodManager* pm, auto done) { pm->Stop(id, 5, done); });
  }
  std::future<Result<void>> ShutdownAsync(const std::string& id) {
    return Async<void>([id](PodManager* pm, auto done) { pm->Shutdown(id, done); });
  }
  std::future<Result<PodExit>> WaitAsync(const std::string& id) {
    return Async<PodExit>([id](PodManager* pm, auto done) { pm->Wait(id, done); });
  }
  Result<void> Create(const std::string& id, PodOptions o = {}) { return Get(CreateAsync(id, o)); }
  Result<PodStatus> Start(const std::string& id) { return Get(StartAsync(id)); }
  Result<void> Stop(const std::string& id) { return Get(StopAsync(id)); }
  Result<void> Shutdown(const std::string& id) { return Get(ShutdownAsync(id)); }
  Result<PodStatus> Status(const std::string& id) {
    return lt_->Sync([&] { return pm_->Status(id); });
  }

  // Check through the pod's agent socket, as a shim would.
  Result<void> CheckAgent(const std::string& id) {
    PP_ASSIGN_OR_RETURN(auto fd, ConnectUnix(cfg_.run_dir + "/pods/" + id + "/agent.sock"));
    auto client = lt_->Sync([&] { return ttrpc::Client::Create(lt_->loop(), std::move(fd)); });
    if (!client.ok()) return std::move(client).error();
    ttrpc::CallOptions opts;
    opts.timeout = 5s;
    auto r = (*client)->CallSyncTyped<v1::CheckResponse>("peapod.agent.v1.Agent", "Check",
                                                         v1::CheckRequest(), opts);
    lt_->Sync([&] { client->reset(); });
    if (!r.ok()) return std::move(r).error();
    return Ok();
  }

  std::string Phase(const std::string& id) {
    auto recs = storage_->records();
    auto it = recs.find(id);
    return it == recs.end() ? "(no record)" : PhaseName(it->second.phase);
  }

  // Nothing of a VM is left on the host: no VM, TAP, scratch disk or share bind.
  void ExpectNoVmLeft(const std::string& why) {
    EXPECT_TRUE(vms_->running().empty()) << why;
    EXPECT_TRUE(net_->taps().empty()) << why;
    EXPECT_TRUE(storage_->scratch_disks().empty()) << why;
    EXPECT_TRUE(storage_->binds().empty()) << why;
  }

  void StartPod(const std::string& id, PodOptions o = WithNetns()) {
    ASSERT_OK(Create(id, o));
    auto s = Start(id);
    ASSERT_TRUE(s.ok()) << s.error().ToString();
    ASSERT_TRUE(s->ready);
  }

  // Waits (up to 10 s) until cond holds.
  static bool Eventually(const std::function<bool()>& cond) {
    for (int i = 0; i < 500; ++i) {
      if (cond()) return true;
      std::this_thread::sleep_for(20ms);
    }
    return cond();
  }

  std::string dir_;
  std::error_code ec_;
  Config cfg_;
  std::unique_ptr<FakeVms> vms_;
  std::unique_ptr<FakeNetwork> net_;
  std::unique_ptr<FakeStorage> storage_;
  std::unique_ptr<peapod::testing::LoopThread> lt_;
  std::unique_ptr<FakeClock> clock_;
  std::unique_ptr<PodManager> pm_;
};

// ---- every transition

TEST_F(PodStatesTest, APodWalksCreatedStartingRunningStoppedAndGone) {
  PodOptions o = WithNetns();
  o.hostname = "web-0";
  o.cri_files = true;
  ASSERT_OK(Create("p1", o));
  EXPECT_EQ(Status("p1")->phase, "created");
  EXPECT_EQ(Phase("p1"), "created");
  auto files = storage_->files();
  EXPECT_EQ(files[cfg_.run_dir + "/pods/p1/share/hostname"], "web-0\n");
  EXPECT_EQ(files[cfg_.cri_root + "/sandboxes/p1/hostname"], "web-0\n");

  auto s = Start("p1");
  ASSERT_TRUE(s.ok()) << s.error().ToString();
  EXPECT_TRUE(s->ready);
  EXPECT_EQ(Phase("p1"), "running");
  // The records went created, starting, running, in that order.
  std::vector<std::string> phases;
  for (const auto& r : storage_->history()) phases.push_back(PhaseName(r.phase));
  EXPECT_EQ(phases, (std::vector<std::string>{"created", "starting", "running"}));
  // The VM: a scratch disk, its TAP in the pod netns, the pod's network and name in the guest.
  auto spec = vms_->SpecOf("peapod-p1");
  ASSERT_TRUE(spec);
  ASSERT_EQ(spec->disks.size(), 1u);
  EXPECT_FALSE(spec->disks[0].readonly);
  EXPECT_EQ(storage_->scratch_disks().count(spec->disks[0].path), 1u);
  EXPECT_EQ(net_->taps()[spec->tap], kNetns);
  EXPECT_EQ(spec->mac, "0a:58:0a:00:00:07");
  ASSERT_TRUE(vms_->NetworkOf("peapod-p1"));
  auto sb = vms_->SandboxOf("peapod-p1");
  ASSERT_TRUE(sb);
  EXPECT_EQ(sb->hostname(), "web-0");
  EXPECT_EQ(sb->storages_size(), 2);  // the share and the scratch disk
  // The scratch disk's inode tables are not zeroed behind the pod's back (ext4lazyinit kept an
  // idle pod's guest writing for minutes).
  ASSERT_EQ(sb->storages(1).fstype(), "ext4");
  EXPECT_EQ(
      std::vector<std::string>(sb->storages(1).options().begin(), sb->storages(1).options().end()),
      std::vector<std::string>{"noinit_itable"});
  ASSERT_OK(CheckAgent("p1"));

  auto wait = WaitAsync("p1");
  EXPECT_EQ(wait.wait_for(50ms), std::future_status::timeout);
  ASSERT_OK(Stop("p1"));
  auto exit = Get(std::move(wait));
  ASSERT_TRUE(exit.ok()) << exit.error().ToString();
  EXPECT_EQ(exit->exit_status, 0u);
  EXPECT_EQ(Status("p1")->phase, "stopped");
  EXPECT_EQ(Phase("p1"), "stopped");
  EXPECT_TRUE(vms_->running().empty());
  ASSERT_OK(Stop("p1"));  // again: nothing to do

  ASSERT_OK(Shutdown("p1"));
  EXPECT_EQ(Status("p1").error().code(), Code::kNotFound);
  EXPECT_EQ(Phase("p1"), "(no record)");
  ExpectNoVmLeft("after Shutdown");
  EXPECT_TRUE(storage_->files().empty()) << "pod files left";
  EXPECT_FALSE(fs::exists(cfg_.run_dir + "/pods/p1"));
  ASSERT_OK(Shutdown("p1"));  // again: nothing to do
}

TEST_F(PodStatesTest, AVmThatDiesMakesThePodStoppedWith255AndShutdownCleansUp) {
  StartPod("p1");
  auto wait = WaitAsync("p1");
  ASSERT_TRUE(vms_->Kill("peapod-p1"));
  auto exit = Get(std::move(wait));
  ASSERT_TRUE(exit.ok());
  EXPECT_EQ(exit->exit_status, 255u);
  EXPECT_TRUE(Eventually([&] { return Phase("p1") == "stopped"; }));
  EXPECT_EQ(Start("p1").error().code(), Code::kFailedPrecondition);
  ASSERT_OK(Shutdown("p1"));
  ExpectNoVmLeft("after a dead VM's Shutdown");
}

TEST_F(PodStatesTest, CallsInFlightWhenTheVmDiesAreAnswered) {
  StartPod("p1");
  auto metrics = [&] {
    return Async<std::string>([](PodManager* pm, auto done) { pm->Metrics("p1", done); });
  };
  ASSERT_TRUE(Get(metrics()).ok());
  vms_->HoldStats();
  auto held = metrics();
  EXPECT_EQ(held.wait_for(100ms), std::future_status::timeout);
  ASSERT_TRUE(vms_->Kill("peapod-p1"));
  auto r = Get(std::move(held));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Code::kUnavailable) << r.error().ToString();
  EXPECT_EQ(Get(metrics()).error().code(), Code::kFailedPrecondition);
}

TEST_F(PodStatesTest, BadCreatesChangeNothing) {
  ASSERT_OK(Create("p1"));
  EXPECT_EQ(Create("p1").error().code(), Code::kAlreadyExists);
  EXPECT_EQ(Create("../x").error().code(), Code::kInvalidArgument);
  PodOptions o;
  o.netns = "/var/run/netns/none";
  EXPECT_EQ(Create("p2", o).error().code(), Code::kNotFound);
  o = {};
  o.memory_limit_bytes = -1;
  EXPECT_EQ(Create("p3", o).error().code(), Code::kInvalidArgument);
  // The share cannot be made, or the record cannot be written (a full disk): nothing stays.
  storage_->FailNext("PrepareShare", Error(Code::kInternal, "mkdir: No space left on device"));
  EXPECT_EQ(Create("p4").error().code(), Code::kInternal);
  storage_->FailNext("SaveRecord", Error(Code::kInternal, "write: No space left on device"));
  auto r = Create("p5");
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().ToString().find("No space left"), std::string::npos) << r.error().ToString();
  for (const char* id : {"p2", "p3", "p4", "p5"}) {
    EXPECT_EQ(Status(id).error().code(), Code::kNotFound) << id;
    EXPECT_FALSE(fs::exists(cfg_.run_dir + "/pods/" + id)) << id;
  }
  EXPECT_EQ(storage_->records().size(), 1u);
  EXPECT_EQ(Status("p1")->phase, "created");
  ASSERT_OK(Create("p5"));  // a retry works
}

// ---- a failure at every step of Start

struct StartFault {
  const char* name;
  std::function<void(PodStatesTest*, FakeVms&, FakeNetwork&, FakeStorage&)> inject;
  Code code;
  // Run while Start is in flight, if set.
  std::function<void(PodStatesTest*)> during = nullptr;
};

void PrintTo(const StartFault& f, std::ostream* os) { *os << f.name; }

class StartFaultTest : public PodStatesTest, public ::testing::WithParamInterface<StartFault> {};

TEST_P(StartFaultTest, FailsCleanlyLeavesThePodCreatedAndARetryWorks) {
  ASSERT_OK(Create("p1", WithNetns()));
  size_t records_before = storage_->history().size();
  GetParam().inject(this, *vms_, *net_, *storage_);
  auto start = StartAsync("p1");
  if (GetParam().during) GetParam().during(this);
  auto s = Get(std::move(start));
  ASSERT_FALSE(s.ok()) << GetParam().name << " did not fail Start";
  EXPECT_EQ(s.error().code(), GetParam().code) << s.error().ToString();
  EXPECT_NE(s.error().ToString().find("start sandbox p1"), std::string::npos)
      << s.error().ToString();
  // As before Start: created, in memory and on record, and nothing of a VM on the host.
  EXPECT_EQ(Status("p1")->phase, "created");
  EXPECT_TRUE(Eventually([&] { return Phase("p1") == "created"; })) << Phase("p1");
  EXPECT_EQ(storage_->records()["p1"].domain, "peapod-p1");
  EXPECT_TRUE(storage_->records()["p1"].tap.empty());
  EXPECT_GE(storage_->history().size(), records_before);
  ExpectNoVmLeft(GetParam().name);
  EXPECT_EQ(Stop("p1").ok(), true);

  auto again = Start("p1");
  ASSERT_TRUE(again.ok()) << again.error().ToString();
  EXPECT_TRUE(again->ready);
  ASSERT_OK(CheckAgent("p1"));
  ASSERT_OK(Shutdown("p1"));
  ExpectNoVmLeft("after the retried pod's Shutdown");
}

Error Enospc(const char* what) {
  return Error(Code::kResourceExhausted, std::string(what) + ": No space left on device");
}

INSTANTIATE_TEST_SUITE_P(
    EveryStep, StartFaultTest,
    ::testing::Values(
        StartFault{"the starting record",
                   [](auto*, auto&, auto&, FakeStorage& s) {
                     s.FailNext("SaveRecord", Enospc("write record"));
                   },
                   Code::kResourceExhausted},
        StartFault{"the share",
                   [](auto*, auto&, auto&, FakeStorage& s) {
                     s.FailNext("PrepareShare", Error(Code::kInternal, "bind mount: EPERM"));
                   },
                   Code::kInternal},
        StartFault{"the scratch disk",
                   [](auto*, auto&, auto&, FakeStorage& s) {
                     s.FailNext("MakeScratchDisk", Enospc("scratch.img"));
                   },
                   Code::kResourceExhausted},
        StartFault{"the TAP",
                   [](auto*, auto&, FakeNetwork& n, auto&) {
                     n.FailNext("PrepareTap", Error(Code::kUnavailable, "netlink: EBUSY"));
                   },
                   Code::kUnavailable},
        StartFault{"the VM",
                   [](auto*, FakeVms& v, auto&, auto&) {
                     v.FailNext("Start", Error(Code::kInternal, "libvirt: QEMU exited"));
                   },
                   Code::kInternal},
        StartFault{"joining the TAP to the pod network",
                   [](auto*, auto&, FakeNetwork& n, auto&) {
                     n.FailNext("AttachTap", Error(Code::kInternal, "tc: EINVAL"));
                   },
                   Code::kInternal},
        StartFault{"a TAP that vanished",
                   [](auto*, auto&, FakeNetwork& n, auto&) {
                     // The TAP exists at PrepareTap and is gone by AttachTap.
                     n.FailNext("AttachTap", Error::NotFound("no TAP (it vanished)"));
                   },
                   Code::kNotFound},
        StartFault{"the running record",
                   [](auto*, auto&, auto&, FakeStorage& s) {
                     s.FailNext("SaveRecord", Enospc("write record"), /*after=*/1);
                   },
                   Code::kResourceExhausted},
        StartFault{"a guest that never answers (the clock passes the deadline)",
                   [](auto*, FakeVms& v, auto&, auto&) { v.HangNextBoot(); },
                   Code::kDeadlineExceeded,
                   [](PodStatesTest* t) {
                     // Once the VM runs, the boot deadline passes at once.
                     PodStatesTest::Eventually([t] { return !t->vms_->running().empty(); });
                     t->clock_->Jump(std::chrono::seconds(t->cfg_.boot_timeout_seconds + 1));
                   }}),
    [](const auto& info) {
      std::string n;
      for (char c : std::string(info.param.name)) n += std::isalnum(c) ? c : '_';
      return n;
    });

TEST_F(PodStatesTest, AVmDyingWhileItsAgentIsAwaitedFailsStartCleanly) {
  ASSERT_OK(Create("p1", WithNetns()));
  vms_->HangNextBoot();
  auto start = StartAsync("p1");
  ASSERT_TRUE(Eventually([&] { return !vms_->running().empty(); }));
  ASSERT_TRUE(vms_->Kill("peapod-p1"));
  auto s = Get(std::move(start));
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.error().code(), Code::kUnavailable) << s.error().ToString();
  EXPECT_EQ(Status("p1")->phase, "created");
  ExpectNoVmLeft("after the VM died while booting");
  ASSERT_TRUE(Start("p1").ok());
}

// ---- recovery from every record a Start writes

TEST_F(PodStatesTest, ARestartRecoversFromEveryRecordAStartWrites) {
  // The records a pod's Create and Start write, in order.
  StartPod("p1");
  auto history = storage_->history();
  ASSERT_EQ(history.size(), 3u);
  for (const auto& rec : history) {
    for (bool vm_alive : {false, true}) {
      SCOPED_TRACE(PhaseName(rec.phase) + (vm_alive ? ", its VM running" : ", no VM"));
      Fresh();
      // The host as a crash right after this record left it: the record, the pod's TAP made
      // (whatever the phase), its run dir, and maybe its VM.
      DropManager();
      storage_->PutRecord(rec);
      ASSERT_OK(storage_->PrepareShare(cfg_.run_dir + "/pods/p1"));
      ASSERT_OK(net_->CreateTap(TapName("p1")));
      if (vm_alive) {
        VmSpec spec;
        spec.name = rec.domain;
        spec.agent_socket = cfg_.run_dir + "/pods/p1/vm-agent.sock";
        ASSERT_OK(vms_->Start(spec));
      }
      ASSERT_OK(NewManager());
      auto s = Status("p1");
      ASSERT_TRUE(s.ok()) << s.error().ToString();
      if (rec.phase == PodRecord::Phase::kRunning && vm_alive) {
        // Re-adopted: ready, reachable, and its TAP kept.
        EXPECT_TRUE(s->ready);
        ASSERT_OK(CheckAgent("p1"));
        EXPECT_EQ(net_->taps().size(), 1u);
      } else {
        EXPECT_FALSE(s->ready);
        EXPECT_EQ(s->phase, rec.phase == PodRecord::Phase::kRunning ? "stopped" : "created");
        EXPECT_EQ(Phase("p1"), s->phase);
        EXPECT_TRUE(vms_->running().empty()) << "a VM with no running pod was kept";
        EXPECT_TRUE(net_->taps().empty()) << "the TAP of a pod that does not run was kept";
        if (s->phase == "created") {
          auto again = Start("p1");
          ASSERT_TRUE(again.ok()) << again.error().ToString();
          ASSERT_OK(CheckAgent("p1"));
        }
      }
      ASSERT_OK(Shutdown("p1"));
      ExpectNoVmLeft("after Shutdown");
      EXPECT_TRUE(storage_->records().empty());
    }
  }
}

TEST_F(PodStatesTest, ARestartRemovesWhatNoRecordNames) {
  StartPod("p1");
  DropManager();
  // A run dir and a VM nobody recorded (a crash between removing the record and them).
  ASSERT_OK(storage_->PrepareShare(cfg_.run_dir + "/pods/ghost"));
  VmSpec spec;
  spec.name = "peapod-ghost";
  spec.agent_socket = cfg_.run_dir + "/pods/ghost/vm-agent.sock";
  ASSERT_OK(vms_->Start(spec));
  ASSERT_OK(NewManager());
  EXPECT_EQ(vms_->running(), std::set<std::string>{"peapod-p1"});
  EXPECT_FALSE(fs::exists(cfg_.run_dir + "/pods/ghost"));
  EXPECT_TRUE(Status("p1")->ready);
}

// ---- requests racing each other

TEST_F(PodStatesTest, StartStopAndShutdownRacingAStartAreRefusedUntilItEnds) {
  ASSERT_OK(Create("p1", WithNetns()));
  auto start = StartAsync("p1");
  auto start2 = StartAsync("p1");
  auto stop = StopAsync("p1");
  auto shutdown = ShutdownAsync("p1");
  auto s = Get(std::move(start));
  ASSERT_TRUE(s.ok()) << s.error().ToString();
  EXPECT_EQ(Get(std::move(start2)).error().code(), Code::kFailedPrecondition);
  EXPECT_EQ(Get(std::move(stop)).error().code(), Code::kFailedPrecondition);
  EXPECT_EQ(Get(std::move(shutdown)).error().code(), Code::kFailedPrecondition);
  EXPECT_EQ(vms_->start_calls(), 1u);
  EXPECT_TRUE(Status("p1")->ready);
  ASSERT_OK(CheckAgent("p1"));
}

TEST_F(PodStatesTest, APodIsRunningOnlyOnceItsRecordSaysSo) {
  ASSERT_OK(Create("p1", WithNetns()));
  storage_->HoldSaves(PodRecord::Phase::kRunning);  // the "running" record is slow to land
  auto start = StartAsync("p1");
  ASSERT_TRUE(Eventually([&] { return vms_->SandboxOf("peapod-p1").has_value(); }));
  // The guest is set up; until the record lands, nobody is told the pod runs.
  EXPECT_EQ(Status("p1")->phase, "starting");
  EXPECT_FALSE(Status("p1")->ready);
  EXPECT_EQ(Start("p1").error().code(), Code::kFailedPrecondition);
  EXPECT_EQ(Stop("p1").error().code(), Code::kFailedPrecondition);
  EXPECT_EQ(Phase("p1"), "starting");
  EXPECT_EQ(start.wait_for(0s), std::future_status::timeout);
  storage_->ReleaseSaves();
  auto s = Get(std::move(start));
  ASSERT_TRUE(s.ok()) << s.error().ToString();
  EXPECT_TRUE(s->ready);
  EXPECT_EQ(Phase("p1"), "running");
}

TEST_F(PodStatesTest, RequestsRacingACreateAreRefusedAndCreateStillWorks) {
  auto create = CreateAsync("p1");
  auto create2 = CreateAsync("p1");
  auto start = StartAsync("p1");
  auto shutdown = ShutdownAsync("p1");
  ASSERT_OK(Get(std::move(create)));
  EXPECT_EQ(Get(std::move(create2)).error().code(), Code::kAlreadyExists);
  EXPECT_EQ(Get(std::move(start)).error().code(), Code::kFailedPrecondition);
  EXPECT_EQ(Get(std::move(shutdown)).error().code(), Code::kFailedPrecondition);
  EXPECT_EQ(Status("p1")->phase, "created");
  EXPECT_TRUE(Start("p1").ok());
}

TEST_F(PodStatesTest, StopAndShutdownRacingEachOtherEndWithNothingLeft) {
  StartPod("p1");
  auto wait = WaitAsync("p1");
  auto stop = StopAsync("p1");
  auto shutdown = ShutdownAsync("p1");
  auto stop2 = StopAsync("p1");
  ASSERT_OK(Get(std::move(stop)));
  auto sd = Get(std::move(shutdown));
  auto st2 = Get(std::move(stop2));
  ASSERT_TRUE(sd.ok()) << sd.error().ToString();
  ASSERT_TRUE(st2.ok()) << st2.error().ToString();
  auto exit = Get(std::move(wait));
  ASSERT_TRUE(exit.ok());
  EXPECT_EQ(exit->exit_status, 0u);
  EXPECT_EQ(Status("p1").error().code(), Code::kNotFound);
  ExpectNoVmLeft("after Stop and Shutdown raced");
  EXPECT_TRUE(storage_->records().empty());
}

TEST_F(PodStatesTest, AShutdownThatCannotRemoveTheRunDirKeepsTheRecordAndARetryFinishes) {
  StartPod("p1");
  storage_->FailNext("RemoveTree", Error(Code::kFailedPrecondition, "umount: EBUSY"));
  auto r = Shutdown("p1");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Code::kFailedPrecondition);
  EXPECT_EQ(Phase("p1"), "stopped");
  EXPECT_EQ(Status("p1")->phase, "stopped");
  ASSERT_OK(Shutdown("p1"));
  EXPECT_TRUE(storage_->records().empty());
  ExpectNoVmLeft("after the retried Shutdown");
}

// ---- container storage

google::protobuf::RepeatedPtrField<containerd::types::Mount> ErofsLayers(
    const std::vector<std::string>& blobs) {
  google::protobuf::RepeatedPtrField<containerd::types::Mount> ms;
  for (const auto& b : blobs) {
    auto* m = ms.Add();
    m->set_type("erofs");
    m->set_source(b);
  }
  return ms;
}

TEST_F(PodStatesTest, LayersAreSharedBetweenContainersAndTheLastUsedStayAttachedWhenIdle) {
  StartPod("p1");
  for (const char* b : {"/base.erofs", "/app.erofs"}) std::ofstream(dir_ + b) << "x";
  auto attach = [&](const std::string& c, std::vector<std::string> blobs) {
    return Get(Async<RootfsInfo>([c, ms = ErofsLayers(blobs)](PodManager* pm, auto done) {
      pm->AttachRootfs("p1", c, ms, done);
    }));
  };
  auto release = [&](const std::string& c) {
    return Get(
        Async<void>([c](PodManager* pm, auto done) { pm->ReleaseContainer("p1", c, done); }));
  };
  auto a = attach("c1", {dir_ + "/base.erofs", dir_ + "/app.erofs"});
  ASSERT_TRUE(a.ok()) << a.error().ToString();
  EXPECT_EQ(a->layers.size(), 2u);
  EXPECT_EQ(vms_->DisksOf("peapod-p1"), (std::set<unsigned>{1, 2}));
  auto b = attach("c2", {dir_ + "/base.erofs"});
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(vms_->DisksOf("peapod-p1").size(), 2u) << "the shared layer was attached twice";
  EXPECT_EQ(storage_->records()["p1"].rootfs.size(), 2u);

  // A disk that cannot be attached: the container gets an error, the pod keeps what it had.
  std::ofstream(dir_ + "/other.erofs") << "x";
  vms_->FailNext("AttachDisk", Error(Code::kInternal, "libvirt: no free SCSI unit"));
  auto c = attach("c3", {dir_ + "/other.erofs"});
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(vms_->DisksOf("peapod-p1").size(), 2u);
  EXPECT_EQ(storage_->records()["p1"].rootfs.count("c3"), 0u);

  // Idle layers stay attached (up to kIdleLayerDisks), so the next container of the image, a
  // restart say, needs no hot-plug: an attach would fail here.
  auto c2_units = storage_->records()["p1"].rootfs["c2"];
  ASSERT_EQ(c2_units.size(), 1u);
  ASSERT_OK(release("c1"));
  ASSERT_OK(release("c2"));
  EXPECT_EQ(vms_->DisksOf("peapod-p1"), (std::set<unsigned>{1, 2}));
  EXPECT_EQ(storage_->records()["p1"].disks.size(), 2u);
  vms_->FailNext("AttachDisk", Error(Code::kInternal, "an attach was tried"));
  auto again = attach("c2-restarted", {dir_ + "/base.erofs"});
  ASSERT_TRUE(again.ok()) << again.error().ToString();
  EXPECT_EQ(storage_->records()["p1"].rootfs["c2-restarted"], c2_units);
  ASSERT_OK(release("c2-restarted"));
  // The fault is still there for the next image's attach: the restart made none.
  auto other = attach("other", {dir_ + "/other.erofs"});
  ASSERT_FALSE(other.ok());
  EXPECT_NE(other.error().message().find("an attach was tried"), std::string::npos)
      << other.error().ToString();
  EXPECT_EQ(vms_->DisksOf("peapod-p1").size(), 2u);

  // Beyond the limit, the least recently used idle layers go. base was used last of the two,
  // then six images one after the other: the four used last stay.
  std::vector<unsigned> order;
  for (int i = 0; i < 6; ++i) {
    std::string blob = dir_ + "/img" + std::to_string(i) + ".erofs";
    std::ofstream(blob) << "x";
    auto r = attach("i" + std::to_string(i), {blob});
    ASSERT_TRUE(r.ok()) << r.error().ToString();
    order.push_back(storage_->records()["p1"].rootfs["i" + std::to_string(i)][0]);
    ASSERT_OK(release("i" + std::to_string(i)));
  }
  EXPECT_EQ(vms_->DisksOf("peapod-p1"), (std::set<unsigned>(order.end() - 4, order.end())));
  EXPECT_EQ(storage_->records()["p1"].disks.size(), kIdleLayerDisks);
  // The pod's end takes the rest.
  ASSERT_OK(Stop("p1"));
  ASSERT_OK(Shutdown("p1"));
  ExpectNoVmLeft("after Shutdown of a pod with idle layers");
}

TEST_F(PodStatesTest, AVolumeMountThatFailsSharesNothingAndShutdownRemovesTheRest) {
  StartPod("p1");
  auto share = [&](const std::string& c, size_t n) {
    std::vector<VolumeRequest> vols(n);
    for (size_t i = 0; i < n; ++i) vols[i].host_path = dir_;
    return Get(Async<std::vector<SharedVolume>>(
        [c, vols](PodManager* pm, auto done) { pm->ShareVolumes("p1", c, vols, done); }));
  };
  auto ok = share("c1", 2);
  ASSERT_TRUE(ok.ok()) << ok.error().ToString();
  EXPECT_EQ(storage_->binds().size(), 2u);
  storage_->FailNext("ShareVolumes", Error(Code::kPermissionDenied, "open_tree: EPERM"));
  auto bad = share("c2", 1);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.error().code(), Code::kPermissionDenied);
  EXPECT_EQ(storage_->binds().size(), 2u);
  EXPECT_EQ(storage_->records()["p1"].volumes.count("c2"), 0u);
  ASSERT_OK(Shutdown("p1"));
  ExpectNoVmLeft("after Shutdown of a pod with volumes");
}

// ---- slow host work does not hold up other pods

TEST_F(PodStatesTest, ASlowMountInOnePodHoldsUpNoOtherPod) {
  StartPod("p1");
  storage_->HoldShares();
  auto held = Async<std::vector<SharedVolume>>([v = dir_](PodManager* pm, auto done) {
    pm->ShareVolumes("p1", "c1", {VolumeRequest{v}}, done);
  });
  // Meanwhile another pod comes and goes, and p1 answers Status.
  StartPod("p2");
  ASSERT_OK(Stop("p2"));
  ASSERT_OK(Shutdown("p2"));
  EXPECT_TRUE(Status("p1")->ready);
  EXPECT_EQ(held.wait_for(0s), std::future_status::timeout) << "the mount was not held";
  storage_->ReleaseShares();
  ASSERT_OK(Get(std::move(held)));
}

TEST_F(PodStatesTest, ALargeImageBuildingForOnePodHoldsUpNoOtherPodsStartOrStop) {
  StartPod("p1");
  fs::create_directories(dir_ + "/layer");
  std::ofstream(dir_ + "/gate") << "";  // the build waits while it exists
  google::protobuf::RepeatedPtrField<containerd::types::Mount> ms;
  auto* m = ms.Add();
  m->set_type("bind");
  m->set_source(dir_ + "/layer");
  auto building = Async<RootfsInfo>(
      [ms](PodManager* pm, auto done) { pm->AttachRootfs("p1", "big", ms, done); });
  // Two more pods start and stop while the build runs (both build workers are busy).
  auto building2 = Async<RootfsInfo>(
      [ms](PodManager* pm, auto done) { pm->AttachRootfs("p1", "big2", ms, done); });
  StartPod("p2");
  StartPod("p3", {});
  ASSERT_OK(Stop("p2"));
  ASSERT_OK(Stop("p3"));
  EXPECT_EQ(building.wait_for(0s), std::future_status::timeout) << "the build did not wait";
  fs::remove(dir_ + "/gate");
  auto r = Get(std::move(building));
  ASSERT_TRUE(r.ok()) << r.error().ToString();
  EXPECT_EQ(r->layers.size(), 1u);
  ASSERT_TRUE(Get(std::move(building2)).ok());
}

TEST_F(PodStatesTest, QuittingAnswersEveryoneRefusesNewPodsAndLeavesPodsRunning) {
  StartPod("p1");
  ASSERT_OK(Create("p2"));
  auto wait = WaitAsync("p1");
  std::promise<void> quit;
  lt_->Sync([&] { pm_->Quit([&] { quit.set_value(); }); });
  ASSERT_EQ(quit.get_future().wait_for(10s), std::future_status::ready);
  auto w = Get(std::move(wait));
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.error().code(), Code::kUnavailable);
  EXPECT_EQ(Create("p3").error().code(), Code::kUnavailable);
  EXPECT_EQ(Start("p2").error().code(), Code::kUnavailable);
  EXPECT_EQ(Get(WaitAsync("p1")).error().code(), Code::kUnavailable);
  EXPECT_EQ(vms_->running(), std::set<std::string>{"peapod-p1"}) << "pods keep running";
  EXPECT_EQ(Phase("p1"), "running");
  EXPECT_EQ(Phase("p2"), "created");
}

// ---- the warm pool

TEST_F(PodStatesTest, APoolVmIsAdoptedWithItsTapMovedAndThePoolRefills) {
  cfg_.pool_size = 1;
  Fresh();
  lt_->Sync([&] { pm_->FillPool(); });
  ASSERT_TRUE(Eventually([&] { return lt_->Sync([&] { return pm_->pool_ready(); }) == 1; }));
  auto pool_vm = *vms_->running().begin();
  ASSERT_EQ(net_->taps().size(), 1u);
  EXPECT_EQ(net_->taps().begin()->second, "") << "a pool VM's TAP waits in our netns";

  StartPod("p1");
  EXPECT_EQ(storage_->records()["p1"].domain, pool_vm) << "the pod did not adopt the pool VM";
  auto tap = storage_->records()["p1"].tap;
  EXPECT_EQ(net_->taps()[tap], kNetns);
  ASSERT_OK(CheckAgent("p1"));
  ASSERT_TRUE(vms_->NetworkOf(pool_vm));
  // The guest finds its NIC by the pool VM's MAC and gives it the CNI interface's.
  auto itf = vms_->NetworkOf(pool_vm)->interfaces(0);
  EXPECT_EQ(itf.current_mac(), vms_->SpecOf(pool_vm)->mac);
  EXPECT_EQ(itf.mac(), "0a:58:0a:00:00:07");
  ASSERT_TRUE(Eventually([&] { return lt_->Sync([&] { return pm_->pool_ready(); }) == 1; }));

  // An adoption that fails gives the pod back "created" and the VM goes.
  ASSERT_OK(Create("p2", WithNetns()));
  net_->FailNext("AttachTap", Error::NotFound("no TAP (it vanished)"));
  std::string second = *std::find_if(vms_->running().begin(), vms_->running().end(),
                                     [&](const auto& n) { return n != pool_vm; });
  auto s = Start("p2");
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(Status("p2")->phase, "created");
  EXPECT_TRUE(Eventually([&] { return !vms_->running().count(second); }));
  EXPECT_TRUE(Eventually([&] {
    auto taps = net_->taps();
    return std::none_of(taps.begin(), taps.end(),
                        [&](const auto& t) { return t.second == "" && t.first != tap; }) ||
           taps.size() <= 2;
  }));
  for (const auto& d : storage_->dirs()) {
    EXPECT_EQ(d.find(second.substr(std::string("peapod-").size())), std::string::npos)
        << d << ": the failed adoption left its pool VM's directory";
  }
  // Started again, its network reaches the VM it runs on now: nothing of the failed adoption's
  // (its guest network call was answered by the VM that went) is taken for it.
  auto again = Start("p2");
  ASSERT_TRUE(again.ok()) << again.error().ToString();
  auto vm2 = storage_->records()["p2"].domain;
  EXPECT_NE(vm2, second);
  ASSERT_TRUE(vms_->NetworkOf(vm2)) << "p2's guest never got its network";
  EXPECT_EQ(vms_->NetworkOf(vm2)->interfaces(0).mac(), "0a:58:0a:00:00:07");
  ASSERT_OK(Shutdown("p2"));

  // The sandboxer going away removes the pool and only the pool.
  std::promise<void> gone;
  lt_->Sync([&] { pm_->DestroyPool([&] { gone.set_value(); }); });
  ASSERT_EQ(gone.get_future().wait_for(10s), std::future_status::ready);
  EXPECT_EQ(vms_->running(), std::set<std::string>{pool_vm});
  EXPECT_EQ(net_->taps().size(), 1u);
}

// The guest's network and its sandbox set-up go one behind the other, without waiting for the
// first answer, for a pool VM and for a VM of the pod's own; a network the guest refuses fails
// the start with what failed, leaves the pod created and its VM gone.
TEST_F(PodStatesTest, GuestSetUpIsPipelinedAndARefusedNetworkFailsTheStartCleanly) {
  cfg_.pool_size = 1;
  Fresh();
  vms_->HoldNetworkUntilSandbox();
  lt_->Sync([&] { pm_->FillPool(); });
  ASSERT_TRUE(Eventually([&] { return lt_->Sync([&] { return pm_->pool_ready(); }) == 1; }));
  auto pool_vm = *vms_->running().begin();
  StartPod("p1");
  EXPECT_EQ(storage_->records()["p1"].domain, pool_vm);
  // The pool's own first: its NIC up on standby, its storage mounted while it waits.
  EXPECT_EQ(vms_->CallsOf(pool_vm),
            (std::vector<std::string>{"ConfigureNetwork(standby)", "CreateSandbox",
                                      "ConfigureNetwork", "CreateSandbox"}));
  ASSERT_TRUE(Eventually([&] { return lt_->Sync([&] { return pm_->pool_ready(); }) == 1; }));

  // The pool's second VM, then (the pool not refilled yet) one of the pod's own.
  for (const char* id : {"p2", "p3"}) {
    SCOPED_TRACE(id);
    ASSERT_OK(Create(id, WithNetns()));
    vms_->FailNext("ConfigureNetwork", Error::Internal("netlink: add address: File exists"));
    auto s = Start(id);
    ASSERT_FALSE(s.ok());
    EXPECT_NE(s.error().ToString().find("configure guest network: netlink"), std::string::npos)
        << s.error().ToString();
    EXPECT_EQ(Status(id)->phase, "created");
    // Left running: p1's VM and at most the pool's one (refilled).
    EXPECT_TRUE(Eventually([&] {
      auto vms = vms_->running();
      return vms.count(pool_vm) &&
             std::all_of(vms.begin(), vms.end(),
                         [&](const auto& n) { return n == pool_vm || n.find("pool") != n.npos; }) &&
             vms.size() <= 2;
    })) << "the failed start's VM was left";
  }
  StartPod("p4");
}

// The VM template through the PodManager: built once (a VM prepared and saved, then gone),
// pods with a network restored from it and reseeded before anything else, a start that fails
// for another reason leaves the template alone, and one whose state does not load boots the
// pod and has the template built again.
TEST_F(PodStatesTest, PodsStartFromTheTemplateAndOnlyItsOwnFailureRebuildsIt) {
  if (::access("/usr/bin/qemu-system-x86_64", F_OK) != 0) {
    GTEST_SKIP() << "the template key names /usr/bin/qemu-system-x86_64, which is not installed";
  }
  std::ofstream(dir_ + "/vmlinux") << "kernel";
  std::ofstream(dir_ + "/initrd.img") << "initrd";
  cfg_.kernel = dir_ + "/vmlinux";
  cfg_.initrd = dir_ + "/initrd.img";
  cfg_.start_from = "template";
  DropManager();
  vms_->EnableTemplates();
  ASSERT_OK(NewManager());
  lt_->Sync([&] { pm_->PrepareTemplate(); });
  auto ready = [&] { return lt_->Sync([&] { return pm_->template_ready(); }); };
  ASSERT_TRUE(Eventually(ready));
  // Its NIC up on standby, then prepared.
  EXPECT_EQ(vms_->CallsOf("peapod-template-build"),
            (std::vector<std::string>{"ConfigureNetwork(standby)", "PrepareTemplate"}));
  EXPECT_TRUE(Eventually([&] { return vms_->running().empty(); })) << "the build VM stays";
  std::vector<std::string> keys;
  for (const auto& e : fs::directory_iterator(cfg_.state_dir + "/templates")) {
    keys.push_back(e.path().filename());
  }
  ASSERT_EQ(keys.size(), 1u);
  const std::string state = cfg_.state_dir + "/templates/" + keys[0] + "/state";
  EXPECT_EQ(fs::status(cfg_.state_dir + "/templates").permissions() & fs::perms::all,
            fs::perms::owner_all);

  // Restored, and reseeded first.
  StartPod("p1");
  const std::string d1 = "peapod-p1";
  EXPECT_TRUE(vms_->Restored(d1));
  auto calls = vms_->CallsOf(d1);
  ASSERT_FALSE(calls.empty());
  EXPECT_EQ(calls.front(), "Resumed") << "the pod's setup reached a guest with the template's RNG";
  // The guest's NIC has the template's MAC until the agent gives it the pod's.
  ASSERT_TRUE(vms_->NetworkOf(d1));
  auto itf = vms_->NetworkOf(d1)->interfaces(0);
  EXPECT_NE(itf.current_mac(), itf.mac());
  EXPECT_FALSE(itf.current_mac().empty());
  // A pod without a network has no NIC, unlike the template: it boots.
  StartPod("p2", PodOptions());
  EXPECT_FALSE(vms_->Restored("peapod-p2"));

  // A start that fails for the pod's own reason (its network) is not the template's.
  ASSERT_OK(Create("p3", WithNetns()));
  net_->FailNext("PrepareTap", Error::NotFound("the CNI interface vanished"));
  EXPECT_FALSE(Start("p3").ok());
  EXPECT_TRUE(ready()) << "a pod's own failure dropped the template";

  // A state that does not load: the pod boots, and the template is built again.
  std::ofstream(state, std::ios::trunc) << "bad state\n";
  auto s = Start("p3");
  ASSERT_TRUE(s.ok()) << s.error().ToString();
  EXPECT_FALSE(vms_->Restored("peapod-p3")) << "booted instead";
  ASSERT_TRUE(Eventually(ready)) << "the template was not built again";
  StartPod("p4");
  EXPECT_TRUE(vms_->Restored("peapod-p4"));
}

}  // namespace
}  // namespace peapod::sandboxer
