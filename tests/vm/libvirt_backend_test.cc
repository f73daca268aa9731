// The sandboxer's libvirt backend: the guest image booted by libvirt's embedded QEMU driver (no
// daemon), reached through the agent channel mux, stopped, and noticed when it dies.
#include <csignal>
#include <future>

#include "sandboxer/agent_mux.h"
#include "sandboxer/domain_xml.h"
#include "sandboxer/libvirt_backend.h"
#include "tests/common/agent_client.h"
#include "tests/vm/vm_fixture.h"

namespace peapod::vmtest {
namespace {

using sandboxer::LibvirtBackend;
using sandboxer::VmSpec;

class LibvirtBackendTest : public AgentVmTest {
 protected:
  void SetUp() override {
    AgentVmTest::SetUp();
    if (IsSkipped()) return;
    if (::geteuid() != 0) GTEST_SKIP() << "the embedded libvirt driver needs root here";
    const char* root = std::getenv("PEAPOD_TEST_LIBVIRT_ROOT");
    // As the sandboxer's guest_huge_pages auto: none under TCG.
    auto b =
        LibvirtBackend::Open({.uri = "",
                              .embed_root = root && *root ? root : "/var/lib/peapod/test-libvirt",
                              .guest_huge_pages = Accel() == "kvm"});
    ASSERT_TRUE(b.ok()) << b.error().ToString();
    backend_ = std::move(*b);
    backend_->SetOnStopped([this](const std::string& name) {
      std::lock_guard<std::mutex> l(mu_);
      stopped_.push_back(name);
      cv_.notify_all();
    });
  }
  void TearDown() override {
    if (backend_) {
      for (auto& n : started_) (void)backend_->Destroy(n);
      backend_.reset();
    }
    AgentVmTest::TearDown();
  }

  VmSpec Spec(const std::string& name) {
    VmSpec s;
    s.name = name;
    s.kernel = ImageDir() + "/vmlinux";
    s.initrd = ImageDir() + "/initrd.img";
    s.cmdline = KernelCmdline();
    s.kvm = Accel() == "kvm";
    s.agent_socket = dir_ + "/" + name + ".agent.sock";
    s.console_log = dir_ + "/" + name + ".console.log";
    s.share_dir = dir_;
    started_.push_back(name);
    return s;
  }

  bool WaitStopped(const std::string& name, std::chrono::milliseconds timeout) {
    std::unique_lock<std::mutex> l(mu_);
    return cv_.wait_for(l, timeout, [&] {
      return std::find(stopped_.begin(), stopped_.end(), name) != stopped_.end();
    });
  }

  std::string ConsoleOf(const std::string& name) {
    std::ifstream f(dir_ + "/" + name + ".console.log");
    return std::string(std::istreambuf_iterator<char>(f), {});
  }

  std::unique_ptr<LibvirtBackend> backend_;
  std::vector<std::string> started_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::string> stopped_;
};

TEST_F(LibvirtBackendTest, BootsThroughLibvirtAnswersThroughTheMuxAndStops) {
  auto t0 = std::chrono::steady_clock::now();
  auto vm = backend_->Start(Spec("peapod-lv1"));
  ASSERT_TRUE(vm.ok()) << vm.error().ToString();
  auto started_ms =
      std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() - t0)
          .count();
  EXPECT_GT(vm->pid, 0);
  EXPECT_EQ(::kill(vm->pid, 0), 0) << "QEMU pid " << vm->pid << " is not running";

  // Two shims through the mux, as the sandboxer will serve them on the pod's agent.sock.
  peapod::testing::LoopThread lt;
  std::unique_ptr<sandboxer::AgentMux> mux;
  std::string mux_sock = dir_ + "/mux.sock";
  // QEMU's chardev socket exists once QEMU runs.
  auto upstream = ConnectUnix(dir_ + "/peapod-lv1.agent.sock");
  ASSERT_TRUE(upstream.ok()) << upstream.error().ToString();
  lt.Sync([&] {
    mux = std::make_unique<sandboxer::AgentMux>(lt.loop());
    ASSERT_TRUE(mux->AttachUpstream(std::move(*upstream)).ok());
    ASSERT_TRUE(mux->ServeListener(*ListenUnix(mux_sock)).ok());
  });
  v1::CheckResponse a, b;
  auto shim1 = ConnectAndCheck(lt, mux_sock, &a);
  ASSERT_NE(shim1, nullptr) << "agent never answered through the mux; console:\n"
                            << ConsoleOf("peapod-lv1");
  auto shim2 = ConnectAndCheck(lt, mux_sock, &b, 30s);
  ASSERT_NE(shim2, nullptr);
  EXPECT_EQ(a.boot_id(), b.boot_id());
  std::printf("libvirt createXML took %lld ms; agent answered through the mux %.2f s after\n",
              static_cast<long long>(started_ms),
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());

