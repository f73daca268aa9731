// The sandboxer fixture of the libvirt tests: peapod-sandboxer started as its own process with a
// config under the test's directory, driven over gRPC as containerd 2.x's sandbox proxy plugin
// drives it. Shared by tests/vm/sandboxer_test.cc and the hostile group (tests/hostile/).
#pragma once

#include <fcntl.h>
#include <grpcpp/grpcpp.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>

#include <future>
#include <sstream>

#include <nlohmann/json.hpp>

#include "containerd/services/sandbox/v1/sandbox.grpc.pb.h"
#include "peapod/sandboxer/v1/sandboxer.pb.h"
#include "sandboxer/storage.h"
#include "tests/common/agent_client.h"
#include "tests/vm/vm_fixture.h"

namespace peapod::vmtest {

namespace sbv1 = ::containerd::services::sandbox::v1;
namespace pb = ::peapod::sandboxer::v1;

class SandboxerTest : public AgentVmTest {
 protected:
  void SetUp() override {
    AgentVmTest::SetUp();
    if (IsSkipped()) return;
    if (::geteuid() != 0) GTEST_SKIP() << "the sandboxer needs root (libvirt, mounts)";
    const char* root = std::getenv("PEAPOD_TEST_LIBVIRT_ROOT");
    // Short: pod sockets under it must fit a unix socket path.
    run_dir_ = "/run/ppt-" + std::to_string(::getpid());
    nlohmann::json cfg = {{"listen", dir_ + "/sandboxer.sock"},
                          {"shim_listen", dir_ + "/shim.sock"},
                          {"layer_cache_keep_seconds", 0},  // images go with their last user
                          {"state_dir", dir_ + "/state"},
                          {"run_dir", run_dir_},
                          {"libvirt_root", root && *root ? root : "/var/lib/peapod/test-libvirt"},
                          {"image_dir", ImageDir()},
                          {"accel", Accel() == "kvm" ? "kvm" : "tcg"},
                          // Each test's state dir is new: a template would be built (a boot
                          // and a save) in every test. The template tests turn it on.
                          {"start_from", "boot"},
                          {"log_level", "debug"}};
    cfg_ = cfg;
    std::ofstream(dir_ + "/sandboxer.json") << cfg.dump(2);
    StartSandboxer();
  }

  // Restarts the sandboxer with one config key changed.
  void RestartWith(const std::string& key, const nlohmann::json& value) {
    StopSandboxer(SIGTERM);
    cfg_[key] = value;
    std::ofstream(dir_ + "/sandboxer.json", std::ios::trunc) << cfg_.dump(2);
    StartSandboxer();
  }

  void TearDown() override {
    // PEAPOD_TEST_CONSOLES=<dir>: the guests' console logs (the agent's own log) are copied
    // there, as <pod>.log, before the pods go.
    if (const char* to = std::getenv("PEAPOD_TEST_CONSOLES")) {
      std::error_code ec;
      fs::create_directories(to, ec);
      for (const auto& e : fs::recursive_directory_iterator(dir_, ec)) {
        if (e.path().filename() != "console.log") continue;
        fs::copy_file(e.path(),
                      fs::path(to) / (e.path().parent_path().filename().string() + ".log"),
                      fs::copy_options::overwrite_existing, ec);
      }
    }
    if (stub_) {
      for (const char* id : {"pod1", "pod2", "pod3", "pod4", "pod5", "pod6"}) {
        grpc::ClientContext ctx;
        sbv1::ControllerShutdownRequest req;
        req.set_sandbox_id(id);
        sbv1::ControllerShutdownResponse resp;
        (void)stub_->Shutdown(&ctx, req, &resp);
      }
    }
    StopSandboxer(SIGTERM);
    if (HasFailure()) std::printf("sandboxer log:\n%s\n", Log().c_str());
    if (!run_dir_.empty()) (void)sandboxer::RemoveTreeSafely(run_dir_);
    AgentVmTest::TearDown();
  }

  // out holds /proc/net/if_inet6 lines: exactly one link-local address, the EUI-64 one of mac.
  static void ExpectOneLinkLocalOf(const std::string& mac, const std::string& out) {
    unsigned m[6] = {};
    ASSERT_EQ(
        std::sscanf(mac.c_str(), "%x:%x:%x:%x:%x:%x", &m[0], &m[1], &m[2], &m[3], &m[4], &m[5]), 6)
        << mac;
    char eui64[40];
    std::snprintf(eui64, sizeof(eui64), "fe80000000000000%02x%02x%02xfffe%02x%02x%02x", m[0] ^ 2u,
                  m[1], m[2], m[3], m[4], m[5]);
    auto first = out.find("fe80");
    ASSERT_NE(first, std::string::npos) << "no link-local address: " << out;
    EXPECT_EQ(out.substr(first, 32), eui64) << out;
    EXPECT_EQ(out.find("fe80", first + 1), std::string::npos) << "two link-locals: " << out;
  }

