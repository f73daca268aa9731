// The sandboxer's pod state machine (PodManager) over a fake VM backend whose "VMs" are the
// real peapod-agent running as local processes: Create / Start / Stop / Wait / Shutdown, their
// error answers, a VM that fails to start or dies, and a restarted sandboxer recovering its
// pods. Needs root (the agent in local mode), so it is labelled root and skips without it.
#include <signal.h>
#include <sys/mount.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <future>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "common/base/unique_fd.h"
#include "common/ttrpc/client.h"
#include "peapod/agent/v1/agent.pb.h"
#include "sandboxer/pods.h"
#include "tests/sandboxer/fake_backend.h"
#include "tests/sandboxer/pod_manager_fixture.h"
#include "tests/unit/loop_fixture.h"

namespace peapod::sandboxer {
namespace {

bool Alive(pid_t pid) { return ::kill(pid, 0) == 0; }

template <typename T>
Code CodeOf(const Result<T>& r) {
  return r.ok() ? Code::kOk : r.error().code();
}

TEST_F(PodManagerTest, CreateThenStartMakesThePodReadyWithItsAgentReachable) {
  ASSERT_OK(Create("pod1"));
  auto created = Status("pod1");
  ASSERT_TRUE(created.ok()) << created.error().ToString();
  EXPECT_FALSE(created->ready);
  EXPECT_EQ(created->phase, "created");
  EXPECT_GT(created->created_at_ns, 0);
  EXPECT_TRUE(fs::exists(RecordDir("pod1")));
  EXPECT_TRUE(fs::exists(RunDir("pod1") + "/share/hosts"));

  auto s = Start("pod1");
  ASSERT_TRUE(s.ok()) << s.error().ToString();
  EXPECT_TRUE(s->ready);
  EXPECT_EQ(s->phase, "running");
  auto pid = backend_->PidOf(Domain("pod1"));
  ASSERT_TRUE(pid.has_value());
  EXPECT_EQ(s->pid, *pid);
  EXPECT_EQ(s->address, "ttrpc+unix://" + AgentSocket("pod1"));
  EXPECT_EQ(s->created_at_ns, created->created_at_ns);

  auto st = Status("pod1");
  ASSERT_TRUE(st.ok());
  EXPECT_TRUE(st->ready);
  EXPECT_EQ(st->pid, *pid);
  EXPECT_EQ(st->address, s->address);
  ASSERT_OK(CheckAgent(s->address));
}

// The pod's cgroup (kubelet's cgroup_parent): the VM runs in a leaf of its own below it in
// every accounting hierarchy while the pod runs, so containerd's CRI reads the pod's CPU and
// memory there (statsp); stopped, the leaf and the parents the sandboxer made are gone.
TEST_F(PodManagerTest, ThePodsVmRunsInThePodsCgroupUntilItStops) {
  auto roots = AccountingHierarchies();
  if (roots.empty()) GTEST_SKIP() << "no cgroup hierarchy that accounts CPU or memory is mounted";
  std::string parent = "/peapod-pmtest-" + std::to_string(::getpid()) + "/pod-uid-1";
  PodOptions opts;
  opts.cgroup_parent = parent;
  ASSERT_OK(Create("cg1", opts));
  auto s = Start("cg1");
  ASSERT_TRUE(s.ok()) << s.error().ToString();
  std::string leaf = parent.substr(1) + "/peapod-cg1";
  std::ifstream procs_file(roots.front() + "/" + leaf + "/cgroup.procs");
  std::string procs((std::istreambuf_iterator<char>(procs_file)), {});
  EXPECT_NE(procs.find(std::to_string(s->pid)), std::string::npos)
      << roots.front() << "/" << leaf << " holds [" << procs << "]";
  std::ifstream self("/proc/" + std::to_string(s->pid) + "/cgroup");
  std::string where((std::istreambuf_iterator<char>(self)), {});
  for (const auto& root : roots) EXPECT_TRUE(fs::exists(root + "/" + leaf)) << root;
  EXPECT_NE(where.find("/" + leaf), std::string::npos) << where;

  ASSERT_OK(Stop("cg1"));
  bool gone = false;
  for (int i = 0; i < 100 && !gone; ++i) {
    gone = std::none_of(roots.begin(), roots.end(), [&](const std::string& root) {
      return fs::exists(root + "/" + parent.substr(1, parent.find('/', 1) - 1));
    });
    if (!gone) std::this_thread::sleep_for(50ms);
  }
  EXPECT_TRUE(gone) << "the pod's cgroup (and the parents made for it) stayed";
  ASSERT_OK(Shutdown("cg1"));
}

TEST_F(PodManagerTest, ACgroupParentOutsideTheHierarchyIsRefusedAtCreate) {
  PodOptions opts;
  opts.cgroup_parent = "/kubepods/../../etc";
  auto r = Create("cg2", opts);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Code::kInvalidArgument);
  EXPECT_NE(r.error().message().find("cgroup parent"), std::string::npos) << r.error().message();
  EXPECT_FALSE(fs::exists(RecordDir("cg2"))) << "a refused Create left a record";
}

// A volume with a tmpfs on a subdirectory, as critest's read-only mount tests make it: the
// tmpfs is shared on its own (its flags kept, or read-only under rro), and the host can still
// unmount it and remove its directory while the pod runs, as with runc.
TEST_F(PodManagerTest, ShareVolumesSharesMountsBelowAVolumeOnTheirOwn) {
  ASSERT_NO_FATAL_FAILURE(StartPod("pod1"));
  std::string vol = dir_ + "/vol";
  fs::create_directories(vol + "/tmpfs");
  std::ofstream(vol + "/top") << "t";
  ASSERT_EQ(::mount("none", (vol + "/tmpfs").c_str(), "tmpfs", 0, nullptr), 0);
  std::ofstream(vol + "/tmpfs/inside") << "i";
  auto share = [&](VolumeRequest v) {
    return OnLoop<std::vector<SharedVolume>>(
        [pm = pm_.get(), v](auto done) { pm->ShareVolumes("pod1", "c1", {v}, done); });
  };
  auto plain = share({vol, /*readonly=*/true, /*recursive_readonly=*/false});
  ASSERT_TRUE(plain.ok()) << plain.error().ToString();
  ASSERT_EQ(plain->size(), 1u);
  const auto& sv = (*plain)[0];
  ASSERT_EQ(sv.submounts.size(), 1u);
  EXPECT_EQ(sv.submounts[0].path, "/tmpfs");
  EXPECT_FALSE(sv.submounts[0].readonly);
  const std::string host_share = RunDir("pod1") + "/share";
  auto on_host = [&](const std::string& guest) {
    return host_share + guest.substr(std::string(kGuestShareDir).size());
  };
  EXPECT_TRUE(fs::exists(on_host(sv.guest_path) + "/top"));
  EXPECT_FALSE(fs::exists(on_host(sv.guest_path) + "/tmpfs/inside")) << "bind was recursive";
  EXPECT_TRUE(fs::exists(on_host(sv.submounts[0].guest_path) + "/inside"));
  EXPECT_TRUE(std::ofstream(on_host(sv.submounts[0].guest_path) + "/new").good());
  EXPECT_FALSE(std::ofstream(on_host(sv.guest_path) + "/new").good()) << "volume is writable";

  auto rro = share({vol, true, true});
  ASSERT_TRUE(rro.ok()) << rro.error().ToString();
  ASSERT_EQ((*rro)[0].submounts.size(), 1u);
  EXPECT_TRUE((*rro)[0].submounts[0].readonly);
  EXPECT_FALSE(std::ofstream(on_host((*rro)[0].submounts[0].guest_path) + "/x").good());

  // A volume above the run dir: the pods' own share binds are not its submounts.
  auto above = share({dir_, true, false});
  ASSERT_TRUE(above.ok()) << above.error().ToString();
  ASSERT_EQ((*above)[0].submounts.size(), 1u);
  EXPECT_EQ((*above)[0].submounts[0].path, "/vol/tmpfs");

  // What critest's cleanup does while the container still runs.
  ASSERT_EQ(::umount2((vol + "/tmpfs").c_str(), MNT_DETACH), 0);
  std::error_code ec;
  fs::remove_all(vol, ec);
  EXPECT_FALSE(ec) << "removing the volume: " << ec.message();

  ASSERT_OK(
      OnLoop<void>([pm = pm_.get()](auto done) { pm->ReleaseContainer("pod1", "c1", done); }));
  EXPECT_FALSE(fs::exists(host_share + "/volumes/c1"));
}

TEST_F(PodManagerTest, StartIsIdempotent) {
  PodStatus first;
  ASSERT_NO_FATAL_FAILURE(StartPod("pod1", &first));
  auto again = Start("pod1");
  ASSERT_TRUE(again.ok()) << again.error().ToString();
  EXPECT_TRUE(again->ready);
  EXPECT_EQ(again->pid, first.pid);
  EXPECT_EQ(backend_->start_calls(), 1u);
  EXPECT_EQ(backend_->List()->size(), 1u);
  ASSERT_OK(CheckAgent(again->address));
}

TEST_F(PodManagerTest, CreatingTwiceIsAlreadyExistsAndLeavesTheFirstPodAlone) {
  PodStatus first;
  ASSERT_NO_FATAL_FAILURE(StartPod("pod1", &first));
  auto r = Create("pod1");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Code::kAlreadyExists) << r.error().ToString();
  // Also with options that would fail on their own.
  r = Create("pod1", InNetns(dir_ + "/no-such-netns"));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Code::kAlreadyExists) << r.error().ToString();
  auto s = Status("pod1");
  ASSERT_TRUE(s.ok());
  EXPECT_TRUE(s->ready);
  EXPECT_EQ(s->pid, first.pid);
  EXPECT_TRUE(fs::exists(RecordDir("pod1")));
  ASSERT_OK(CheckAgent(s->address));
}

