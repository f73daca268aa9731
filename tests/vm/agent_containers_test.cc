// Containers in the real guest: one VM, several crun containers on its one kernel, driven over
// the virtio-serial channel exactly as the shim will drive them. The rootfs is a busybox layer
// built here from Debian's busybox-static with mkfs.erofs and attached as a read-only SCSI disk.
#include <csignal>
#include <cstdlib>

#include <nlohmann/json.hpp>

#include "tests/common/agent_client.h"
#include "tests/vm/vm_fixture.h"

namespace peapod::vmtest {
namespace {

using agenttest::Empty;

using agenttest::BuildBusyboxLayer;

class AgentContainersTest : public AgentVmTest {
 protected:
  // Boots the VM with the busybox layer as SCSI disk 0:0; false (after failing) if it cannot.
  bool Boot() {
    std::string layer = dir_ + "/busybox.erofs";
    if (auto why = BuildBusyboxLayer(dir_, layer); !why.empty()) {
      ADD_FAILURE() << "cannot build the busybox layer: " << why;
      return false;
    }
    share_ = dir_ + "/share";
    fs::create_directories(share_ + "/vol");
    vm_ = std::make_unique<Vm>(dir_, std::vector<std::string>{layer}, share_);
    v1::CheckResponse check;
    auto client = ConnectAndCheck(lt_, *vm_, &check);
    if (!client) {
      ADD_FAILURE() << "agent never answered; console:\n" << vm_->Console();
      return false;
    }
    kernel_ = check.kernel_release();
    agent_ = std::make_unique<agenttest::AgentClient>(std::move(client),
                                                      agenttest::BusyboxLayerStorage());
    v1::CreateSandboxRequest sb;
    sb.set_sandbox_id("pod1");
    sb.set_hostname("pod1");
    auto r = agent_->Sync(&agentapi::AgentClient::CreateSandbox, sb);
    EXPECT_TRUE(r.ok()) << r.error().ToString();
    return r.ok();
  }

  void TearDown() override {
    if (agent_) {
      (void)agent_->Sync(&agentapi::AgentClient::DestroySandbox, v1::DestroySandboxRequest(), 10s);
      if (vm_) vm_->WaitExit(20s);
      lt_.Sync([&] { agent_.reset(); });
    }
    vm_.reset();
    AgentVmTest::TearDown();
  }

