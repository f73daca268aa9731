// peapod-sandboxer driven over gRPC exactly as containerd 2.x's sandbox proxy plugin drives it:
// pods booted through libvirt's embedded driver, reached through the pod's agent socket (the
// mux), surviving a kill -9 of the sandboxer, noticed when QEMU dies, removed without a trace.
#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>

#include <future>

#include <nlohmann/json.hpp>

#include "containerd/services/sandbox/v1/sandbox.grpc.pb.h"
#include "tests/vm/vm_fixture.h"

namespace peapod::vmtest {
namespace {

namespace sbv1 = ::containerd::services::sandbox::v1;

class SandboxerTest : public AgentVmTest {
 protected:
  void SetUp() override {
    AgentVmTest::SetUp();
    if (IsSkipped()) return;
    if (::geteuid() != 0) GTEST_SKIP() << "the sandboxer needs root (libvirt, mounts)";
    const char* root = std::getenv("PEAPOD_TEST_LIBVIRT_ROOT");
    nlohmann::json cfg = {{"listen", dir_ + "/sandboxer.sock"},
                          {"state_dir", dir_ + "/state"},
                          {"run_dir", dir_ + "/run"},
                          {"libvirt_root", root && *root ? root : "/var/lib/peapod/test-libvirt"},
                          {"image_dir", ImageDir()},
                          {"accel", Accel() == "kvm" ? "kvm" : "tcg"},
                          {"log_level", "debug"}};
    std::ofstream(dir_ + "/sandboxer.json") << cfg.dump(2);
    StartSandboxer();
  }

  void TearDown() override {
    if (stub_) {
      for (const char* id : {"pod1", "pod2", "pod3"}) {
        grpc::ClientContext ctx;
        sbv1::ControllerShutdownRequest req;
        req.set_sandbox_id(id);
        sbv1::ControllerShutdownResponse resp;
        (void)stub_->Shutdown(&ctx, req, &resp);
      }
    }
    StopSandboxer(SIGTERM);
    if (HasFailure()) std::printf("sandboxer log:\n%s\n", Log().c_str());
    AgentVmTest::TearDown();
  }

