// What the shim hands the guest for bind volumes, and what it tells containerd with -info.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include <nlohmann/json.hpp>

#include "common/base/mountinfo.h"
#include "containerd/types/introspection.pb.h"
#include "shim/runtime_info.h"
#include "shim/volumes.h"

namespace peapod::shim {
namespace {

using Json = nlohmann::json;

// A mount table with a volume source that has a tmpfs (rw) and a read-only bind below it, a
// look-alike sibling (/vol/data2) that is not below it, and a blank escaped in a path.
std::string WriteTable() {
  std::string path = ::testing::TempDir() + "/mountinfo-" + std::to_string(::getpid());
  std::ofstream(path) << "21 1 0:20 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
                         "30 21 0:30 / /vol/data rw,relatime shared:2 - ext4 /dev/vdb rw\n"
                         "31 30 0:31 / /vol/data/tmp rw,nosuid - tmpfs none rw\n"
                         "32 30 0:32 /x /vol/data/ro\\040dir ro,relatime - ext4 /dev/vdc rw\n"
                         "33 31 0:33 / /vol/data/tmp/inner rw - tmpfs none rw\n"
                         "34 21 0:34 / /vol/data2 rw - tmpfs none rw\n";
  return path;
}

TEST(MountInfoTest, UnescapesAndReadsFlags) {
  auto table = WriteTable();
  auto below = MountsUnder("/vol/data", /*below_only=*/true, table);
  ASSERT_EQ(below.size(), 3u);
  EXPECT_EQ(below[0].path, "/vol/data/tmp");
  EXPECT_FALSE(below[0].readonly);
  EXPECT_EQ(below[1].path, "/vol/data/ro dir");
  EXPECT_TRUE(below[1].readonly);
  EXPECT_EQ(below[2].path, "/vol/data/tmp/inner");
  EXPECT_EQ(MountsUnder("/vol/data/", /*below_only=*/false, table).size(), 4u);
  EXPECT_TRUE(ReadMountTable("/nonexistent/mountinfo").empty());
  std::remove(table.c_str());
}

TEST(WithSubmountsTest, MountsBelowAVolumeFollowItWithTheirOwnFlags) {
  Json mounts = Json::parse(R"([
    {"destination": "/proc", "type": "proc", "source": "proc"},
    {"destination": "/mnt", "type": "bind", "source": "/run/peapod/share/volumes/c1/0",
     "options": ["rbind", "rprivate", "ro"]},
    {"destination": "/data", "type": "bind", "source": "/run/peapod/share/volumes/c1/4",
     "options": ["rbind", "rprivate", "rw"]}
  ])");
  sandboxer::v1::SharedSubmounts subs;
  auto add = [&](const char* path, const char* guest, bool ro) {
    auto* m = subs.add_submounts();
    m->set_path(path);
    m->set_guest_path(guest);
    m->set_readonly(ro);
  };
  add("/tmp", "/run/peapod/share/volumes/c1/1", false);
  add("/ro dir", "/run/peapod/share/volumes/c1/2", true);
  add("/tmp/inner", "/run/peapod/share/volumes/c1/3", false);
  Json out = WithSubmounts(mounts, {{1, subs}, {2, {}}});
  ASSERT_EQ(out.size(), 6u) << out.dump(2);
  EXPECT_EQ(out[1]["destination"], "/mnt");
  EXPECT_EQ(out[2]["destination"], "/mnt/tmp");
  EXPECT_EQ(out[2]["source"], "/run/peapod/share/volumes/c1/1");
  EXPECT_EQ(out[2]["options"], Json::parse(R"(["rbind", "rw"])"));
  EXPECT_EQ(out[3]["destination"], "/mnt/ro dir");
  EXPECT_EQ(out[3]["options"], Json::parse(R"(["rbind", "ro"])"));
  EXPECT_EQ(out[4]["destination"], "/mnt/tmp/inner");  // after its parent
  EXPECT_EQ(out[5]["destination"], "/data");
}

TEST(RuntimeInfoTest, AdvertisesRecursiveReadOnlyButNotUserNamespaces) {
  containerd::types::RuntimeInfo info;
  ASSERT_TRUE(info.ParseFromString(RuntimeInfoBytes("1.2.3")));
  EXPECT_EQ(info.name(), "io.containerd.peapod.v2");
  EXPECT_EQ(info.version().version(), "1.2.3");
  EXPECT_EQ(info.features().type_url(),
            "types.containerd.io/opencontainers/runtime-spec/1/features/Features");
  Json f = Json::parse(info.features().value());
  auto opts = f["mountOptions"].get<std::vector<std::string>>();
  EXPECT_NE(std::find(opts.begin(), opts.end(), "rro"), opts.end());
  auto ns = f["linux"]["namespaces"].get<std::vector<std::string>>();
  EXPECT_EQ(std::find(ns.begin(), ns.end(), "user"), ns.end());
  EXPECT_FALSE(f["linux"]["mountExtensions"]["idmap"]["enabled"].get<bool>());
}

TEST(RuntimeInfoTest, ShimBinaryPrintsItForDashInfo) {
  std::string cmd = std::string(PEAPOD_SHIM_BINARY) + " -info </dev/null";
  FILE* p = ::popen(cmd.c_str(), "r");
  ASSERT_NE(p, nullptr);
  std::string out;
  char buf[4096];
  for (size_t n; (n = std::fread(buf, 1, sizeof buf, p)) > 0;) out.append(buf, n);
  ASSERT_EQ(::pclose(p), 0);
  containerd::types::RuntimeInfo info;
  ASSERT_TRUE(info.ParseFromString(out));
  EXPECT_EQ(info.name(), "io.containerd.peapod.v2");
}

}  // namespace
}  // namespace peapod::shim