TEST_F(PodManagerTest, AnInvalidIdIsInvalidArgument) {
  for (std::string id : std::vector<std::string>{"", "../escape", "a/b", ".hidden", "-dash",
                                                 std::string(129, 'a')}) {
    auto r = Create(id);
    ASSERT_FALSE(r.ok()) << "'" << id << "'";
    EXPECT_EQ(r.error().code(), Code::kInvalidArgument) << r.error().ToString();
  }
  // The names of the sandboxer's own VMs (their run dirs, TAPs and domains) are no pod's.
  for (std::string id : {"template-build", "pool-0123456789ab"}) {
    auto r = Create(id);
    ASSERT_FALSE(r.ok()) << id;
    EXPECT_NE(r.error().message().find("reserved"), std::string::npos) << r.error().ToString();
  }
  EXPECT_FALSE(fs::exists(cfg_.state_dir + "/escape"));
  EXPECT_FALSE(fs::exists(cfg_.run_dir + "/escape"));
  EXPECT_TRUE(fs::is_empty(cfg_.state_dir + "/pods"));
}

TEST_F(PodManagerTest, AMissingNetnsIsNotFoundAndLeavesNothing) {
  auto r = Create("pod1", InNetns("/run/netns/peapod-test-does-not-exist"));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Code::kNotFound) << r.error().ToString();
  EXPECT_EQ(CodeOf(Status("pod1")), Code::kNotFound);
  EXPECT_FALSE(fs::exists(RecordDir("pod1")));
  EXPECT_FALSE(fs::exists(RunDir("pod1")));
  // The id is free for a good request.
  ASSERT_OK(Create("pod1"));
}

