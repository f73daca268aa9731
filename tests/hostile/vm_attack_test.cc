// A hostile guest in a real pod VM (labels vm and hostile): a container with every capability,
// root in the guest, given the whole pod share, attacks the host through QEMU's 9p server —
// plants symlinks, renames the directories the host walks, changes modes, fills a volume with
// links to host paths — while a second pod runs. Then the host's own operations (release,
// shutdown) run, and the test checks a canary tree outside every pod, the host mount table and
// that the neighbour still answers.
#include <sys/stat.h>

#include <set>

#include "common/base/mountinfo.h"
#include "sandboxer/pod_share.h"
#include "tests/vm/sandboxer_fixture.h"

namespace peapod::vmtest {
namespace {

std::string Slurp(const std::string& path) {
  std::ifstream f(path);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

TEST_F(SandboxerTest, HostileGuestCannotChangeTheShareOrReachTheHostThroughIt) {
  if (std::system("command -v mkfs.erofs >/dev/null") != 0) {
    GTEST_SKIP() << "mkfs.erofs is not installed (erofs-utils)";
  }
  std::string layer = dir_ + "/snapshots/1/fs";
  ASSERT_EQ(agenttest::BuildBusyboxRoot(layer), "");
  for (const char* applet :
       {"ln", "mv", "mkdir", "chmod", "chown", "mknod", "rm", "touch", "stat", "tr"}) {
    fs::create_symlink("busybox", layer + "/bin/" + applet);
  }
  google::protobuf::RepeatedPtrField<containerd::types::Mount> mounts;
  auto* m = mounts.Add();
  m->set_type("bind");
  m->set_source(layer);
  m->add_options("ro");
  // The canary: host data outside every pod, named as the host names things in a share.
  std::string canary = dir_ + "/canary";
  fs::create_directories(canary + "/c1");
  std::ofstream(canary + "/precious") << "host data\n";
  std::ofstream(canary + "/c1/0") << "host data\n";
  std::string volume = dir_ + "/volume";
  fs::create_directories(volume);

  sbv1::ControllerStartResponse started, neighbour;
  ASSERT_TRUE(Create("pod5").ok());
  ASSERT_TRUE(Start("pod5", &started).ok()) << Log();
  ASSERT_TRUE(Create("pod6").ok());
  ASSERT_TRUE(Start("pod6", &neighbour).ok()) << Log();

  peapod::testing::LoopThread lt;
  auto fd = ConnectUnix(dir_ + "/shim.sock");
  ASSERT_TRUE(fd.ok()) << fd.error().ToString();
  auto shim = lt.Sync([&] { return *ttrpc::Client::Create(lt.loop(), std::move(*fd)); });
  auto call = [&]<typename Resp>(const std::string& method, const google::protobuf::Message& req) {
    ttrpc::CallOptions opts;
    opts.timeout = 120s;
    return shim->CallSyncTyped<Resp>("peapod.sandboxer.v1.Sandboxer", method, req, opts);
  };
  pb::AttachRootfsRequest attach;
  attach.set_pod_id("pod5");
  attach.set_container_id("attacker");
  *attach.mutable_mounts() = mounts;
  auto rootfs = call.operator()<pb::AttachRootfsResponse>("AttachRootfs", attach);
  ASSERT_TRUE(rootfs.ok()) << rootfs.error().ToString();
  pb::ShareVolumesRequest share;
  share.set_pod_id("pod5");
  share.set_container_id("attacker");
  share.add_volumes()->set_host_path(volume);
  auto shared = call.operator()<pb::ShareVolumesResponse>("ShareVolumes", share);
  ASSERT_TRUE(shared.ok()) << shared.error().ToString();

  v1::CheckResponse check;
  auto agent_conn = ConnectAndCheck(lt, run_dir_ + "/pods/pod5/agent.sock", &check, 30s);
  ASSERT_TRUE(agent_conn);
  agenttest::AgentClient agent(agent_conn, {});
  // Each attack prints its name and exit status; the volume (/data) is the guest's to write.
  std::string script =
      "try() { name=$1; shift; \"$@\" 2>/dev/null; echo \"$name=$?\"; }; "
      "try planted ln -s " +
      canary +
      " /share/planted; "
      "try rename_volumes mv /share/volumes /share/v2; "
      "try rename_container mv /share/volumes/attacker /share/volumes/other; "
      "try link_target ln -s " +
      canary +
      " /share/volumes/attacker/1; "
      "try mkdir mkdir /share/volumes/c1; "
      "try chmod chmod 4755 /share/hosts; "
      "try write sh -c 'echo x >> /share/hosts'; "
      "try remove rm -f /share/resolv.conf; "
      "try link_in_volume ln -s " +
      canary +
      " /data/evil; "
      "try dir_link_in_volume ln -s " +
      canary +
      " /data/c1; "
      "try file_in_volume sh -c 'echo guest > /data/file'; "
      "try mknod_in_volume mknod /data/disk b 8 0; "
      "try chown_in_volume sh -c 'echo x > /data/owned && chown 1234:5678 /data/owned'; "
      "try setuid_in_volume chmod 4755 /data/file; "
      "try setgid_in_volume chmod 2755 /data/file; "
      // 3 MiB on the serial console: the host keeps the console log capped.
      "try console_flood sh -c 'dd if=/dev/zero bs=65536 count=48 2>/dev/null | "
      "tr \\\\000 x > /dev/ttyS0'";
  auto spec = nlohmann::json::parse(agenttest::Spec({"sh", "-c", script}));
  nlohmann::json all_caps = {"CAP_CHOWN",           "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID",
                             "CAP_MKNOD",           "CAP_SYS_ADMIN",    "CAP_SETUID", "CAP_SETGID",
                             "CAP_LINUX_IMMUTABLE", "CAP_KILL"};
  for (const char* set : {"bounding", "effective", "permitted"}) {
    spec["process"]["capabilities"][set] = all_caps;
  }
  spec["process"]["noNewPrivileges"] = false;
  spec["linux"]["devices"] = {{{"path", "/dev/ttyS0"}, {"type", "c"}, {"major", 4}, {"minor", 64}}};
  spec["linux"]["resources"]["devices"] = {{{"allow", true}, {"access", "rwm"}}};
  spec["mounts"].push_back({{"destination", "/share"},
                            {"type", "bind"},
                            {"source", std::string(sandboxer::kGuestShareDir)},
                            {"options", {"rbind", "rw"}}});
  spec["mounts"].push_back({{"destination", "/data"},
                            {"type", "bind"},
                            {"source", shared->guest_paths(0)},
                            {"options", {"rbind", "rw"}}});
  v1::CreateContainerRequest req;
  req.set_container_id("attacker");
  req.set_oci_spec(spec.dump());
  *req.mutable_layers() = rootfs->layers();
  req.set_upper_dir(rootfs->upper_dir());
  ASSERT_TRUE(agent.Create(req).ok());
  ASSERT_TRUE(agent.Start("attacker").ok());
  std::string out = agent.ReadAll("attacker");
  ASSERT_TRUE(agent.Wait("attacker").ok());
  EXPECT_TRUE(agent.Remove("attacker").ok());
  std::printf("attacker:\n%s", out.c_str());
  std::map<std::string, std::string> got;
  std::istringstream lines(out);
  for (std::string l; std::getline(lines, l);) {
    if (auto eq = l.find('='); eq != std::string::npos) got[l.substr(0, eq)] = l.substr(eq + 1);
  }
  for (const char* refused :
       {"planted", "rename_volumes", "rename_container", "link_target", "mkdir", "chmod", "write",
        "remove", "mknod_in_volume", "setuid_in_volume", "setgid_in_volume"}) {
    EXPECT_NE(got[refused], "") << refused << " did not run";
    EXPECT_NE(got[refused], "0") << "the guest could " << refused << " in the share";
  }
  for (const char* allowed :
       {"link_in_volume", "dir_link_in_volume", "file_in_volume", "console_flood"}) {
    EXPECT_EQ(got[allowed], "0") << allowed << ": a writable volume must stay writable";
  }
  EXPECT_TRUE(fs::is_symlink(volume + "/evil"));
  // The console log, after the 3 MiB flood and two checks of the capper: at most 1 MiB, the
  // newest 512 KiB of a cut in console.log.1.
  std::this_thread::sleep_for(std::chrono::milliseconds(2500));
  std::string console = dir_ + "/state/pods/pod5/console.log";
  ASSERT_TRUE(fs::exists(console + ".1")) << "3 MiB on the console and the log was never cut";
  EXPECT_LE(fs::file_size(console), 1u << 20);
  EXPECT_LE(fs::file_size(console + ".1"), 512u << 10);
  EXPECT_FALSE(fs::exists(volume + "/disk")) << "the guest made a block device on the host";
  // QEMU runs as a uid of its own (not root) with no capabilities; the share's 9p server
  // (virtfs-proxy-helper) is root, chrooted into the share, and refused device nodes.
  std::ifstream status("/proc/" + std::to_string(started.pid()) + "/status");
  std::string cap_eff, uid_line;
  for (std::string l; std::getline(status, l);) {
    if (l.rfind("CapEff:", 0) == 0) cap_eff = l.substr(l.find_first_not_of(" \t", 7));
    if (l.rfind("Uid:", 0) == 0) uid_line = l;
  }
  EXPECT_EQ(cap_eff, "0000000000000000") << "QEMU's effective capabilities";
  unsigned long qemu_uid = 0;
  std::istringstream(uid_line.substr(4)) >> qemu_uid;
  EXPECT_GT(qemu_uid, 0x78000000ul) << uid_line << ": QEMU must not run as root";
  struct stat own {};
  EXPECT_EQ(::stat((volume + "/file").c_str(), &own), 0);
  EXPECT_EQ(own.st_uid, 0u) << "a file the (root) container made must be root's on the host";
  EXPECT_EQ(got["chown_in_volume"], "0");
  ASSERT_EQ(::stat((volume + "/owned").c_str(), &own), 0);
  EXPECT_EQ(own.st_uid, 1234u) << "a file chowned in the guest keeps that owner on the host";
  EXPECT_EQ(own.st_gid, 5678u);
  EXPECT_EQ(Slurp(volume + "/file"), "guest\n");

  // The host's own operations after the attack: release, then the pod's removal.
  pb::ReleaseContainerRequest rel;
  rel.set_pod_id("pod5");
  rel.set_container_id("attacker");
  auto released = call.operator()<google::protobuf::Empty>("ReleaseContainer", rel);
  EXPECT_TRUE(released.ok()) << released.error().ToString();
  lt.Sync([&] {
    shim.reset();
    agent_conn.reset();
  });
  std::string boot_id;
  EXPECT_TRUE(AgentAnswers("pod6", &boot_id)) << "the neighbour pod stopped answering";
  ASSERT_TRUE(Stop("pod5").ok());
  ASSERT_TRUE(Shutdown("pod5").ok());
  EXPECT_FALSE(fs::exists(run_dir_ + "/pods/pod5"));

  EXPECT_EQ(Slurp(canary + "/precious"), "host data\n");
  EXPECT_EQ(Slurp(canary + "/c1/0"), "host data\n");
  size_t entries = 0;
  for (auto it = fs::recursive_directory_iterator(canary); it != fs::end(it); ++it) ++entries;
  EXPECT_EQ(entries, 3u) << "the canary changed";
  EXPECT_EQ(Slurp(volume + "/file"), "guest\n") << "the pod's removal deleted volume data";
  EXPECT_TRUE(MountsUnder(dir_).empty()) << "a mount left below the test dir";
  for (const auto& mp : peapod::MountsUnder(run_dir_ + "/pods", /*below_only=*/true)) {
    EXPECT_EQ(mp.path, run_dir_ + "/pods/pod6/share") << "unexpected mount " << mp.path;
  }
  struct stat st {};
  ASSERT_EQ(::stat((run_dir_ + "/pods/pod6").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0700u) << "the pod run dir is open to other users";
  // The state dir: root's, and passable (not readable) by the pod VMs' group alone.
  ASSERT_EQ(::stat((dir_ + "/state").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0710u) << "the state dir is open to other users";
  EXPECT_EQ(st.st_gid, 0x78000000u);
  ASSERT_EQ(::stat((dir_ + "/state/pods").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0700u) << "the pod records are open to other users";
  EXPECT_TRUE(AgentAnswers("pod6", &boot_id)) << "the neighbour pod stopped answering";
}

}  // namespace
}  // namespace peapod::vmtest