  // The pod's agent changed its NIC's MAC with the link up (its console log says so).
  void ExpectMacChangedLive(const std::string& pod) {
    std::ifstream console(dir_ + "/state/pods/" + pod + "/console.log");
    std::string agent_log((std::istreambuf_iterator<char>(console)), {});
    EXPECT_NE(agent_log.find("its MAC changed live"), std::string::npos) << agent_log;
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

  grpc::Status Create(const std::string& id, const std::string& netns = "",
                      const google::protobuf::Any* options = nullptr) {
    grpc::ClientContext ctx;
    sbv1::ControllerCreateRequest req;
    req.set_sandbox_id(id);
    req.set_netns_path(netns);
    if (options) *req.mutable_options() = *options;
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
    auto c = ConnectAndCheck(lt, run_dir_ + "/pods/" + id + "/agent.sock", &check, 30s);
    if (!c) return false;
    *boot_id = check.boot_id();
    lt.Sync([&] { c.reset(); });
    return true;
  }

  // Waits (up to two minutes) until the sandboxer's log has `what` at least n times.
  bool LogShows(const std::string& what, size_t n = 1) {
    for (int i = 0; i < 600; ++i) {
      std::string log = Log();
      size_t count = 0;
      for (size_t p = 0; (p = log.find(what, p)) != std::string::npos; ++p) ++count;
      if (count >= n) return true;
      std::this_thread::sleep_for(200ms);
    }
    return false;
  }

  // Runs args in a new container of a running pod (busybox rootfs from layer_dir, attached as
  // a shim does) and returns its stdout once it exited 0.
  Result<std::string> RunInPod(const std::string& pod, const std::string& container,
                               const std::string& layer_dir, const std::vector<std::string>& args) {
    peapod::testing::LoopThread lt;
    PP_ASSIGN_OR_RETURN(auto fd, ConnectUnix(dir_ + "/shim.sock"));
    auto shim = lt.Sync([&] { return *ttrpc::Client::Create(lt.loop(), std::move(fd)); });
    pb::AttachRootfsRequest attach;
    attach.set_pod_id(pod);
    attach.set_container_id(container);
    auto* m = attach.add_mounts();
    m->set_type("bind");
    m->set_source(layer_dir);
    m->add_options("ro");
    m->add_options("rbind");
    ttrpc::CallOptions opts;
    opts.timeout = 120s;
    auto rootfs = shim->CallSyncTyped<pb::AttachRootfsResponse>("peapod.sandboxer.v1.Sandboxer",
                                                                "AttachRootfs", attach, opts);
    if (!rootfs.ok()) return rootfs.error();
    v1::CheckResponse check;
    auto conn = ConnectAndCheck(lt, run_dir_ + "/pods/" + pod + "/agent.sock", &check, 30s);
    if (!conn) return Error::Internal("pod {}: the agent does not answer", pod);
    Result<std::string> out = [&]() -> Result<std::string> {
      agenttest::AgentClient agent(conn, {});
      v1::CreateContainerRequest req;
      req.set_container_id(container);
      req.set_oci_spec(agenttest::Spec(args));
      *req.mutable_layers() = rootfs->layers();
      req.set_upper_dir(rootfs->upper_dir());
      PP_TRY(agent.Create(req));
      PP_TRY(agent.Start(container));
      std::string text = agent.ReadAll(container);
      PP_ASSIGN_OR_RETURN(uint32_t code, agent.Wait(container));
      (void)agent.Remove(container);
      if (code != 0) return Error::Internal("{} exited {}: {}", args[0], code, text);
      return text;
    }();
    lt.Sync([&] {
      conn.reset();
      shim.reset();
    });
    return out;
  }

  nlohmann::json cfg_;
  std::string run_dir_;
  pid_t pid_ = -1;
  // Shared: a Wait in flight keeps its stub alive across a sandboxer restart.
  std::shared_ptr<sbv1::Controller::Stub> stub_;
};

// What is mounted at or below dir on the host.
inline std::vector<std::string> MountsUnder(const std::string& dir) {
  std::vector<std::string> out;
  std::ifstream mi("/proc/self/mountinfo");
  for (std::string line; std::getline(mi, line);) {
    std::istringstream in(line);
    std::string a, b, c, d, point;
    in >> a >> b >> c >> d >> point;
    if (point.rfind(dir, 0) == 0) out.push_back(point);
  }
  return out;
}

inline size_t CountFiles(const std::string& dir, const std::string& ext) {
  size_t n = 0;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) n += e.path().extension() == ext;
  return n;
}

}  // namespace peapod::vmtest