TEST_F(PodManagerTest, UnknownIds) {
  auto start = Start("nope");
  ASSERT_FALSE(start.ok());
  EXPECT_EQ(start.error().code(), Code::kNotFound);
  auto status = Status("nope");
  ASSERT_FALSE(status.ok());
  EXPECT_EQ(status.error().code(), Code::kNotFound);
  auto wait = WaitAsync("nope");
  ASSERT_EQ(wait.wait_for(10s), std::future_status::ready);
  auto w = wait.get();
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.error().code(), Code::kNotFound);
  // containerd retries these after a crash: they must succeed.
  ASSERT_OK(Stop("nope"));
  ASSERT_OK(Shutdown("nope"));
}

TEST_F(PodManagerTest, AFailedVmStartLeavesThePodCreatedAndALaterStartWorks) {
  ASSERT_OK(Create("pod1"));
  backend_->FailNextStart(Error(Code::kResourceExhausted, "injected: no memory for the VM"));
  auto r = Start("pod1");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Code::kResourceExhausted) << r.error().ToString();
  EXPECT_NE(r.error().ToString().find("injected"), std::string::npos) << r.error().ToString();
  auto s = Status("pod1");
  ASSERT_TRUE(s.ok());
  EXPECT_FALSE(s->ready);
  EXPECT_EQ(s->phase, "created");
  EXPECT_EQ(s->pid, 0);
  EXPECT_TRUE(backend_->List()->empty());
  EXPECT_FALSE(fs::exists(AgentSocket("pod1")));

  auto again = Start("pod1");
  ASSERT_TRUE(again.ok()) << again.error().ToString();
  EXPECT_TRUE(again->ready);
  ASSERT_OK(CheckAgent(again->address));
}

