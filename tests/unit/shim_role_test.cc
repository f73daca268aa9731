// How the shim tells a container's pod from its OCI spec (containerd's CRI annotations).
#include <gtest/gtest.h>

#include "shim/task_service.h"

namespace peapod::shim {
namespace {

TEST(RoleFromSpecTest, PauseMemberAndPlainContainers) {
  auto pause = RoleFromSpec("sb1", R"({"ociVersion": "1.0.2", "root": {"path": "rootfs"},
      "hostname": "web-0",
      "annotations": {"io.kubernetes.cri.container-type": "sandbox",
                      "io.kubernetes.cri.sandbox-id": "sb1"},
      "linux": {"namespaces": [{"type": "pid"},
                               {"type": "network", "path": "/var/run/netns/cni-1"}]}})");
  ASSERT_TRUE(pause.ok()) << pause.error().ToString();
  EXPECT_EQ(pause->kind, PodRole::kPause);
  EXPECT_EQ(pause->pod_id, "sb1");
  EXPECT_EQ(pause->netns, "/var/run/netns/cni-1");
  EXPECT_EQ(pause->hostname, "web-0");

  auto member = RoleFromSpec("c1", R"({"ociVersion": "1.0.2", "root": {"path": "rootfs"},
      "annotations": {
      "io.kubernetes.cri.container-type": "container", "io.kubernetes.cri.sandbox-id": "sb1"}})");
  ASSERT_TRUE(member.ok());
  EXPECT_EQ(member->kind, PodRole::kMember);
  EXPECT_EQ(member->pod_id, "sb1");

  auto plain = RoleFromSpec("t1", R"({"ociVersion": "1.0.2", "root": {"path": "rootfs"},
      "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}}})");
  ASSERT_TRUE(plain.ok());
  EXPECT_EQ(plain->kind, PodRole::kPlain);
  EXPECT_EQ(plain->pod_id, "t1");
  EXPECT_TRUE(plain->netns.empty());

  auto bad = RoleFromSpec("t1", "{not json");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.error().code(), Code::kInvalidArgument);
  EXPECT_NE(bad.error().message().find("config.json"), std::string::npos);
}

}  // namespace
}  // namespace peapod::shim
