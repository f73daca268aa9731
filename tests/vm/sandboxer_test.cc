// peapod-sandboxer driven over gRPC exactly as containerd 2.x's sandbox proxy plugin drives it:
// pods booted through libvirt's embedded driver, reached through the pod's agent socket (the
// mux), surviving a kill -9 of the sandboxer, noticed when QEMU dies, removed without a trace.
#include <arpa/inet.h>
#include <fcntl.h>
#include <grpcpp/grpcpp.h>
#include <netinet/in.h>
#include <sched.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>

#include <future>
#include <thread>

#include <nlohmann/json.hpp>

#include "common/base/mountinfo.h"
#include "containerd/cgroups/v2/metrics.pb.h"
#include "containerd/services/sandbox/v1/sandbox.grpc.pb.h"
#include "k8s/cri/v1/pod_sandbox_config.pb.h"
#include "peapod/sandboxer/v1/sandboxer.pb.h"
#include "sandboxer/network.h"
#include "sandboxer/storage.h"
#include "tests/common/agent_client.h"
#include "tests/vm/sandboxer_fixture.h"
#include "tests/vm/vm_fixture.h"

namespace peapod::vmtest {
namespace {

TEST_F(SandboxerTest, PodLifecycleSurvivesASandboxerCrashAndLeavesNothing) {
  ASSERT_TRUE(Create("pod1").ok());
  auto again = Create("pod1");
  EXPECT_EQ(again.error_code(), grpc::StatusCode::ALREADY_EXISTS) << again.error_message();
  auto bad_netns = Create("podx", "/var/run/netns/does-not-exist");
  EXPECT_EQ(bad_netns.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_NE(bad_netns.error_message().find("does-not-exist"), std::string::npos);
  sbv1::ControllerStatusResponse st;
  EXPECT_EQ(Status("podx", &st).error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_FALSE(fs::exists(run_dir_ + "/pods/podx"));

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
  EXPECT_FALSE(fs::exists(run_dir_ + "/pods/pod1"));
  EXPECT_FALSE(fs::exists(dir_ + "/state/pods/pod1"));
  EXPECT_NE(::kill(static_cast<pid_t>(started.pid()), 0), 0) << "QEMU still running";
}

TEST_F(SandboxerTest, AKilledQemuMakesThePodNotReadyAndWaitReturns) {
  ASSERT_TRUE(Create("pod2").ok());
  sbv1::ControllerStartResponse started;
  auto s = Start("pod2", &started);
  ASSERT_TRUE(s.ok()) << s.error_message();
  // More Waits than the 256 threads the sandboxer's gRPC server once had: none holds a
  // thread, and other calls are answered meanwhile.
  std::vector<std::future<grpc::Status>> waits;
  for (int i = 0; i < 300; ++i) waits.push_back(WaitAsync("pod2"));
  std::this_thread::sleep_for(2s);
  sbv1::ControllerStatusResponse during;
  auto t0 = std::chrono::steady_clock::now();
  ASSERT_TRUE(Status("pod2", &during).ok());
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 2s) << "Status waited behind the Waits";
  EXPECT_EQ(during.state(), "SANDBOX_READY");
  size_t threads = 0;
  for ([[maybe_unused]] const auto& t :
       fs::directory_iterator("/proc/" + std::to_string(pid_) + "/task")) {
    ++threads;
  }
  EXPECT_LT(threads, 100u) << "a thread per waiting call";
  ASSERT_EQ(::kill(static_cast<pid_t>(started.pid()), SIGKILL), 0);
  for (auto& wait : waits) {
    ASSERT_EQ(wait.wait_for(5s), std::future_status::ready) << "a Wait did not return";
    EXPECT_TRUE(wait.get().ok());
  }
  sbv1::ControllerStatusResponse st;
  ASSERT_TRUE(Status("pod2", &st).ok());
  EXPECT_EQ(st.state(), "SANDBOX_NOTREADY");
  EXPECT_TRUE(Shutdown("pod2").ok());
}

// A command's stdout, without the final newline.
std::string Capture(const std::string& cmd) {
  std::string out;
  FILE* p = ::popen(cmd.c_str(), "r");
  if (!p) return out;
  char buf[512];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) out.append(buf, n);
  ::pclose(p);
  while (!out.empty() && out.back() == '\n') out.pop_back();
  return out;
}

// Whether a TCP connection to 127.0.0.1:port made inside the netns at path is accepted: what
// containerd's PortForward does first.
bool LoopbackAccepts(const std::string& path, uint16_t port) {
  bool accepted = false;
  std::thread t([&] {
    int ns = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (ns < 0 || ::setns(ns, CLONE_NEWNET) < 0) return;
    ::close(ns);
    int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    accepted = ::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0;
    ::close(fd);
  });
  t.join();
  return accepted;
}

// A pod netns as CNI leaves it: a veth end named eth0 with an address and a default route.
class PodNetns {
 public:
  // The veth pair's /24 is <prefix16>.N with N from the pid, 100..249: distinct per test (each
  // passes its own prefix16) so that tests running at once do not route each other's pings, and
  // off the x.x.0.0/24 networks of CNI bridges other suites set up (or left behind: CI saw one
  // take the host's route to the pod).
  PodNetns(const std::string& name, const std::string& prefix16)
      : name_(name), net_(prefix16 + "." + std::to_string(100 + ::getpid() % 150)) {
    Run("ip netns add " + name_);
    Run("ip link add " + name_ + "-h type veth peer name eth0 netns " + name_);
    Run("ip addr add " + net_ + ".1/24 dev " + name_ + "-h");
    Run("ip link set " + name_ + "-h up");
    Run("ip -n " + name_ + " addr add " + net_ + ".2/24 dev eth0");
    Run("ip -n " + name_ + " link set eth0 up");
    Run("ip -n " + name_ + " link set lo up");
    Run("ip -n " + name_ + " route add default via " + net_ + ".1");
  }
  ~PodNetns() {
    Run("ip netns del " + name_ + " 2>/dev/null");
    Run("ip link del " + name_ + "-h 2>/dev/null");
  }
  std::string path() const { return "/var/run/netns/" + name_; }
  // The pod's address (the netns end of the veth).
  std::string pod_ip() const { return net_ + ".2"; }
  bool ok() const { return ok_; }