TEST_F(PodManagerTest, AVmDyingWhileBootingFailsStartAndALaterStartWorks) {
  ASSERT_OK(Create("pod1"));
  backend_->KillAfterNextStart();
  auto r = Start("pod1");
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().ToString().find("start sandbox pod1"), std::string::npos)
      << r.error().ToString();
  auto s = Status("pod1");
  ASSERT_TRUE(s.ok());
  EXPECT_FALSE(s->ready);
  EXPECT_EQ(s->phase, "created");
  EXPECT_TRUE(backend_->List()->empty());

  auto again = Start("pod1");
  ASSERT_TRUE(again.ok()) << again.error().ToString();
  EXPECT_TRUE(again->ready);
  ASSERT_OK(CheckAgent(again->address));
}

// A failed Start answers only once its VM (and its TAP and scratch disk) are gone: a Start
// retried at once must not find its new VM destroyed by the first one's cleanup.
TEST_F(PodManagerTest, AFailedStartAnswersOnlyOnceItsVmIsGone) {
  ASSERT_OK(Create("pod1"));
  backend_->KillAfterNextStart();
  backend_->DelayNextDestroy(500ms);
  const size_t destroyed = backend_->destroy_calls();
  auto r = Start("pod1");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(backend_->destroy_calls(), destroyed + 1) << "Start answered before its cleanup";
  auto again = Start("pod1");
  ASSERT_TRUE(again.ok()) << again.error().ToString();
  std::this_thread::sleep_for(200ms);
  EXPECT_TRUE(Status("pod1")->ready) << "the retried Start's VM was destroyed";
  ASSERT_OK(CheckAgent(again->address));
}

TEST_F(PodManagerTest, AKilledVmMakesThePodNotReadyAndEndsWaitWith255) {
  PodStatus st;
  ASSERT_NO_FATAL_FAILURE(StartPod("pod1", &st));
  auto wait = WaitAsync("pod1");
  ASSERT_EQ(wait.wait_for(200ms), std::future_status::timeout) << "Wait returned while running";
  auto t0 = std::chrono::steady_clock::now();
  ASSERT_TRUE(backend_->Kill(Domain("pod1")));
  ASSERT_EQ(wait.wait_for(10s), std::future_status::ready);
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 5s);
  auto exit = wait.get();
  ASSERT_TRUE(exit.ok()) << exit.error().ToString();
  EXPECT_EQ(exit->exit_status, 255u);
  EXPECT_GT(exit->exited_at_ns, 0);
  auto s = Status("pod1");
  ASSERT_TRUE(s.ok());
  EXPECT_FALSE(s->ready);
  EXPECT_EQ(s->phase, "stopped");
  EXPECT_EQ(s->exited_at_ns, exit->exited_at_ns);
  EXPECT_FALSE(fs::exists(AgentSocket("pod1")));
  // A stopped pod does not start again; it can be stopped (nothing to do) and shut down.
  auto restart = Start("pod1");
  ASSERT_FALSE(restart.ok());
  EXPECT_EQ(restart.error().code(), Code::kFailedPrecondition);
  ASSERT_OK(Stop("pod1"));
  ASSERT_OK(Shutdown("pod1"));
  EXPECT_FALSE(fs::exists(RecordDir("pod1")));
}