  auto listed = backend_->List();
  ASSERT_TRUE(listed.ok());
  ASSERT_EQ(listed->size(), 1u);
  EXPECT_EQ((*listed)[0].name, "peapod-lv1");

  // The guest powers off on request; libvirt reports the domain stopped.
  auto off = shim1->CallSyncTyped<google::protobuf::Empty>(kAgent, "DestroySandbox",
                                                           v1::DestroySandboxRequest());
  EXPECT_TRUE(off.ok()) << off.error().ToString();
  EXPECT_TRUE(WaitStopped("peapod-lv1", 30s));
  EXPECT_TRUE(backend_->List()->empty());
  // Stopping what is already gone is fine.
  EXPECT_TRUE(backend_->Destroy("peapod-lv1").ok());
  lt.Sync([&] {
    shim1.reset();
    shim2.reset();
    mux.reset();
  });
}

TEST_F(LibvirtBackendTest, AKilledQemuIsNoticedWithinTwoSeconds) {
  auto vm = backend_->Start(Spec("peapod-lv2"));
  ASSERT_TRUE(vm.ok()) << vm.error().ToString();
  ASSERT_GT(vm->pid, 0);
  ASSERT_EQ(::kill(vm->pid, SIGKILL), 0);
  auto t0 = std::chrono::steady_clock::now();
  EXPECT_TRUE(WaitStopped("peapod-lv2", 2s)) << "no stopped event 2 s after kill -9 of QEMU";
  std::printf("stopped event %.2f s after kill -9\n",
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  // Reaped: no zombie left behind.
  std::this_thread::sleep_for(200ms);
  EXPECT_NE(::kill(vm->pid, 0), 0);
}

// The first word after `key` on its line of /proc/<pid>/<file> ("" when there is none).
std::string ProcField(int pid, const std::string& file, const std::string& key) {
  std::ifstream f("/proc/" + std::to_string(pid) + "/" + file);
  for (std::string l; std::getline(f, l);) {
    if (l.rfind(key, 0) != 0) continue;
    std::istringstream rest(l.substr(key.size()));
    std::string word;
    rest >> word;
    return word;
  }
  return "";
}

// QEMU's resident memory, KiB (-1: unknown).
long RssKib(int pid) {
  std::string kib = ProcField(pid, "status", "VmRSS:");
  return kib.empty() ? -1 : std::stol(kib);
}

// Free page reporting (the domain's virtio balloon, the guest's virtio_balloon module): memory a
// container touched and freed goes back to the host instead of staying resident in QEMU for
// the pod's life.
TEST_F(LibvirtBackendTest, MemoryAContainerFreesGoesBackToTheHost) {
  std::string layer = dir_ + "/busybox.erofs";
  if (auto why = agenttest::BuildBusyboxLayer(dir_, layer); !why.empty()) GTEST_SKIP() << why;
  auto spec = Spec("peapod-lv4");
  spec.disks.push_back({.path = layer, .unit = 0, .readonly = true});
  auto vm = backend_->Start(spec);
  ASSERT_TRUE(vm.ok()) << vm.error().ToString();

  peapod::testing::LoopThread lt;
  std::unique_ptr<sandboxer::AgentMux> mux;
  auto upstream = ConnectUnix(spec.agent_socket);
  ASSERT_TRUE(upstream.ok()) << upstream.error().ToString();
  lt.Sync([&] {
    mux = std::make_unique<sandboxer::AgentMux>(lt.loop());
    ASSERT_TRUE(mux->AttachUpstream(std::move(*upstream)).ok());
    ASSERT_TRUE(mux->ServeListener(*ListenUnix(dir_ + "/mux4.sock")).ok());
  });
  v1::CheckResponse check;
  auto client = ConnectAndCheck(lt, dir_ + "/mux4.sock", &check);
  ASSERT_NE(client, nullptr) << "agent never answered; console:\n" << ConsoleOf("peapod-lv4");
  agenttest::AgentClient agent(client, agenttest::BusyboxLayerStorage());
  v1::CreateSandboxRequest sb;
  sb.set_sandbox_id("pod4");
  sb.set_hostname("pod4");
  ASSERT_TRUE(agent.Sync(&agentapi::AgentClient::CreateSandbox, sb).ok());

  // Settled after boot (the initrd the kernel unpacked and freed is reported too).
  std::this_thread::sleep_for(5s);
  long before = RssKib(vm->pid);
  ASSERT_GT(before, 0);
  if (Accel() == "tcg") {
    // Under TCG guest RAM is in 4 KiB pages: QEMU inherited PR_SET_THP_DISABLE, so a 2 MiB
    // huge page does not stay resident for one page the guest still uses.
    EXPECT_EQ(ProcField(vm->pid, "status", "THP_enabled:"), "0");
    EXPECT_EQ(ProcField(vm->pid, "smaps_rollup", "AnonHugePages:"), "0");
  }
  // dd's 192 MiB buffer is touched (read from /dev/zero) and freed when dd exits.
  ASSERT_TRUE(agent
                  .Create("hog", agenttest::Spec(
                                     {"dd", "if=/dev/zero", "of=/dev/null", "bs=192M", "count=1"}))
                  .ok());
  ASSERT_TRUE(agent.Start("hog").ok());
  auto code = agent.Wait("hog");
  ASSERT_TRUE(code.ok()) << code.error().ToString();
  ASSERT_EQ(*code, 0u) << agent.ReadAll("hog", "", true);
  long peak = RssKib(vm->pid);
  // Reported within seconds (the guest waits 2 s after frees before it reports).
  long after = peak;
  for (int i = 0; i < 60 && after > before + (64 << 10); ++i) {
    std::this_thread::sleep_for(500ms);
    after = RssKib(vm->pid);
  }
  std::printf("QEMU RSS: %ld MiB idle, %ld MiB after the container's 192 MiB, %ld MiB later\n",
              before >> 10, peak >> 10, after >> 10);
  EXPECT_LE(after, before + (64 << 10))
      << "the 192 MiB the container freed stayed resident in QEMU (peak " << (peak >> 10)
      << " MiB)";
  lt.Sync([&] {
    client.reset();
    mux.reset();
  });
}

// VM templates at the backend: a booted VM's state saved once and loaded by two VMs, which run
// on from it (same boot id, no second boot), take fresh randomness when told, and then read
// different random streams.
TEST_F(LibvirtBackendTest, TwoVmsRestoredFromOneSavedStateRunOnWithTheirOwnRandomness) {
  std::string layer = dir_ + "/busybox.erofs";
  if (auto why = agenttest::BuildBusyboxLayer(dir_, layer); !why.empty()) GTEST_SKIP() << why;
  peapod::testing::LoopThread lt;
  // A client on a VM's agent socket, through a mux like the sandboxer's.
  struct Conn {
    std::unique_ptr<sandboxer::AgentMux> mux;
    std::shared_ptr<ttrpc::Client> client;
  };
  auto connect = [&](const VmSpec& spec, v1::CheckResponse* check) {
    Conn c;
    auto upstream = ConnectUnix(spec.agent_socket);
    EXPECT_TRUE(upstream.ok()) << upstream.error().ToString();
    if (!upstream.ok()) return c;
    std::string sock = spec.agent_socket + ".mux";
    lt.Sync([&] {
      c.mux = std::make_unique<sandboxer::AgentMux>(lt.loop());
      EXPECT_TRUE(c.mux->AttachUpstream(std::move(*upstream)).ok());
      EXPECT_TRUE(c.mux->ServeListener(*ListenUnix(sock)).ok());
    });
    c.client = ConnectAndCheck(lt, sock, check);
    return c;
  };
  auto close = [&](Conn& c) {
    lt.Sync([&] {
      c.client.reset();
      c.mux.reset();
    });
  };

  auto tspec = Spec("peapod-lvt");
  ASSERT_TRUE(backend_->Start(tspec).ok());
  v1::CheckResponse tcheck;
  Conn t = connect(tspec, &tcheck);
  ASSERT_NE(t.client, nullptr) << ConsoleOf("peapod-lvt");
  {
    agenttest::AgentClient agent(t.client, agenttest::BusyboxLayerStorage());
    v1::PrepareTemplateRequest prep;
    prep.add_fstypes("ext4");
    auto p = agent.Sync(&agentapi::AgentClient::PrepareTemplate, prep);
    ASSERT_TRUE(p.ok()) << p.error().ToString();
  }
  close(t);
  std::this_thread::sleep_for(100ms);  // the agent sees the host leave
  std::string state = dir_ + "/template.state";
  auto t0 = std::chrono::steady_clock::now();
  auto saved = backend_->SaveState("peapod-lvt", state);
  ASSERT_TRUE(saved.ok()) << saved.error().ToString();
  std::printf("state saved in %.2f s: %jd MiB\n",
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(),
              static_cast<intmax_t>(std::filesystem::file_size(state) >> 20));
  ASSERT_TRUE(backend_->Destroy("peapod-lvt").ok());

  std::vector<std::string> uuids;
  for (const char* name : {"peapod-lvc1", "peapod-lvc2"}) {
    auto spec = Spec(name);
    spec.restore_from = state;
    t0 = std::chrono::steady_clock::now();
    auto vm = backend_->Start(spec);
    ASSERT_TRUE(vm.ok()) << vm.error().ToString();
    v1::CheckResponse check;
    Conn c = connect(spec, &check);
    ASSERT_NE(c.client, nullptr) << ConsoleOf(name);
    std::printf("%s: agent answered %.2f s after start\n", name,
                std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    EXPECT_EQ(check.boot_id(), tcheck.boot_id()) << "a restored VM runs on; it does not boot";
    agenttest::AgentClient agent(c.client, agenttest::BusyboxLayerStorage());
    v1::ResumedRequest resumed;
    resumed.set_entropy(std::string(16, 'x'));
    EXPECT_FALSE(agent.Sync(&agentapi::AgentClient::Resumed, resumed).ok())
        << "16 bytes are too few to reseed from";
    std::string entropy(64, '\0');
    std::ifstream("/dev/urandom").read(entropy.data(), 64);
    resumed.set_entropy(entropy);
    resumed.set_realtime_ns(std::chrono::duration_cast<std::chrono::nanoseconds>(
                                std::chrono::system_clock::now().time_since_epoch())
                                .count());
    auto r = agent.Sync(&agentapi::AgentClient::Resumed, resumed);
    ASSERT_TRUE(r.ok()) << r.error().ToString();
    ASSERT_TRUE(backend_->AttachDisk(name, {.path = layer, .unit = 0, .readonly = true}).ok());
    v1::CreateSandboxRequest sb;
    sb.set_sandbox_id(name);
    ASSERT_TRUE(agent.Sync(&agentapi::AgentClient::CreateSandbox, sb).ok());
    ASSERT_TRUE(agent.Create("u", agenttest::Spec({"cat", "/proc/sys/kernel/random/uuid"})).ok());
    ASSERT_TRUE(agent.Start("u").ok());
    ASSERT_TRUE(agent.Wait("u").ok());
    uuids.push_back(agent.ReadAll("u", "", false));
    close(c);
  }
  ASSERT_EQ(uuids.size(), 2u);
  EXPECT_EQ(uuids[0].size(), 37u) << uuids[0];
  EXPECT_NE(uuids[0], uuids[1]) << "two VMs from one template drew the same random numbers";

  // A stream QEMU cannot load (it exits): DATA_LOSS, the caller's cue to boot instead, and no
  // VM left. So is a state that is not the file that was checked.
  std::string junk = dir_ + "/junk.state";
  std::ofstream(junk) << std::string(1 << 16, '\x5a');
  auto bad = Spec("peapod-lvc3");
  bad.restore_from = junk;
  auto t_bad = std::chrono::steady_clock::now();
  auto r = backend_->Start(bad);
  ASSERT_FALSE(r.ok());
  std::printf("a stream QEMU cannot load failed the start in %.1f s: %s\n",
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t_bad).count(),
              r.error().ToString().c_str());
  EXPECT_EQ(r.error().code(), Code::kDataLoss) << r.error().ToString();
  auto listed = backend_->List();
  ASSERT_TRUE(listed.ok());
  std::vector<sandboxer::VmInfo> vms = *listed;
  for (const auto& vm : vms) {
    EXPECT_NE(vm.name, "peapod-lvc3") << "a VM that did not restore is left running";
  }
  bad.restore_from = state;
  bad.restore_identity = "0:0:0:0.000000000";
  r = backend_->Start(bad);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Code::kDataLoss) << r.error().ToString();
  EXPECT_NE(r.error().message().find("changed since it was checked"), std::string::npos);
}

TEST_F(LibvirtBackendTest, BadSpecsAreClearErrors) {
  auto missing = Spec("peapod-lv3");
  missing.kernel = dir_ + "/no-such-vmlinux";
  auto r = backend_->Start(missing);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message().find("no-such-vmlinux"), std::string::npos) << r.error().message();
  EXPECT_TRUE(backend_->List()->empty());
  VmSpec empty;
  EXPECT_EQ(backend_->Start(empty).error().code(), Code::kInvalidArgument);
}

}  // namespace
}  // namespace peapod::vmtest