 private:
  void Run(const std::string& cmd) {
    if (std::system(cmd.c_str()) != 0 && cmd.find("2>/dev/null") == std::string::npos) {
      ok_ = false;
      ADD_FAILURE() << "test setup failed: " << cmd;
    }
  }
  std::string name_;
  std::string net_;
  bool ok_ = true;
};

TEST_F(SandboxerTest, TheGuestAnswersAsThePodOnTheCniNetwork) {
  if (std::system("command -v ip >/dev/null") != 0) GTEST_SKIP() << "iproute2 is not installed";
  PodNetns ns("pp-test-" + std::to_string(::getpid() % 100000), "10.98");
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
  std::string ping_cmd = "ping -c 3 -W 5 -i 0.3 " + ns.pod_ip() + " >/dev/null";
  int ping = std::system(ping_cmd.c_str());
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
  // CRI PortForward's listener: containerd's dial of 127.0.0.1:<port> in the pod netns is
  // accepted (and relayed into the guest, see tests/sandboxer/port_forward_test.cc), also once a
  // restarted sandboxer has re-adopted the pod.
  EXPECT_TRUE(LoopbackAccepts(ns.path(), 8080)) << Log();
  StopSandboxer(SIGKILL);
  EXPECT_FALSE(LoopbackAccepts(ns.path(), 8080)) << "the listener outlived its sandboxer";
  StartSandboxer();
  EXPECT_TRUE(LoopbackAccepts(ns.path(), 8080)) << Log();
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

  // A missing kernel image: Start says which file and which setting, and the pod stays as it
  // was (created, not ready, no VM), ready for a Start once the file is there.
  RestartWith("kernel", dir_ + "/no-such-vmlinux");
  ASSERT_TRUE(Create("pod1").ok());
  s = Start("pod1", &started);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.error_message().find("no-such-vmlinux"), std::string::npos) << s.error_message();
  EXPECT_NE(s.error_message().find("kernel"), std::string::npos) << s.error_message();
  sbv1::ControllerStatusResponse st;
  ASSERT_TRUE(Status("pod1", &st).ok());
  EXPECT_EQ(st.state(), "SANDBOX_NOTREADY");
  EXPECT_EQ(st.pid(), 0u);
  EXPECT_FALSE(fs::exists(dir_ + "/state/pods/pod1/scratch.img")) << "half-made pod left";
  EXPECT_FALSE(fs::exists(dir_ + "/state/vm/peapod-pod1")) << "half-made pod left its VM files";
  EXPECT_FALSE(fs::exists(run_dir_ + "/vm/peapod-pod1")) << "half-made pod left its VM files";
  EXPECT_TRUE(Shutdown("pod1").ok());
  EXPECT_FALSE(fs::exists(dir_ + "/state/pods/pod1"));
  EXPECT_FALSE(fs::exists(run_dir_ + "/pods/pod1"));
}

// The shim's view: rootfs from containerd's overlayfs-snapshotter mounts, turned into cached
// EROFS layer disks; a volume through the pod share; containers on the scratch disk.
TEST_F(SandboxerTest, ContainersGetTheirRootfsFromCachedLayerDisks) {
  if (std::system("command -v mkfs.erofs >/dev/null") != 0) {
    GTEST_SKIP() << "mkfs.erofs is not installed (erofs-utils)";
  }
  // Two layers as the overlayfs snapshotter keeps them: snapshots/<n>/fs.
  std::string snaps = dir_ + "/snapshots";
  ASSERT_EQ(agenttest::BuildBusyboxRoot(snaps + "/1/fs"), "");
  fs::create_directories(snaps + "/2/fs/etc");
  std::ofstream(snaps + "/2/fs/etc/layer-top") << "top layer\n";
  fs::create_directories(snaps + "/3/fs");
  fs::create_directories(snaps + "/3/work");
  google::protobuf::RepeatedPtrField<containerd::types::Mount> mounts;
  auto* m = mounts.Add();
  m->set_type("overlay");
  m->set_source("overlay");
  m->add_options("index=off");
  m->add_options("workdir=" + snaps + "/3/work");
  m->add_options("upperdir=" + snaps + "/3/fs");
  m->add_options("lowerdir=" + snaps + "/2/fs:" + snaps + "/1/fs");
  std::string volume = dir_ + "/volume";
  fs::create_directories(volume);

  // As containerd's CRI sends it: the VM is sized from the pod's limits plus overhead.
  peapod::cri::v1::PodSandboxConfig cri;
  cri.set_hostname("web-0");
  cri.mutable_dns_config()->add_servers("10.96.0.10");
  cri.mutable_linux()->mutable_resources()->set_memory_limit_in_bytes(256ll << 20);
  google::protobuf::Any options;
  options.set_type_url("type.googleapis.com/runtime.v1.PodSandboxConfig");
  options.set_value(cri.SerializeAsString());
  ASSERT_TRUE(Create("pod4", "", &options).ok());
  std::ifstream resolv(run_dir_ + "/pods/pod4/share/resolv.conf");
  EXPECT_EQ(std::string(std::istreambuf_iterator<char>(resolv), {}), "nameserver 10.96.0.10\n");
  sbv1::ControllerStartResponse started;
  auto s = Start("pod4", &started);
  ASSERT_TRUE(s.ok()) << s.error_message() << "\nlog:\n" << Log();

  peapod::testing::LoopThread lt;
  auto fd = ConnectUnix(dir_ + "/shim.sock");
  ASSERT_TRUE(fd.ok()) << fd.error().ToString();
  auto shim = lt.Sync([&] { return *ttrpc::Client::Create(lt.loop(), std::move(*fd)); });
  auto call = [&]<typename Resp>(const std::string& method, const google::protobuf::Message& req) {
    ttrpc::CallOptions opts;
    opts.timeout = 120s;
    return shim->CallSyncTyped<Resp>("peapod.sandboxer.v1.Sandboxer", method, req, opts);
  };
  auto attach = [&](const std::string& container) {
    pb::AttachRootfsRequest req;
    req.set_pod_id("pod4");
    req.set_container_id(container);
    *req.mutable_mounts() = mounts;
    return call.operator()<pb::AttachRootfsResponse>("AttachRootfs", req);
  };

  auto a1 = attach("c1");
  ASSERT_TRUE(a1.ok()) << a1.error().ToString() << "\nlog:\n" << Log();
  ASSERT_EQ(a1->layers_size(), 2);
  EXPECT_EQ(a1->upper_dir(), "/run/peapod/scratch/c1");
  EXPECT_EQ(CountFiles(dir_ + "/state/layers", ".erofs"), 2u);
  auto a2 = attach("c2");
  ASSERT_TRUE(a2.ok()) << a2.error().ToString();
  // The second container reuses both cached images and the disks already attached.
  EXPECT_EQ(CountFiles(dir_ + "/state/layers", ".erofs"), 2u);
  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ(a2->layers(i).source(), a1->layers(i).source());
    EXPECT_EQ(a2->layers(i).mount_point(), a1->layers(i).mount_point());
  }
  std::string log = Log();
  size_t builds = 0;
  for (size_t p = 0; (p = log.find("layers: building", p)) != std::string::npos; ++p) ++builds;
  EXPECT_EQ(builds, 2u) << "each layer is built once";
  auto again = attach("c1");  // idempotent
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->layers(0).source(), a1->layers(0).source());

  pb::ShareVolumesRequest share;
  share.set_pod_id("pod4");
  share.set_container_id("c1");
  share.add_volumes()->set_host_path(volume);
  auto shared = call.operator()<pb::ShareVolumesResponse>("ShareVolumes", share);
  ASSERT_TRUE(shared.ok()) << shared.error().ToString();
  ASSERT_EQ(shared->guest_paths_size(), 1);

  // Containers, through the pod's agent socket as the shim will run them.
  v1::CheckResponse check;
  auto agent_conn = ConnectAndCheck(lt, run_dir_ + "/pods/pod4/agent.sock", &check, 30s);
  ASSERT_TRUE(agent_conn);
  agenttest::AgentClient agent(agent_conn, {});
  auto run = [&](const std::string& id, const Result<pb::AttachRootfsResponse>& rootfs,
                 const std::string& script, bool with_volume) -> std::string {
    auto spec = nlohmann::json::parse(agenttest::Spec({"sh", "-c", script}));
    if (with_volume) {
      spec["mounts"].push_back({{"destination", "/data"},
                                {"type", "bind"},
                                {"source", shared->guest_paths(0)},
                                {"options", {"rbind", "rw"}}});
    }
    v1::CreateContainerRequest req;
    req.set_container_id(id);
    req.set_oci_spec(spec.dump());
    *req.mutable_layers() = rootfs->layers();
    req.set_upper_dir(rootfs->upper_dir());
    auto pid = agent.Create(req);
    if (!pid.ok()) {
      ADD_FAILURE() << "create " << id << ": " << pid.error().ToString();
      return "";
    }
    EXPECT_TRUE(agent.Start(id).ok());
    std::string out = agent.ReadAll(id);
    auto status = agent.Wait(id);
    EXPECT_TRUE(status.ok() && *status == 0u) << out << agent.ReadAll(id, "", true);
    EXPECT_TRUE(agent.Remove(id).ok());
    return out;
  };
  EXPECT_EQ(run("c1", a1,
                "cat /etc/layer-top; echo written > /written; cat /written; echo hi > /data/f; "
                "hostname",
                true),
            "top layer\nwritten\nweb-0\n");
  // 256 MiB of limits + 128 MiB overhead (the default): a 384 MiB VM, not the 512 MiB default.
  std::string mem = run("c1b", a1, "head -1 /proc/meminfo", false);
  long kb = 0;
  std::sscanf(mem.c_str(), "MemTotal: %ld", &kb);
  EXPECT_GT(kb, 300 * 1024) << mem;
  EXPECT_LT(kb, 384 * 1024) << mem;
  EXPECT_EQ(run("c2", a2, "cat /written 2>/dev/null || echo clean; ls /bin/busybox", false),
            "clean\n/bin/busybox\n");
  std::ifstream from_guest(volume + "/f");
  std::string line;
  std::getline(from_guest, line);
  EXPECT_EQ(line, "hi") << "the volume write did not reach the host";

  // Pod metrics: the guest's cgroup statistics for all containers.
  {
    grpc::ClientContext ctx;
    sbv1::ControllerMetricsRequest req;
    req.set_sandbox_id("pod4");
    sbv1::ControllerMetricsResponse resp;
    auto st = stub_->Metrics(&ctx, req, &resp);
    ASSERT_TRUE(st.ok()) << st.error_message();
    EXPECT_EQ(resp.metrics().id(), "pod4");
    EXPECT_EQ(resp.metrics().data().type_url(),
              "type.googleapis.com/io.containerd.cgroups.v2.Metrics");
    io::containerd::cgroups::v2::Metrics metrics;
    ASSERT_TRUE(metrics.ParseFromString(resp.metrics().data().value()));
    EXPECT_GT(metrics.cpu().usage_usec(), 0u) << metrics.DebugString();
  }

  // Release: volumes unbound; the layer disks no container uses stay attached while the pod
  // runs (the kIdleLayerDisks used last), for the next container of those images.
  for (const char* c : {"c1", "c2"}) {
    pb::ReleaseContainerRequest rel;
    rel.set_pod_id("pod4");
    rel.set_container_id(c);
    auto r = call.operator()<google::protobuf::Empty>("ReleaseContainer", rel);
    EXPECT_TRUE(r.ok()) << r.error().ToString();
  }
  // Only the pod's read-only share itself stays mounted while the pod lives.
  auto left = peapod::MountsUnder(run_dir_ + "/pods", /*below_only=*/true);
  ASSERT_EQ(left.size(), 1u);
  EXPECT_EQ(left[0].path, run_dir_ + "/pods/pod4/share");
  EXPECT_TRUE(left[0].readonly);
  auto record = nlohmann::json::parse(std::ifstream(dir_ + "/state/pods/pod4/pod.json"));
  EXPECT_TRUE(record["rootfs"].empty()) << record.dump();
  const auto idle_disks = record["disks"];
  EXPECT_FALSE(idle_disks.empty()) << record.dump();
  EXPECT_LE(idle_disks.size(), 4u) << record.dump();  // kIdleLayerDisks
  EXPECT_TRUE(std::ifstream(volume + "/f").good()) << "releasing must not delete volume data";

  // Bad input: a clear error and nothing left behind.
  pb::AttachRootfsRequest bad;
  bad.set_pod_id("pod4");
  bad.set_container_id("c3");
  auto* bm = bad.add_mounts();
  bm->set_type("overlay");
  std::ofstream(dir_ + "/not-a-dir") << "x";
  bm->add_options("lowerdir=" + dir_ + "/not-a-dir");
  auto rejected = call.operator()<pb::AttachRootfsResponse>("AttachRootfs", bad);
  ASSERT_FALSE(rejected.ok());
  EXPECT_EQ(rejected.error().code(), Code::kInvalidArgument) << rejected.error().ToString();
  EXPECT_NE(rejected.error().message().find("mkfs.erofs rejected"), std::string::npos)
      << rejected.error().ToString();
  bm->set_type("zfs");
  auto unsupported = call.operator()<pb::AttachRootfsResponse>("AttachRootfs", bad);
  EXPECT_EQ(unsupported.error().code(), Code::kInvalidArgument);
  bad.set_pod_id("nosuch");
  EXPECT_EQ(call.operator()<pb::AttachRootfsResponse>("AttachRootfs", bad).error().code(),
            Code::kNotFound);
  record = nlohmann::json::parse(std::ifstream(dir_ + "/state/pods/pod4/pod.json"));
  EXPECT_EQ(record["disks"], idle_disks) << record.dump();
  EXPECT_TRUE(record["rootfs"].empty()) << record.dump();
  // The cache keeps the images of the idle disks and nothing else (keep 0 s): no temp files.
  size_t images = 0;
  for (const auto& e : fs::directory_iterator(dir_ + "/state/layers")) {
    ++images;
    EXPECT_EQ(e.path().extension(), ".erofs") << e.path();
  }
  EXPECT_LE(images, idle_disks.size());

  // PrepareContainer: the pod, rootfs and volumes in one round trip, as the shim asks; a volume
  // that cannot be shared leaves the container nothing attached.
  pb::PrepareContainerRequest prep;
  prep.set_pod_id("pod4");
  prep.set_container_id("c5");
  *prep.mutable_mounts() = mounts;
  prep.add_volumes()->set_host_path(volume);
  auto prepared = call.operator()<pb::PrepareContainerResponse>("PrepareContainer", prep);
  ASSERT_TRUE(prepared.ok()) << prepared.error().ToString();
  EXPECT_TRUE(prepared->pod().ready());
  EXPECT_EQ(prepared->pod().agent_address(), run_dir_ + "/pods/pod4/agent.sock");
  EXPECT_EQ(prepared->rootfs().layers_size(), 2);
  EXPECT_EQ(prepared->volumes().guest_paths_size(), 1);
  pb::ReleaseContainerRequest rel5;
  rel5.set_pod_id("pod4");
  rel5.set_container_id("c5");
  EXPECT_TRUE(call.operator()<google::protobuf::Empty>("ReleaseContainer", rel5).ok());
  const auto disks_before_c6 =
      nlohmann::json::parse(std::ifstream(dir_ + "/state/pods/pod4/pod.json"))["disks"];
  prep.set_container_id("c6");
  prep.mutable_volumes(0)->set_host_path(dir_ + "/no-such-volume");
  auto unshared = call.operator()<pb::PrepareContainerResponse>("PrepareContainer", prep);
  EXPECT_FALSE(unshared.ok());
  record = nlohmann::json::parse(std::ifstream(dir_ + "/state/pods/pod4/pod.json"));
  EXPECT_TRUE(record["disks"] == disks_before_c6 && record["rootfs"].empty())
      << "a failed prepare left: " << record.dump();
  prep.set_pod_id("nosuch");
  EXPECT_EQ(call.operator()<pb::PrepareContainerResponse>("PrepareContainer", prep).error().code(),
            Code::kNotFound);

  // A pod removed with a container still attached leaves no disk image, mount or process.
  ASSERT_TRUE(attach("c4").ok());
  ASSERT_TRUE(call.operator()<pb::ShareVolumesResponse>("ShareVolumes", share).ok());
  lt.Sync([&] {
    shim.reset();
    agent_conn.reset();
  });
  auto wait = WaitAsync("pod4");
  ASSERT_TRUE(Stop("pod4").ok());
  ASSERT_EQ(wait.wait_for(30s), std::future_status::ready);
  ASSERT_TRUE(Shutdown("pod4").ok());
  EXPECT_TRUE(MountsUnder(dir_).empty()) << "mounts left: " << MountsUnder(dir_).size();
  EXPECT_TRUE(MountsUnder(run_dir_ + "/pods/").empty())
      << "mounts left: " << MountsUnder(run_dir_ + "/pods/").size();
  EXPECT_TRUE(fs::is_empty(dir_ + "/state/layers")) << "layer images left";
  EXPECT_FALSE(fs::exists(dir_ + "/state/pods/pod4"));
  EXPECT_FALSE(fs::exists(run_dir_ + "/pods/pod4"));
  EXPECT_TRUE(std::ifstream(volume + "/f").good()) << "shutdown must not delete volume data";
  EXPECT_NE(::kill(static_cast<pid_t>(started.pid()), 0), 0) << "QEMU still running";
}