TEST_F(PodManagerTest, StopEndsWaitWithStatusZero) {
  PodStatus st;
  ASSERT_NO_FATAL_FAILURE(StartPod("pod1", &st));
  auto wait = WaitAsync("pod1");
  ASSERT_OK(Stop("pod1"));
  ASSERT_EQ(wait.wait_for(10s), std::future_status::ready);
  auto exit = wait.get();
  ASSERT_TRUE(exit.ok()) << exit.error().ToString();
  EXPECT_EQ(exit->exit_status, 0u);
  auto s = Status("pod1");
  ASSERT_TRUE(s.ok());
  EXPECT_FALSE(s->ready);
  EXPECT_EQ(s->phase, "stopped");
  EXPECT_TRUE(backend_->List()->empty());
  EXPECT_FALSE(Alive(st.pid));
  ASSERT_OK(Stop("pod1"));
  // Wait after the fact answers at once, with the same status.
  auto late = WaitAsync("pod1");
  ASSERT_EQ(late.wait_for(10s), std::future_status::ready);
  auto l = late.get();
  ASSERT_TRUE(l.ok());
  EXPECT_EQ(l->exit_status, 0u);
  EXPECT_EQ(l->exited_at_ns, exit->exited_at_ns);
}

TEST_F(PodManagerTest, ShutdownRemovesTheRecordAndRunDir) {
  PodStatus st;
  ASSERT_NO_FATAL_FAILURE(StartPod("pod1", &st));
  auto wait = WaitAsync("pod1");
  ASSERT_OK(Shutdown("pod1"));
  ASSERT_EQ(wait.wait_for(10s), std::future_status::ready);
  EXPECT_TRUE(wait.get().ok());
  EXPECT_FALSE(fs::exists(RecordDir("pod1")));
  EXPECT_FALSE(fs::exists(RunDir("pod1")));
  EXPECT_TRUE(backend_->List()->empty());
  EXPECT_EQ(CodeOf(Status("pod1")), Code::kNotFound);
  ASSERT_OK(Shutdown("pod1"));
  // A pod that never started shuts down too.
  ASSERT_OK(Create("pod2"));
  ASSERT_OK(Shutdown("pod2"));
  EXPECT_FALSE(fs::exists(RecordDir("pod2")));
  EXPECT_FALSE(fs::exists(RunDir("pod2")));
  EXPECT_EQ(backend_->start_calls(), 1u);
}

TEST_F(PodManagerTest, ARestartedSandboxerReadoptsRunningPods) {
  PodStatus st;
  ASSERT_NO_FATAL_FAILURE(StartPod("pod1", &st));
  auto wait = WaitAsync("pod1");
  DropManager();
  ASSERT_EQ(wait.wait_for(10s), std::future_status::ready);
  auto w = wait.get();
  ASSERT_FALSE(w.ok());
  EXPECT_EQ(w.error().code(), Code::kUnavailable) << w.error().ToString();
  ASSERT_TRUE(Alive(st.pid));

  ASSERT_OK(NewManager());
  auto s = Status("pod1");
  ASSERT_TRUE(s.ok()) << s.error().ToString();
  EXPECT_TRUE(s->ready);
  EXPECT_EQ(s->pid, st.pid);
  EXPECT_EQ(s->address, st.address);
  EXPECT_EQ(s->created_at_ns, st.created_at_ns);
  ASSERT_OK(CheckAgent(s->address));
  EXPECT_EQ(backend_->start_calls(), 1u);

  // And it still follows the pod: a crash now ends a new Wait.
  auto wait2 = WaitAsync("pod1");
  ASSERT_TRUE(backend_->Kill(Domain("pod1")));
  ASSERT_EQ(wait2.wait_for(10s), std::future_status::ready);
  auto w2 = wait2.get();
  ASSERT_TRUE(w2.ok()) << w2.error().ToString();
  EXPECT_EQ(w2->exit_status, 255u);
}

