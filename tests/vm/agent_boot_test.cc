// Boots the real guest kernel + initrd in QEMU under TCG (KVM when asked for with
// PEAPOD_TEST_ACCEL) and talks to peapod-agent over the virtio-serial channel.
#include "tests/vm/vm_fixture.h"

namespace peapod::vmtest {
namespace {

TEST_F(AgentVmTest, BootsAnswersSurvivesReconnectAndPowersOff) {
  peapod::testing::LoopThread lt;
  Vm vm(dir_);
  v1::CheckResponse check;
  auto client = ConnectAndCheck(lt, vm, &check);
  ASSERT_NE(client, nullptr) << "agent never answered; console:\n" << vm.Console();
  auto ready_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                      std::chrono::steady_clock::now() - vm.started())
                      .count();
  std::printf("agent ready %lld ms after QEMU start (guest uptime %.2f s), kernel %s\n",
              static_cast<long long>(ready_ms), check.uptime_ns() / 1e9,
              check.kernel_release().c_str());

  // It is a different kernel from the host's, with its own boot id.
  utsname host{};
  ::uname(&host);
  EXPECT_FALSE(check.kernel_release().empty());
  EXPECT_NE(check.kernel_release(), std::string(host.release));
  std::ifstream host_boot("/proc/sys/kernel/random/boot_id");
  std::string host_boot_id;
  std::getline(host_boot, host_boot_id);
  EXPECT_EQ(check.boot_id().size(), 36u);
  EXPECT_NE(check.boot_id(), host_boot_id);

  // The host end goes away and comes back (a sandboxer restart): the agent serves again, and it
  // is the same boot.
  lt.Sync([&] { client.reset(); });
  v1::CheckResponse again;
  client = ConnectAndCheck(lt, vm, &again, 30s);
  ASSERT_NE(client, nullptr) << "agent did not come back after reconnect; console:\n"
                             << vm.Console();
  EXPECT_EQ(again.boot_id(), check.boot_id());
  EXPECT_GT(again.uptime_ns(), check.uptime_ns());

  // Unknown methods are clear errors, and the agent keeps serving.
  auto bad = client->CallSync(kAgent, "NoSuchMethod", "");
  EXPECT_EQ(bad.error().code(), Code::kUnimplemented);
  EXPECT_TRUE(client->CallSyncTyped<v1::CheckResponse>(kAgent, "Check", v1::CheckRequest()).ok());

  // DestroySandbox powers the VM off: QEMU exits by itself.
  auto destroyed = client->CallSyncTyped<google::protobuf::Empty>(kAgent, "DestroySandbox",
                                                                  v1::DestroySandboxRequest());
  EXPECT_TRUE(destroyed.ok()) << destroyed.error().ToString();
  EXPECT_TRUE(vm.WaitExit(30s)) << "QEMU still running after DestroySandbox; console:\n"
                                << vm.Console();
  lt.Sync([&] { client.reset(); });
}

}  // namespace
}  // namespace peapod::vmtest