// The warm pool: with pool_size 1, a pod starts on a pre-booted VM that then takes the pod's
// identity (its CNI IP and MAC, hostname, storage); the next pod gets another VM, never that one.
TEST_F(SandboxerTest, APodStartsOnAPooledVmAndTakesItsIdentity) {
  if (std::system("command -v ip >/dev/null") != 0) GTEST_SKIP() << "iproute2 is not installed";
  RestartWith("pool_size", 1);
  auto pool_ready = [&](size_t n) {
    for (int i = 0; i < 600; ++i) {
      std::string log = Log();
      size_t count = 0;
      for (size_t p = 0; (p = log.find("pool: pool-", p)) != std::string::npos; ++p) {
        size_t eol = log.find('\n', p);
        count += log.substr(p, eol - p).find(" ready (QEMU pid") != std::string::npos;
      }
      if (count >= n) return true;
      std::this_thread::sleep_for(200ms);
    }
    return false;
  };
  ASSERT_TRUE(pool_ready(1)) << Log();

  PodNetns ns("pp-pool-" + std::to_string(::getpid() % 100000), "10.97");
  ASSERT_TRUE(ns.ok());
  peapod::cri::v1::PodSandboxConfig cri;
  cri.set_hostname("warm-0");
  google::protobuf::Any options;
  options.set_type_url("type.googleapis.com/runtime.v1.PodSandboxConfig");
  options.set_value(cri.SerializeAsString());
  ASSERT_TRUE(Create("pod5", ns.path(), &options).ok());
  auto t0 = std::chrono::steady_clock::now();
  sbv1::ControllerStartResponse started;
  auto s = Start("pod5", &started);
  ASSERT_TRUE(s.ok()) << s.error_message() << "\nlog:\n" << Log();
  std::printf("Start from the pool took %.2f s\n",
              std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  EXPECT_NE(Log().find("pod pod5: adopting pool VM pool-"), std::string::npos) << Log();

  // A container in it sees the pod's hostname, IP and MAC (the CNI interface's).
  std::string layer = dir_ + "/busybox";
  ASSERT_EQ(agenttest::BuildBusyboxRoot(layer), "");
  std::string boot5;
  ASSERT_TRUE(AgentAnswers("pod5", &boot5));
  auto out =
      RunInPod("pod5", "c1", layer,
               {"sh", "-c", "hostname; ip -4 -o addr show eth0; cat /sys/class/net/eth0/address"});
  ASSERT_TRUE(out.ok()) << out.error().ToString() << "\nlog:\n" << Log();
  EXPECT_NE(out->find("warm-0\n"), std::string::npos) << *out;
  EXPECT_NE(out->find(ns.pod_ip() + "/24"), std::string::npos) << *out;
  std::string cni_mac =
      Capture("ip netns exec " + ns.path().substr(15) + " cat /sys/class/net/eth0/address");
  ASSERT_EQ(cni_mac.size(), 17u) << cni_mac;
  EXPECT_NE(out->find(cni_mac), std::string::npos) << *out << " vs CNI MAC " << cni_mac;
  // And the guest answers as the pod from outside (the pool VM's TAP joined the CNI interface).
  std::string flush = "ip netns exec " + ns.path().substr(15) + " ip addr flush dev eth0";
  ASSERT_EQ(std::system(flush.c_str()), 0);
  std::string ping = "ping -c 3 -W 5 -i 0.3 " + ns.pod_ip() + " >/dev/null";
  EXPECT_EQ(std::system(ping.c_str()), 0);

  // The next pod gets another VM (the refilled pool's): a different QEMU and kernel boot.
  ASSERT_TRUE(pool_ready(2)) << Log();
  ASSERT_TRUE(Create("pod6").ok());
  sbv1::ControllerStartResponse started6;
  ASSERT_TRUE(Start("pod6", &started6).ok()) << Log();
  EXPECT_NE(started6.pid(), started.pid());
  std::string boot6;
  ASSERT_TRUE(AgentAnswers("pod6", &boot6));
  EXPECT_NE(boot6, boot5);

  // pod5's VM goes with pod5; the pool VMs go with the sandboxer; nothing is left.
  ASSERT_TRUE(Shutdown("pod5").ok());
  ASSERT_TRUE(Shutdown("pod6").ok());
  EXPECT_NE(::kill(static_cast<pid_t>(started.pid()), 0), 0) << "pod5's QEMU still runs";
  StopSandboxer(SIGTERM);
  EXPECT_NE(std::system(("pgrep -f '[q]emu.*" + dir_ + "' >/dev/null").c_str()), 0)
      << "QEMU left after the sandboxer stopped";
  // Every pool VM's TAP (the names follow from the pool names in the log) is gone.
  std::string log = Log();
  for (size_t p = 0; (p = log.find("pool: booting pool-", p)) != std::string::npos; ++p) {
    std::string name = log.substr(p + 14, log.find('\n', p) - p - 14);
    std::string tap = sandboxer::TapName(name);
    EXPECT_NE(std::system(("ip link show " + tap + " >/dev/null 2>&1").c_str()), 0)
        << "TAP " << tap << " of " << name << " left on host";
  }
  EXPECT_TRUE(MountsUnder(run_dir_ + "/pods/").empty());
}

// VM templates (docs/sandboxer.md, "Templates"): with start_from "template" the sandboxer boots
// one VM, saves it, and restores every pod's VM from it. Two such pods are two VMs with their
// own identity: the pod's IP, MAC and hostname in each of two containers, and random streams
// that differ between the pods (each was reseeded by the host after its restore).
TEST_F(SandboxerTest, PodsFromTheTemplateAreTheirOwnVmsWithTheirOwnRandomness) {
  if (std::system("command -v ip >/dev/null") != 0) GTEST_SKIP() << "iproute2 is not installed";
  std::string layer = dir_ + "/busybox";
  ASSERT_EQ(agenttest::BuildBusyboxRoot(layer), "");
  RestartWith("start_from", "template");
  ASSERT_TRUE(LogShows("template: saved ")) << Log();

  std::map<std::string, std::string> uuids;
  std::vector<int64_t> pids;
  for (const std::string pod : {"pod1", "pod2"}) {
    PodNetns ns("pp-tpl" + pod.substr(3) + "-" + std::to_string(::getpid() % 100000),
                pod == "pod1" ? "10.97" : "10.98");
    ASSERT_TRUE(ns.ok());
    peapod::cri::v1::PodSandboxConfig cri;
    cri.set_hostname("tpl-" + pod);
    google::protobuf::Any options;
    options.set_type_url("type.googleapis.com/runtime.v1.PodSandboxConfig");
    options.set_value(cri.SerializeAsString());
    ASSERT_TRUE(Create(pod, ns.path(), &options).ok());
    auto t0 = std::chrono::steady_clock::now();
    sbv1::ControllerStartResponse started;
    auto s = Start(pod, &started);
    ASSERT_TRUE(s.ok()) << s.error_message() << "\nlog:\n" << Log();
    std::printf("%s: Start from the template took %.2f s\n", pod.c_str(),
                std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    EXPECT_NE(Log().find("pod " + pod + ": restoring from template"), std::string::npos) << Log();
    pids.push_back(started.pid());
    std::string cni_mac =
        Capture("ip netns exec " + ns.path().substr(15) + " cat /sys/class/net/eth0/address");
    for (const char* c : {"c1", "c2"}) {
      auto out = RunInPod(pod, c, layer,
                          {"sh", "-c",
                           "hostname; ip -4 -o addr show eth0; cat /sys/class/net/eth0/address; "
                           "grep '^fe80.* eth0$' /proc/net/if_inet6; "
                           "for i in 1 2 3; do cat /proc/sys/kernel/random/uuid; done"});
      ASSERT_TRUE(out.ok()) << out.error().ToString() << "\nlog:\n" << Log();
      EXPECT_NE(out->find("tpl-" + pod + "\n"), std::string::npos) << *out;
      EXPECT_NE(out->find(ns.pod_ip() + "/24"), std::string::npos) << *out;
      EXPECT_NE(out->find(cni_mac), std::string::npos) << *out << " vs CNI MAC " << cni_mac;
      // The template's NIC was saved up on standby: the pod's MAC was set live, and its
      // link-local address is the one that MAC gives.
      ExpectOneLinkLocalOf(cni_mac, *out);
      uuids[pod] += out->substr(out->size() - 3 * 37);
    }
    ExpectMacChangedLive(pod);
    // The guest answers as the pod on its network.
    std::string flush = "ip netns exec " + ns.path().substr(15) + " ip addr flush dev eth0";
    ASSERT_EQ(std::system(flush.c_str()), 0);
    std::string ping = "ping -c 2 -W 5 -i 0.3 " + ns.pod_ip() + " >/dev/null";
    EXPECT_EQ(std::system(ping.c_str()), 0);
    ASSERT_TRUE(Shutdown(pod).ok());
  }
  EXPECT_NE(pids[0], pids[1]);
  ASSERT_EQ(uuids["pod1"].size(), 6u * 37);
  for (size_t i = 0; i < 6; ++i) {
    std::string u = uuids["pod1"].substr(i * 37, 36);
    EXPECT_EQ(uuids["pod2"].find(u), std::string::npos)
        << "pod2 drew pod1's random uuid " << u << ": the pods share RNG state";
  }

  // The pool is made from the template too (the saved one, loaded), and a pod adopts such a VM.
  RestartWith("pool_size", 1);
  ASSERT_TRUE(LogShows("pool: restoring pool-")) << Log();
  EXPECT_EQ(Log().find("pool: booting pool-"), std::string::npos) << Log();
  ASSERT_TRUE(LogShows("; 1 of 1 ready")) << Log();
  {
    PodNetns ns("pp-tplp-" + std::to_string(::getpid() % 100000), "10.97");
    ASSERT_TRUE(ns.ok());
    ASSERT_TRUE(Create("pod3", ns.path()).ok());
    sbv1::ControllerStartResponse started;
    ASSERT_TRUE(Start("pod3", &started).ok()) << Log();
    EXPECT_NE(Log().find("pod pod3: adopting pool VM pool-"), std::string::npos) << Log();
    // The pool VM's NIC waited up, on standby; it took the pod's MAC without going down, and
    // its one IPv6 link-local address is the pod MAC's, as a NIC of that MAC gets at boot.
    std::string cni_mac =
        Capture("ip netns exec " + ns.path().substr(15) + " cat /sys/class/net/eth0/address");
    auto out = RunInPod("pod3", "c1", layer,
                        {"sh", "-c",
                         "ip -4 -o addr show eth0; cat /sys/class/net/eth0/address; "
                         "grep '^fe80.* eth0$' /proc/net/if_inet6; "
                         "cat /proc/sys/kernel/random/uuid"});
    ASSERT_TRUE(out.ok()) << out.error().ToString() << "\nlog:\n" << Log();
    EXPECT_NE(out->find(ns.pod_ip() + "/24"), std::string::npos) << *out;
    EXPECT_NE(out->find(cni_mac), std::string::npos) << *out << " vs CNI MAC " << cni_mac;
    ExpectOneLinkLocalOf(cni_mac, *out);
    std::string u = out->substr(out->size() - 37, 36);
    EXPECT_EQ((uuids["pod1"] + uuids["pod2"]).find(u), std::string::npos) << u;
    ExpectMacChangedLive("pod3");
    std::string flush = "ip netns exec " + ns.path().substr(15) + " ip addr flush dev eth0";
    ASSERT_EQ(std::system(flush.c_str()), 0);
    std::string ping = "ping -c 2 -W 5 -i 0.3 " + ns.pod_ip() + " >/dev/null";
    EXPECT_EQ(std::system(ping.c_str()), 0) << "the pod's address does not answer";
    ASSERT_TRUE(Shutdown("pod3").ok());
  }
  // Nothing of the template build is left running: only its files.
  EXPECT_TRUE(fs::is_directory(dir_ + "/state/templates")) << Log();
  EXPECT_FALSE(fs::exists(run_dir_ + "/pods/template-build"));
}

// The template is checked when the sandboxer loads it and when a VM restores from it: a changed
// initrd makes a new one, a corrupt one is rebuilt, and a pod whose restore fails boots.
TEST_F(SandboxerTest, ATemplateIsRebuiltWhenItsInitrdChangesAndABrokenOneFallsBackToBoot) {
  if (std::system("command -v ip >/dev/null") != 0) GTEST_SKIP() << "iproute2 is not installed";
  std::string initrd = dir_ + "/initrd.img";
  fs::copy_file(ImageDir() + "/initrd.img", initrd);
  cfg_["initrd"] = initrd;
  RestartWith("start_from", "template");
  ASSERT_TRUE(LogShows("template: saved ")) << Log();
  auto keys = [&] {
    std::vector<std::string> out;
    for (const auto& e : fs::directory_iterator(dir_ + "/state/templates")) {
      out.push_back(e.path().filename());
    }
    return out;
  };
  ASSERT_EQ(keys().size(), 1u);
  std::string first = keys()[0];

  // The same inputs: the saved one is loaded, not built again.
  RestartWith("log_level", "info");
  ASSERT_TRUE(LogShows("template: " + dir_ + "/state/templates/" + first + "/state loaded"))
      << Log();

  // A changed initrd (zero padding at its end, which the kernel skips): a new template.
  { std::ofstream(initrd, std::ios::app) << std::string(512, '\0'); }
  RestartWith("log_level", "debug");
  ASSERT_TRUE(LogShows("template: saved ", 2)) << Log();
  ASSERT_EQ(keys().size(), 1u);
  std::string second = keys()[0];
  EXPECT_NE(second, first) << "the template of the old initrd was kept";

  // A flipped byte in the saved state: found at load, and the template is built again.
  std::string state = dir_ + "/state/templates/" + second + "/state";
  {
    std::fstream f(state, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(fs::file_size(state) / 2));
    f.put('\x5a');
  }
  RestartWith("log_level", "info");
  ASSERT_TRUE(LogShows("is corrupt")) << Log();
  ASSERT_TRUE(LogShows("template: saved ", 3)) << Log();

  // A state file cut short after it was loaded: the restore refuses it (it is not the file that
  // was hashed); the pod boots.
  fs::resize_file(state, fs::file_size(state) / 2);
  PodNetns ns("pp-tplb-" + std::to_string(::getpid() % 100000), "10.97");
  ASSERT_TRUE(ns.ok());
  ASSERT_TRUE(Create("pod3", ns.path()).ok());
  sbv1::ControllerStartResponse started;
  auto s = Start("pod3", &started);
  ASSERT_TRUE(s.ok()) << s.error_message() << "\nlog:\n" << Log();
  EXPECT_TRUE(LogShows("failed to restore")) << Log();
  std::string boot;
  EXPECT_TRUE(AgentAnswers("pod3", &boot));
  ASSERT_TRUE(Shutdown("pod3").ok());
  // And it is built again for the pods after.
  EXPECT_TRUE(LogShows("template: saved ", 4)) << Log();
}

}  // namespace
}  // namespace peapod::vmtest