TEST_F(PodManagerTest, APodWhoseVmDiedWhileAwayComesBackStopped) {
  PodStatus st;
  ASSERT_NO_FATAL_FAILURE(StartPod("pod1", &st));
  ASSERT_NO_FATAL_FAILURE(StartPod("pod2"));
  DropManager();
  ASSERT_TRUE(backend_->Kill(Domain("pod1")));

  ASSERT_OK(NewManager());
  auto s = Status("pod1");
  ASSERT_TRUE(s.ok()) << s.error().ToString();
  EXPECT_FALSE(s->ready);
  EXPECT_EQ(s->phase, "stopped");
  EXPECT_GT(s->exited_at_ns, 0);
  auto wait = WaitAsync("pod1");
  ASSERT_EQ(wait.wait_for(10s), std::future_status::ready);
  auto w = wait.get();
  ASSERT_TRUE(w.ok()) << w.error().ToString();
  EXPECT_EQ(w->exit_status, 255u);
  // The other pod was not disturbed.
  auto s2 = Status("pod2");
  ASSERT_TRUE(s2.ok());
  EXPECT_TRUE(s2->ready);
  ASSERT_OK(CheckAgent(s2->address));
  ASSERT_OK(Shutdown("pod1"));
  EXPECT_FALSE(fs::exists(RecordDir("pod1")));
  EXPECT_FALSE(fs::exists(RunDir("pod1")));
}

TEST_F(PodManagerTest, APodLeftStartingByARestartComesBackCreated) {
  ASSERT_OK(Create("pod1"));
  // The sandboxer goes away right after accepting Start: the record says "starting" (the
  // writer finishes its job), and nobody sees a VM answer.
  lt_->Sync([&] {
    pm_->Start("pod1", [](Result<PodStatus>) {});
    pm_->CancelWaiters();
    backend_->SetOnStopped(nullptr);
    pm_.reset();
  });
  {
    std::ifstream f(cfg_.state_dir + "/pods/pod1/pod.json");
    std::string text(std::istreambuf_iterator<char>(f), {});
    EXPECT_NE(text.find("starting"), std::string::npos) << text;
  }

  ASSERT_OK(NewManager());
  EXPECT_TRUE(backend_->List()->empty()) << "the half-started VM was not destroyed";
  auto s = Status("pod1");
  ASSERT_TRUE(s.ok()) << s.error().ToString();
  EXPECT_FALSE(s->ready);
  EXPECT_EQ(s->phase, "created");
  auto again = Start("pod1");
  ASSERT_TRUE(again.ok()) << again.error().ToString();
  EXPECT_TRUE(again->ready);
  ASSERT_OK(CheckAgent(again->address));
}

TEST_F(PodManagerTest, RecoverDestroysVmsWithoutARecord) {
  ASSERT_NO_FATAL_FAILURE(StartPod("pod1"));
  DropManager();
  VmSpec orphan;
  orphan.name = "peapod-orphan";
  orphan.agent_socket = dir_ + "/orphan.sock";
  auto vm = backend_->Start(orphan);
  ASSERT_TRUE(vm.ok()) << vm.error().ToString();
  ASSERT_TRUE(Alive(vm->pid));
  // And a run dir with no record (a crash between removing the record and the dir).
  fs::create_directories(RunDir("gone") + "/share");

  ASSERT_OK(NewManager());
  EXPECT_FALSE(backend_->PidOf("peapod-orphan").has_value());
  EXPECT_FALSE(Alive(vm->pid));
  auto list = backend_->List();
  ASSERT_EQ(list->size(), 1u);
  EXPECT_EQ((*list)[0].name, Domain("pod1"));
  EXPECT_FALSE(fs::exists(RunDir("gone")));
  auto s = Status("pod1");
  ASSERT_TRUE(s.ok());
  EXPECT_TRUE(s->ready);
}