  peapod::testing::LoopThread lt_;
  std::unique_ptr<Vm> vm_;
  std::unique_ptr<agenttest::AgentClient> agent_;
  std::string kernel_;
  std::string share_;
};

TEST_F(AgentContainersTest, TwoContainersShareOneKernelWithTheirOwnPidNamespaces) {
  if (!Boot()) return;
  const std::string ids =
      "cat /proc/sys/kernel/random/boot_id; uname -r; readlink /proc/self/ns/pid; "
      "cat /proc/self/personality";
  ASSERT_TRUE(agent_->Create("c1", agenttest::Spec({"sh", "-c", ids + "; exit 3"})).ok());
  // c2 also writes a long, checkable stream: nothing may be lost or reordered.
  auto c2 = agent_->Create(
      "c2", agenttest::Spec({"sh", "-c", ids + "; seq 1 30000; echo to-stderr >&2"}));
  ASSERT_TRUE(c2.ok()) << c2.error().ToString();
  EXPECT_EQ(agent_->State("c1"), v1::StateContainerResponse::CREATED);
  ASSERT_TRUE(agent_->Start("c1").ok());
  ASSERT_TRUE(agent_->Start("c2").ok());

  auto out1 = agenttest::Lines(agent_->ReadAll("c1"));
  std::string out2_text = agent_->ReadAll("c2");
  auto out2 = agenttest::Lines(out2_text);
  EXPECT_EQ(agent_->ReadAll("c2", "", true), "to-stderr\n");
  auto exit1 = agent_->Wait("c1");
  ASSERT_TRUE(exit1.ok()) << exit1.error().ToString();
  EXPECT_EQ(*exit1, 3u);
  auto exit2 = agent_->Wait("c2");
  ASSERT_TRUE(exit2.ok());
  EXPECT_EQ(*exit2, 0u);
  EXPECT_EQ(agent_->State("c1"), v1::StateContainerResponse::STOPPED);

  ASSERT_GE(out1.size(), 4u) << "c1 printed: " << ::testing::PrintToString(out1);
  ASSERT_EQ(out2.size(), 4u + 30000u) << "c2 printed " << out2_text.size() << " bytes";
  std::printf("c1: boot_id %s kernel %s %s (exit %u)\n", out1[0].c_str(), out1[1].c_str(),
              out1[2].c_str(), *exit1);
  std::printf("c2: boot_id %s kernel %s %s (%zu lines)\n", out2[0].c_str(), out2[1].c_str(),
              out2[2].c_str(), out2.size());
  // Same kernel and boot: one VM. Not the host's kernel.
  EXPECT_EQ(out1[0], out2[0]);
  EXPECT_EQ(out1[0].size(), 36u);
  EXPECT_EQ(out1[1], kernel_);
  utsname host{};
  ::uname(&host);
  EXPECT_NE(out1[1], std::string(host.release));
  // Separate PID namespaces.
  EXPECT_NE(out1[2], out2[2]);
  for (int i = 1; i <= 30000; ++i) {
    if (out2[3 + static_cast<size_t>(i)] != std::to_string(i)) {
      ADD_FAILURE() << "c2 line " << i << " is '" << out2[3 + static_cast<size_t>(i)] << "'";
      break;
    }
  }
  // Under TCG the agent runs crun at fixed addresses (its code is then translated once), but the
  // containers' processes keep address randomization: no ADDR_NO_RANDOMIZE in their persona.
  if (Accel() == "tcg") {
    EXPECT_NE(vm_->Console().find("crun runs at fixed addresses"), std::string::npos)
        << vm_->Console();
  }
  EXPECT_EQ(out1[3], "00000000");
  EXPECT_EQ(out2[3], "00000000");
  // crun's binary is on a read-only ramfs, so crun does not copy and re-execute itself first
  // (its CVE-2019-5736 guard): the agent asks of the binary what crun asks (seals, then a
  // read-only mount) and logs the answer, and the containers above ran with it.
  EXPECT_NE(vm_->Console().find("/usr/bin/crun is on a read-only ramfs"), std::string::npos)
      << vm_->Console();
  EXPECT_EQ(vm_->Console().find("crun copies itself before each command"), std::string::npos);
  // A volume from the pod's 9p share, bind-mounted into a container: both ways.
  {
    std::ofstream(share_ + "/vol/from-host") << "written on the host\n";
    auto spec = nlohmann::json::parse(agenttest::Spec(
        {"sh", "-c", "cat /data/from-host; echo written in the guest > /data/from-guest"}));
    spec["mounts"].push_back({{"destination", "/data"},
                              {"type", "bind"},
                              {"source", "/run/peapod/share/vol"},
                              {"options", {"rbind", "rw"}}});
    v1::CreateContainerRequest req;
    req.set_container_id("vol");
    req.set_oci_spec(spec.dump());
    auto* layer = req.add_layers();
    layer->set_driver(v1::Storage::SCSI);
    layer->set_source("0:0");
    layer->set_fstype("erofs");
    layer->add_options("ro");
    layer->set_mount_point("/run/peapod/layers/busybox");
    auto* share = req.add_mounts();
    share->set_driver(v1::Storage::VIRTIO_9P);
    share->set_source("peapod-share");
    share->set_mount_point("/run/peapod/share");
    auto created = agent_->Sync(&agentapi::AgentClient::CreateContainer, req);
    ASSERT_TRUE(created.ok()) << created.error().ToString();
    ASSERT_TRUE(agent_->Start("vol").ok());
    EXPECT_EQ(agent_->ReadAll("vol"), "written on the host\n");
    EXPECT_EQ(*agent_->Wait("vol"), 0u);
    std::ifstream back(share_ + "/vol/from-guest");
    std::string line;
    std::getline(back, line);
    EXPECT_EQ(line, "written in the guest");
    EXPECT_TRUE(agent_->Remove("vol").ok());
  }

  // The agent left the initramfs for a real mount, so crun could pivot_root (no --no-pivot).
  EXPECT_EQ(vm_->Console().find("no-pivot"), std::string::npos) << vm_->Console();
  EXPECT_TRUE(agent_->Remove("c1").ok());
  EXPECT_TRUE(agent_->Remove("c2").ok());
  EXPECT_EQ(agent_->Remove("c1").error().code(), Code::kNotFound);
}

TEST_F(AgentContainersTest, ExecSignalsPauseStatsOomAndBadRequests) {
  if (!Boot()) return;
  ASSERT_TRUE(agent_->Create("svc", agenttest::Spec({"sleep", "1000"})).ok());
  ASSERT_TRUE(agent_->Start("svc").ok());
  EXPECT_EQ(agent_->State("svc"), v1::StateContainerResponse::RUNNING);

  // exec without and with a terminal.
  ASSERT_TRUE(agent_->Exec("svc", "e1", {"sh", "-c", "echo hello-from-exec; exit 7"}).ok());
  EXPECT_EQ(agent_->ReadAll("svc", "e1"), "hello-from-exec\n");
  EXPECT_EQ(*agent_->Wait("svc", "e1"), 7u);
  // The agent starts execs itself (exec.h): the process is in the container's cgroup, and its
  // PID and mount namespaces, as one crun exec starts would be.
  ASSERT_TRUE(
      agent_
          ->Exec("svc", "where",
                 {"sh", "-c",
                  "cat /proc/self/cgroup; for n in self/ns/pid 1/ns/pid self/ns/mnt 1/ns/mnt; do "
                  "readlink /proc/$n; done; "
                  "cat /proc/1/cmdline"})
          .ok());
  auto where = agenttest::Lines(agent_->ReadAll("svc", "where"));
  EXPECT_EQ(*agent_->Wait("svc", "where"), 0u);
  ASSERT_EQ(where.size(), 6u) << ::testing::PrintToString(where);
  // In its cgroup namespace the container's own cgroup is the root.
  EXPECT_EQ(where[0], "0::/");
  EXPECT_EQ(where[1], where[2]);
  EXPECT_EQ(where[3], where[4]);
  EXPECT_EQ(where[5], std::string("sleep\0"
                                  "1000\0",
                                  11));
  EXPECT_NE(vm_->Console().find("exec where in svc started by the agent"), std::string::npos)
      << vm_->Console();
  // From the guest's side: the exec's process is in the container's cgroup.
  ASSERT_TRUE(agent_->Exec("svc", "cg", {"sleep", "1000"}).ok());
  auto in_cgroup = agent_->Sync(&agentapi::AgentClient::ListProcesses, [] {
    v1::ContainerRequest r;
    r.set_container_id("svc");
    return r;
  }());
  ASSERT_TRUE(in_cgroup.ok()) << in_cgroup.error().ToString();
  EXPECT_EQ(in_cgroup->processes_size(), 2) << in_cgroup->DebugString();
  ASSERT_TRUE(agent_->Signal("svc", "cg", SIGKILL).ok());
  EXPECT_EQ(*agent_->Wait("svc", "cg"), 128u + SIGKILL);
  // For the record: the guest's memory with one idle container.
  ASSERT_TRUE(agent_->Exec("svc", "mem", {"head", "-3", "/proc/meminfo"}).ok());
  std::printf("guest /proc/meminfo with one idle container:\n%s",
              agent_->ReadAll("svc", "mem").c_str());
  EXPECT_EQ(*agent_->Wait("svc", "mem"), 0u);
  auto tty = agent_->Exec("svc", "t1", {"sh", "-c", "tty; echo on-a-tty"}, true);
  ASSERT_TRUE(tty.ok()) << tty.error().ToString();
  std::string tty_out = agent_->ReadAll("svc", "t1");
  EXPECT_NE(tty_out.find("/dev/pts/"), std::string::npos) << tty_out;
  EXPECT_NE(tty_out.find("on-a-tty\r\n"), std::string::npos) << tty_out;
  EXPECT_EQ(*agent_->Wait("svc", "t1"), 0u);

  // SIGTERM kills a sleep (an exec: the container's PID 1 ignores signals it has no handler
  // for, as with any runtime).
  ASSERT_TRUE(agent_->Exec("svc", "sleeper", {"sleep", "1000"}).ok());
  v1::SignalProcessRequest sig;
  sig.set_container_id("svc");
  sig.set_exec_id("sleeper");
  sig.set_signal(SIGTERM);
  ASSERT_TRUE(agent_->Sync(&agentapi::AgentClient::SignalProcess, sig).ok());
  EXPECT_EQ(*agent_->Wait("svc", "sleeper"), 128u + SIGTERM);
  v1::ContainerRequest creq;
  creq.set_container_id("svc");
  auto pids = agent_->Sync(&agentapi::AgentClient::ListProcesses, creq);
  ASSERT_TRUE(pids.ok()) << pids.error().ToString();
  EXPECT_EQ(pids->processes_size(), 1);  // the sleep; the execs are gone

  // Stats from the container's cgroup.
  auto stats = agent_->Sync(&agentapi::AgentClient::StatsContainer, creq);
  ASSERT_TRUE(stats.ok()) << stats.error().ToString();
  EXPECT_GT(stats->metrics().cpu().usage_usec(), 0u);
  EXPECT_GT(stats->metrics().memory().usage(), 0u);
  EXPECT_GT(stats->metrics().pids().current(), 0u);

  // Resources updated in place.
  v1::UpdateContainerRequest update;
  update.set_container_id("svc");
  update.set_resources(R"({"memory": {"limit": 67108864}, "pids": {"limit": 50}})");
  auto updated = agent_->Sync(&agentapi::AgentClient::UpdateContainer, update);
  ASSERT_TRUE(updated.ok()) << updated.error().ToString();
  auto after = agent_->Sync(&agentapi::AgentClient::StatsContainer, creq);
  ASSERT_TRUE(after.ok());
  EXPECT_EQ(after->metrics().memory().usage_limit(), 64u << 20);
  EXPECT_EQ(after->metrics().pids().limit(), 50u);
  update.set_resources("{\"memory\": {\"limit\": \"lots\"}}");
  EXPECT_EQ(agent_->Sync(&agentapi::AgentClient::UpdateContainer, update).error().code(),
            Code::kInvalidArgument);

  // A terminal resized while its process runs.
  ASSERT_TRUE(agent_->Exec("svc", "sized", {"sh", "-c", "sleep 2; stty size"}, true).ok());
  v1::ResizePtyRequest resize;
  resize.set_container_id("svc");
  resize.set_exec_id("sized");
  resize.set_width(123);
  resize.set_height(45);
  ASSERT_TRUE(agent_->Sync(&agentapi::AgentClient::ResizePty, resize).ok());
  EXPECT_NE(agent_->ReadAll("svc", "sized").find("45 123"), std::string::npos);
  EXPECT_EQ(*agent_->Wait("svc", "sized"), 0u);

  // Pause and resume.
  ASSERT_TRUE(agent_->Sync(&agentapi::AgentClient::PauseContainer, creq).ok());
  EXPECT_EQ(agent_->State("svc"), v1::StateContainerResponse::PAUSED);
  ASSERT_TRUE(agent_->Sync(&agentapi::AgentClient::ResumeContainer, creq).ok());
  EXPECT_EQ(agent_->State("svc"), v1::StateContainerResponse::RUNNING);

  // A 32 MiB container that wants 64 MiB is OOM-killed, and the agent says so.
  ASSERT_TRUE(agent_
                  ->Create("hog", agenttest::Spec(
                                      {"dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"},
                                      false, 32 << 20))
                  .ok());
  ASSERT_TRUE(agent_->Start("hog").ok());
  EXPECT_EQ(*agent_->Wait("hog"), 128u + SIGKILL);
  auto oom = agent_->Sync(&agentapi::AgentClient::GetOOMEvent, v1::GetOOMEventRequest(), 30s);
  ASSERT_TRUE(oom.ok()) << oom.error().ToString();
  EXPECT_EQ(oom->container_id(), "hog");

  // The pod network: the NIC found by MAC, renamed, addressed, routed; seen by containers.
  v1::ConfigureNetworkRequest net;
  auto* itf = net.add_interfaces();
  itf->set_name("eth0");
  itf->set_mac("52:54:00:12:34:56");
  itf->add_addresses("10.88.0.7/16");
  itf->add_addresses("fd00:88::7/64");
  itf->set_mtu(1400);
  auto* route = net.add_routes();
  route->set_gateway("10.88.0.1");
  route->set_device("eth0");
  auto configured = agent_->Sync(&agentapi::AgentClient::ConfigureNetwork, net);
  ASSERT_TRUE(configured.ok()) << configured.error().ToString();
  ASSERT_TRUE(
      agent_->Exec("svc", "net", {"sh", "-c", "ip addr show eth0; ip route; hostname"}).ok());
  std::string net_out = agent_->ReadAll("svc", "net");
  EXPECT_NE(net_out.find("inet 10.88.0.7/16"), std::string::npos) << net_out;
  EXPECT_NE(net_out.find("inet6 fd00:88::7/64"), std::string::npos) << net_out;
  EXPECT_NE(net_out.find("mtu 1400"), std::string::npos) << net_out;
  EXPECT_NE(net_out.find("default via 10.88.0.1 dev eth0"), std::string::npos) << net_out;
  EXPECT_NE(net_out.find("pod1"), std::string::npos) << net_out;
  EXPECT_EQ(*agent_->Wait("svc", "net"), 0u);
  v1::ConfigureNetworkRequest bad_net;
  bad_net.add_interfaces()->set_mac("02:00:00:00:00:99");
  EXPECT_EQ(agent_->Sync(&agentapi::AgentClient::ConfigureNetwork, bad_net).error().code(),
            Code::kNotFound);

  // Bad requests get clear errors, and the agent keeps serving.
  auto bad_json = agent_->Create("bad", "{not json");
  EXPECT_EQ(bad_json.error().code(), Code::kInvalidArgument);
  EXPECT_NE(bad_json.error().message().find("config.json"), std::string::npos)
      << bad_json.error().message();
  auto no_args =
      agent_->Create("bad", R"({"ociVersion":"1.0.2","root":{"path":"r"},"process":{"cwd":"/"}})");
  EXPECT_EQ(no_args.error().code(), Code::kInvalidArgument) << no_args.error().ToString();
  EXPECT_EQ(agent_->Create("svc", agenttest::Spec({"true"})).error().code(), Code::kAlreadyExists);
  EXPECT_EQ(agent_->Start("nosuch").error().code(), Code::kNotFound);
  EXPECT_EQ(agent_->Exec("nosuch", "x", {"true"}).error().code(), Code::kNotFound);
  EXPECT_EQ(agent_->Exec("svc", "e2", {}).error().code(), Code::kInvalidArgument);
  EXPECT_EQ(agent_->Remove("svc").error().code(), Code::kFailedPrecondition);  // still running
  // The failed creates left nothing: the id is free.
  ASSERT_TRUE(agent_->Create("bad", agenttest::Spec({"true"})).ok());
  EXPECT_TRUE(agent_->Remove("bad").ok());
  EXPECT_TRUE(agent_->Sync(&agentapi::AgentClient::Check, v1::CheckRequest()).ok());

  // A container in the VM's PID namespace (CRI's NODE/POD) sees the agent as PID 1, and as
  // root can signal it: SIGTERM or SIGINT from it must not power the VM off.
  {
    auto spec = nlohmann::json::parse(
        agenttest::Spec({"sh", "-c", "kill -TERM 1; kill -INT 1; sleep 1; echo still-here"}));
    auto& ns = spec["linux"]["namespaces"];
    ns.erase(std::remove_if(ns.begin(), ns.end(), [](const auto& n) { return n["type"] == "pid"; }),
             ns.end());
    ASSERT_TRUE(agent_->Create("vmpid", spec.dump()).ok());
    ASSERT_TRUE(agent_->Start("vmpid").ok());
    EXPECT_EQ(agent_->ReadAll("vmpid"), "still-here\n");
    EXPECT_EQ(*agent_->Wait("vmpid"), 0u);
    EXPECT_TRUE(agent_->Sync(&agentapi::AgentClient::Check, v1::CheckRequest()).ok());
    EXPECT_NE(vm_->Console().find("agent: signal 15 from pid"), std::string::npos)
        << vm_->Console();
    EXPECT_TRUE(agent_->Remove("vmpid").ok());
  }

  EXPECT_TRUE(agent_->Remove("svc", true).ok());
  EXPECT_TRUE(agent_->Remove("hog").ok());
}

// A container with CAP_NET_ADMIN makes a bridge and a veth pair: the guest kernel asks its
// /sbin/modprobe (the agent) for bridge and rtnl-link-veth, which the image keeps out of the
// boot-time module list. An unknown module is refused, not hung on.
TEST_F(AgentContainersTest, TheKernelLoadsModulesOnDemandForPrivilegedContainers) {
  if (!Boot()) return;
  auto spec = nlohmann::json::parse(agenttest::Spec({"sleep", "1000"}));
  for (const char* set : {"bounding", "effective", "permitted"}) {
    spec["process"]["capabilities"][set].push_back("CAP_NET_ADMIN");
  }
  ASSERT_TRUE(agent_->Create("net", spec.dump()).ok());
  ASSERT_TRUE(agent_->Start("net").ok());
  ASSERT_TRUE(agent_
                  ->Exec("net", "br",
                         {"sh", "-c",
                          "brctl addbr br0 && ip link add v0 type veth peer name v1 "
                          "&& ls /sys/class/net | sort | tr '\\n' ' '"})
                  .ok());
  std::string out = agent_->ReadAll("net", "br");
  EXPECT_EQ(*agent_->Wait("net", "br"), 0u) << out;
  EXPECT_NE(out.find("br0"), std::string::npos) << out;
  EXPECT_NE(out.find("v0"), std::string::npos) << out;
  ASSERT_TRUE(agent_->Exec("net", "bad", {"ip", "link", "add", "x0", "type", "nosuchlink"}).ok());
  EXPECT_NE(*agent_->Wait("net", "bad"), 0u);
}

}  // namespace
}  // namespace peapod::vmtest