  void StartSandboxer() {
    pid_ = ::fork();
    if (pid_ == 0) {
      ::prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive the test
      int fd = ::open((dir_ + "/sandboxer.log").c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
      ::dup2(fd, 1);
      ::dup2(fd, 2);
      ::execl(PEAPOD_SANDBOXER_BINARY, PEAPOD_SANDBOXER_BINARY, "--config",
              (dir_ + "/sandboxer.json").c_str(), nullptr);
      ::_exit(127);
    }
    auto channel = grpc::CreateChannel("unix://" + dir_ + "/sandboxer.sock",
                                       grpc::InsecureChannelCredentials());
    ASSERT_TRUE(channel->WaitForConnected(std::chrono::system_clock::now() + 120s))
        << "sandboxer did not serve; log:\n"
        << Log();
    stub_ = sbv1::Controller::NewStub(channel);
  }

  void StopSandboxer(int sig) {
    stub_.reset();
    if (pid_ > 0) {
      ::kill(pid_, sig);
      ::waitpid(pid_, nullptr, 0);
      pid_ = -1;
    }
  }

  std::string Log() {
    std::ifstream f(dir_ + "/sandboxer.log");
    return std::string(std::istreambuf_iterator<char>(f), {});
  }

  grpc::Status Create(const std::string& id, const std::string& netns = "") {
    grpc::ClientContext ctx;
    sbv1::ControllerCreateRequest req;
    req.set_sandbox_id(id);
    req.set_netns_path(netns);
    sbv1::ControllerCreateResponse resp;
    return stub_->Create(&ctx, req, &resp);
  }
  grpc::Status Start(const std::string& id, sbv1::ControllerStartResponse* resp) {
    grpc::ClientContext ctx;
    sbv1::ControllerStartRequest req;
    req.set_sandbox_id(id);
    return stub_->Start(&ctx, req, resp);
  }
  grpc::Status Status(const std::string& id, sbv1::ControllerStatusResponse* resp) {
    grpc::ClientContext ctx;
    sbv1::ControllerStatusRequest req;
    req.set_sandbox_id(id);
    return stub_->Status(&ctx, req, resp);
  }
  grpc::Status Stop(const std::string& id) {
    grpc::ClientContext ctx;
    sbv1::ControllerStopRequest req;
    req.set_sandbox_id(id);
    req.set_timeout_secs(5);
    sbv1::ControllerStopResponse resp;
    return stub_->Stop(&ctx, req, &resp);
  }
  grpc::Status Shutdown(const std::string& id) {
    grpc::ClientContext ctx;
    sbv1::ControllerShutdownRequest req;
    req.set_sandbox_id(id);
    sbv1::ControllerShutdownResponse resp;
    return stub_->Shutdown(&ctx, req, &resp);
  }
  // Starts a Wait call; the future has its status.
  std::future<grpc::Status> WaitAsync(const std::string& id) {
    std::shared_ptr<sbv1::Controller::Stub> stub = stub_;
    return std::async(std::launch::async, [stub, id] {
      grpc::ClientContext ctx;
      sbv1::ControllerWaitRequest req;
      req.set_sandbox_id(id);
      sbv1::ControllerWaitResponse resp;
      return stub->Wait(&ctx, req, &resp);
    });
  }
  // The agent answers through the pod's agent socket (the mux).
  bool AgentAnswers(const std::string& id, std::string* boot_id) {
    peapod::testing::LoopThread lt;
    v1::CheckResponse check;
    auto c = ConnectAndCheck(lt, dir_ + "/run/pods/" + id + "/agent.sock", &check, 30s);
    if (!c) return false;
    *boot_id = check.boot_id();
    lt.Sync([&] { c.reset(); });
    return true;
  }

  pid_t pid_ = -1;
  // Shared: a Wait in flight keeps its stub alive across a sandboxer restart.
  std::shared_ptr<sbv1::Controller::Stub> stub_;
};

TEST_F(SandboxerTest, PodLifecycleSurvivesASandboxerCrashAndLeavesNothing) {
  ASSERT_TRUE(Create("pod1").ok());
  auto again = Create("pod1");
  EXPECT_EQ(again.error_code(), grpc::StatusCode::ALREADY_EXISTS) << again.error_message();
  auto bad_netns = Create("podx", "/var/run/netns/does-not-exist");
  EXPECT_EQ(bad_netns.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_NE(bad_netns.error_message().find("does-not-exist"), std::string::npos);
  sbv1::ControllerStatusResponse st;
  EXPECT_EQ(Status("podx", &st).error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_FALSE(fs::exists(dir_ + "/run/pods/podx"));

  auto t0 = std::chrono::steady_clock::now();
  sbv1::ControllerStartResponse started;
  auto s = Start("pod1", &started);
  ASSERT_TRUE(s.ok()) << s.error_message() << "\nlog:\n" << Log();
  std::printf("Start (boot to agent ready) took %.2f s\n",
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  EXPECT_GT(started.pid(), 0u);
  EXPECT_FALSE(started.address().empty());
  EXPECT_EQ(started.version(), 2u);
  ASSERT_TRUE(Status("pod1", &st).ok());
  EXPECT_EQ(st.state(), "SANDBOX_READY");
  EXPECT_EQ(st.pid(), started.pid());
  EXPECT_EQ(::kill(static_cast<pid_t>(st.pid()), 0), 0) << "pid is not a live process";
  std::string boot1;
  ASSERT_TRUE(AgentAnswers("pod1", &boot1));

  // kill -9 of the sandboxer: the pod keeps running, and the next sandboxer re-adopts it.
  auto lost_wait = WaitAsync("pod1");
  StopSandboxer(SIGKILL);
  EXPECT_FALSE(lost_wait.get().ok());  // that connection died with the sandboxer
  StartSandboxer();
  ASSERT_TRUE(Status("pod1", &st).ok());
  EXPECT_EQ(st.state(), "SANDBOX_READY");
  EXPECT_EQ(st.pid(), started.pid());
  std::string boot2;
  ASSERT_TRUE(AgentAnswers("pod1", &boot2)) << Log();
  EXPECT_EQ(boot1, boot2) << "the same VM, not a new one";

  // SIGTERM with a Wait pending: the Wait is answered, the sandboxer exits, the pod stays.
  auto pending = WaitAsync("pod1");
  std::this_thread::sleep_for(300ms);
  StopSandboxer(SIGTERM);
  ASSERT_EQ(pending.wait_for(10s), std::future_status::ready);
  EXPECT_EQ(pending.get().error_code(), grpc::StatusCode::UNAVAILABLE);
  StartSandboxer();
  ASSERT_TRUE(Status("pod1", &st).ok());
  EXPECT_EQ(st.state(), "SANDBOX_READY");

  // Stop: Wait returns, the pod is not ready; Stop and Shutdown are idempotent.
  auto wait = WaitAsync("pod1");
  ASSERT_TRUE(Stop("pod1").ok());
  ASSERT_EQ(wait.wait_for(30s), std::future_status::ready);
  EXPECT_TRUE(wait.get().ok());
  ASSERT_TRUE(Status("pod1", &st).ok());
  EXPECT_EQ(st.state(), "SANDBOX_NOTREADY");
  EXPECT_TRUE(Stop("pod1").ok());
  EXPECT_TRUE(Shutdown("pod1").ok());
  EXPECT_TRUE(Shutdown("pod1").ok());
  EXPECT_EQ(Status("pod1", &st).error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_FALSE(fs::exists(dir_ + "/run/pods/pod1"));
  EXPECT_FALSE(fs::exists(dir_ + "/state/pods/pod1"));
  EXPECT_NE(::kill(static_cast<pid_t>(started.pid()), 0), 0) << "QEMU still running";
}

TEST_F(SandboxerTest, AKilledQemuMakesThePodNotReadyAndWaitReturns) {
  ASSERT_TRUE(Create("pod2").ok());
  sbv1::ControllerStartResponse started;
  auto s = Start("pod2", &started);
  ASSERT_TRUE(s.ok()) << s.error_message();
  auto wait = WaitAsync("pod2");
  std::this_thread::sleep_for(200ms);
  ASSERT_EQ(::kill(static_cast<pid_t>(started.pid()), SIGKILL), 0);
  ASSERT_EQ(wait.wait_for(2s), std::future_status::ready) << "Wait did not return within 2 s";
  EXPECT_TRUE(wait.get().ok());
  sbv1::ControllerStatusResponse st;
  ASSERT_TRUE(Status("pod2", &st).ok());
  EXPECT_EQ(st.state(), "SANDBOX_NOTREADY");
  EXPECT_TRUE(Shutdown("pod2").ok());
}

// A pod netns as CNI leaves it: a veth end named eth0 with an address and a default route.
class PodNetns {
 public:
  explicit PodNetns(const std::string& name) : name_(name) {
    Run("ip netns add " + name_);
    Run("ip link add " + name_ + "-h type veth peer name eth0 netns " + name_);
    Run("ip addr add 10.98.0.1/24 dev " + name_ + "-h");
    Run("ip link set " + name_ + "-h up");
    Run("ip -n " + name_ + " addr add 10.98.0.2/24 dev eth0");
    Run("ip -n " + name_ + " link set eth0 up");
    Run("ip -n " + name_ + " link set lo up");
    Run("ip -n " + name_ + " route add default via 10.98.0.1");
  }
  ~PodNetns() {
    Run("ip netns del " + name_ + " 2>/dev/null");
    Run("ip link del " + name_ + "-h 2>/dev/null");
  }
  std::string path() const { return "/var/run/netns/" + name_; }
  bool ok() const { return ok_; }

 private:
  void Run(const std::string& cmd) {
    if (std::system(cmd.c_str()) != 0 && cmd.find("2>/dev/null") == std::string::npos) {
      ok_ = false;
      ADD_FAILURE() << "test setup failed: " << cmd;
    }
  }
  std::string name_;
  bool ok_ = true;
};

TEST_F(SandboxerTest, TheGuestAnswersAsThePodOnTheCniNetwork) {
  if (std::system("command -v ip >/dev/null") != 0) GTEST_SKIP() << "iproute2 is not installed";
  PodNetns ns("pp-test-" + std::to_string(::getpid() % 100000));
  ASSERT_TRUE(ns.ok());
  ASSERT_TRUE(Create("pod3", ns.path()).ok());
  sbv1::ControllerStartResponse started;
  auto s = Start("pod3", &started);
  ASSERT_TRUE(s.ok()) << s.error_message() << "\nlog:\n" << Log();
  // From the host end of the veth: the pod IP answers, and it is the guest: tc redirects every
  // frame to the TAP, and to be sure the netns's own stack cannot answer, its copy of the
  // address is removed first (the guest took it at Start).
  std::string flush = "ip netns exec " + ns.path().substr(15) + " ip addr flush dev eth0";
  ASSERT_EQ(std::system(flush.c_str()), 0);
  int ping = std::system("ping -c 3 -W 5 -i 0.3 10.98.0.2 >/dev/null");
  if (ping != 0) {
    std::string ns_name = ns.path().substr(15);
    std::string diag = "ip netns exec " + ns_name +
                       " sh -c 'ip -s link; tc -s qdisc; for d in $(ls /sys/class/net); do tc -s "
                       "filter show dev $d ingress; done' 2>&1";
    std::system(diag.c_str());
    std::ifstream console(dir_ + "/state/pods/pod3/console.log");
    ADD_FAILURE() << "the guest did not answer ping through the TAP; console:\n"
                  << std::string(std::istreambuf_iterator<char>(console), {}) << "\nlog:\n"
                  << Log();
  }
  ASSERT_TRUE(Shutdown("pod3").ok());
  // The TAP is gone from both namespaces.
  std::string tap_check = "ip netns exec " + ns.path().substr(15) + " ip link | grep -q ' pp'";
  EXPECT_NE(std::system(tap_check.c_str()), 0) << "TAP left in the pod netns";
  EXPECT_NE(std::system("ip link | grep -q ' pp[0-9a-f]\\{12\\}'"), 0) << "TAP left on host";
}

TEST_F(SandboxerTest, UnknownSandboxesAreClearErrors) {
  sbv1::ControllerStartResponse started;
  auto s = Start("nosuch", &started);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_NE(s.error_message().find("nosuch"), std::string::npos);
  auto w = WaitAsync("nosuch");
  EXPECT_EQ(w.get().error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_EQ(Create("../bad").error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(Stop("nosuch").ok());
  EXPECT_TRUE(Shutdown("nosuch").ok());
}

}  // namespace
}  // namespace peapod::vmtest