// The warm pool: a Start adopts a pre-booted VM (no boot on the pod's path), each VM serves one
// pod only, the pool refills behind it, and the pool goes with the sandboxer while pods stay.
TEST_F(PodManagerTest, APoolVmIsAdoptedByOnePodAndThePoolRefills) {
  DropManager();
  cfg_.pool_size = 1;
  ASSERT_TRUE(NewManager().ok());
  lt_->Sync([&] { pm_->FillPool(); });
  auto pool_vm = [&](const std::set<std::string>& not_these) -> std::optional<VmInfo> {
    for (int i = 0; i < 300; ++i) {
      size_t ready = 0;
      lt_->Sync([&] { ready = pm_->pool_ready(); });
      if (ready) {
        auto vms = backend_->List();
        for (const auto& vm : vms.ok() ? *vms : std::vector<VmInfo>{}) {
          if (vm.name.starts_with("peapod-pool-") && !not_these.count(vm.name)) return vm;
        }
      }
      std::this_thread::sleep_for(50ms);
    }
    return std::nullopt;
  };
  auto first = pool_vm({});
  ASSERT_TRUE(first) << "no pool VM became ready";

  ASSERT_TRUE(Create("pod1").ok());
  auto s1 = Start("pod1");
  ASSERT_TRUE(s1.ok()) << s1.error().ToString();
  EXPECT_EQ(s1->pid, first->pid) << "pod1 did not get the pool VM";
  EXPECT_TRUE(s1->ready);
  // Its files moved in: the agent socket serves pod1 from pod1's run dir.
  EXPECT_TRUE(fs::exists(dir_ + "/run/pods/pod1/agent.sock"));
  EXPECT_FALSE(fs::exists(dir_ + "/run/pods/" + first->name.substr(7)));

  // The pool refills with another VM; the next pod takes that one, never pod1's.
  auto second = pool_vm({first->name});
  ASSERT_TRUE(second) << "the pool did not refill";
  ASSERT_TRUE(Create("pod2").ok());
  auto s2 = Start("pod2");
  ASSERT_TRUE(s2.ok()) << s2.error().ToString();
  EXPECT_EQ(s2->pid, second->pid);
  EXPECT_NE(s2->pid, s1->pid);

  // pod1's VM (the pool's first) goes with pod1.
  ASSERT_TRUE(Stop("pod1").ok());
  ASSERT_TRUE(Shutdown("pod1").ok());
  auto after1 = backend_->List();
  ASSERT_TRUE(after1.ok());
  for (const auto& vm : *after1) EXPECT_NE(vm.name, first->name);

  // A sandboxer restart without a pool: pod2 is re-adopted, and the pool VMs are gone.
  auto third = pool_vm({first->name, second->name});
  ASSERT_TRUE(third);
  DropManager();
  cfg_.pool_size = 0;
  ASSERT_TRUE(NewManager().ok());
  auto st = Status("pod2");
  ASSERT_TRUE(st.ok());
  EXPECT_TRUE(st->ready);
  auto after = backend_->List();
  ASSERT_TRUE(after.ok());
  ASSERT_EQ(after->size(), 1u);
  EXPECT_EQ(after->front().name, second->name);  // pod2's, named as the pool named it
  ASSERT_TRUE(Shutdown("pod2").ok());
  EXPECT_TRUE(fs::is_empty(dir_ + "/run/pods", ec_));
  EXPECT_FALSE(fs::exists(dir_ + "/state/pool") && !fs::is_empty(dir_ + "/state/pool", ec_));
}

}  // namespace
}  // namespace peapod::sandboxer
