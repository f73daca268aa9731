// containerd-shim-peapod-v2 as containerd runs it, without containerd or a pod: `start` in a
// bundle, the task API over the printed address, bad input answered with errors that say what
// to fix (and nothing created), Shutdown, `delete`.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <thread>

#include <google/protobuf/empty.pb.h>

#include "common/ttrpc/client.h"
#include "containerd/runtime/task/v2/shim.pb.h"
#include "tests/unit/loop_fixture.h"

namespace peapod::shim {
namespace {

namespace fs = std::filesystem;
namespace task = containerd::task::v2;
using namespace std::chrono_literals;

std::string RunShell(const std::string& cmd, int* rc) {
  std::string out;
  FILE* p = ::popen(cmd.c_str(), "r");
  std::array<char, 4096> buf;
  size_t n;
  while (p && (n = std::fread(buf.data(), 1, buf.size(), p)) > 0) out.append(buf.data(), n);
  int st = p ? ::pclose(p) : -1;
  *rc = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return out;
}

TEST(ShimProcessTest, BadBundlesAndOptionsAreClearErrorsAndCreateNothing) {
  char tmpl[] = "/tmp/ppshim-XXXXXX";
  std::string dir = ::mkdtemp(tmpl);
  std::string bundle = dir + "/bundle";
  fs::create_directories(bundle);
  std::ofstream(bundle + "/config.json") << "{not json";
  std::string env =
      "PEAPOD_SHIM_SOCKET_DIR=" + dir + " PEAPOD_SANDBOXER_SOCKET=" + dir + "/no-sandboxer.sock ";
  std::string flags = " -namespace test -id c1 -address " + dir + "/containerd.sock ";
  int rc = -1;
  std::string address =
      RunShell("cd " + bundle + " && " + env + PEAPOD_SHIM_BINARY + flags + "start", &rc);
  ASSERT_EQ(rc, 0) << address;
  ASSERT_EQ(address.rfind("unix://" + dir + "/", 0), 0u) << address;
  std::string written;
  std::getline(std::ifstream(bundle + "/address"), written);
  EXPECT_EQ(written, address);

  peapod::testing::LoopThread lt;
  auto fd = ConnectUnix(address.substr(7));
  ASSERT_TRUE(fd.ok()) << fd.error().ToString();
  auto client = lt.Sync([&] { return *ttrpc::Client::Create(lt.loop(), std::move(*fd)); });
  ttrpc::CallOptions o;
  o.timeout = 30s;
  auto create = [&](const google::protobuf::Any* options) {
    task::CreateTaskRequest req;
    req.set_id("c1");
    req.set_bundle(bundle);
    if (options) *req.mutable_options() = *options;
    return client->CallSyncTyped<task::CreateTaskResponse>("containerd.task.v2.Task", "Create", req,
                                                           o);
  };

  auto bad_json = create(nullptr);
  ASSERT_FALSE(bad_json.ok());
  EXPECT_EQ(bad_json.error().code(), Code::kInvalidArgument) << bad_json.error().ToString();
  EXPECT_NE(bad_json.error().message().find("config.json"), std::string::npos);

  // A field of the wrong JSON type: an error naming it, and the shim lives on.
  std::ofstream(bundle + "/config.json", std::ios::trunc)
      << R"({"ociVersion": "1.0.2", "root": {"path": "rootfs"},
             "process": {"args": "sh", "cwd": "/", "user": {"uid": 0, "gid": 0}}})";
  auto wrong_type = create(nullptr);
  ASSERT_FALSE(wrong_type.ok());
  EXPECT_EQ(wrong_type.error().code(), Code::kInvalidArgument) << wrong_type.error().ToString();
  EXPECT_NE(wrong_type.error().message().find("process.args"), std::string::npos)
      << wrong_type.error().ToString();

  std::ofstream(bundle + "/config.json", std::ios::trunc)
      << R"({"ociVersion": "1.0.2", "root": {"path": "rootfs"},
             "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}}})";
  google::protobuf::Any foreign;
  foreign.set_type_url("example.com/some.Options");
  auto bad_options = create(&foreign);
  ASSERT_FALSE(bad_options.ok());
  EXPECT_EQ(bad_options.error().code(), Code::kInvalidArgument);
  EXPECT_NE(bad_options.error().message().find("runtime options"), std::string::npos)
      << bad_options.error().ToString();

  auto no_sandboxer = create(nullptr);
  ASSERT_FALSE(no_sandboxer.ok());
  EXPECT_NE(no_sandboxer.error().message().find("peapod-sandboxer"), std::string::npos)
      << no_sandboxer.error().ToString();

  // No task was created by any of it.
  task::StateRequest st;
  st.set_id("c1");
  auto state =
      client->CallSyncTyped<task::StateResponse>("containerd.task.v2.Task", "State", st, o);
  EXPECT_EQ(state.error().code(), Code::kNotFound);

  task::ShutdownRequest sd;
  sd.set_id("c1");
  sd.set_now(true);
  EXPECT_TRUE(
      client->CallSyncTyped<google::protobuf::Empty>("containerd.task.v2.Task", "Shutdown", sd, o)
          .ok());
  lt.Sync([&] { client.reset(); });
  for (int i = 0; i < 50 && fs::exists(address.substr(7)); ++i) std::this_thread::sleep_for(100ms);
  EXPECT_FALSE(fs::exists(address.substr(7))) << "the shim did not exit";

  // containerd's cleanup after a dead shim: a DeleteResponse on stdout, exit 0, even with no
  // sandboxer to ask.
  std::string deleted = RunShell(
      "cd " + bundle + " && " + env + PEAPOD_SHIM_BINARY + flags + "-bundle " + bundle + " delete",
      &rc);
  EXPECT_EQ(rc, 0);
  task::DeleteResponse resp;
  ASSERT_TRUE(resp.ParseFromString(deleted));
  EXPECT_EQ(resp.exit_status(), 137u);

  // Again with a sandboxer that answers every call with an error: the cleanup's warnings go to
  // stderr, and stdout still holds nothing but the DeleteResponse (a warning on stdout made
  // containerd report a killed shim's container as exited 255).
  std::ofstream(bundle + "/config.json", std::ios::trunc)
      << R"({"ociVersion": "1.0.2", "root": {"path": "rootfs"},
             "process": {"args": ["sh"], "cwd": "/", "user": {"uid": 0, "gid": 0}}})";
  auto listener = ListenUnix(dir + "/useless-sandboxer.sock");
  ASSERT_TRUE(listener.ok()) << listener.error().ToString();
  auto useless = std::make_unique<ttrpc::Server>(lt.loop());
  lt.Sync([&] { ASSERT_TRUE(useless->ServeListener(std::move(*listener)).ok()); });
  std::string warned = RunShell("cd " + bundle + " && PEAPOD_SHIM_SOCKET_DIR=" + dir +
                                    " PEAPOD_SANDBOXER_SOCKET=" + dir + "/useless-sandboxer.sock " +
                                    PEAPOD_SHIM_BINARY + flags + "-bundle " + bundle +
                                    " delete 2>" + dir + "/delete.err",
                                &rc);
  EXPECT_EQ(rc, 0);
  task::DeleteResponse resp2;
  EXPECT_TRUE(resp2.ParseFromString(warned)) << "stdout: " << warned;
  EXPECT_EQ(resp2.exit_status(), 137u);
  std::ifstream err_in(dir + "/delete.err");
  std::string err((std::istreambuf_iterator<char>(err_in)), std::istreambuf_iterator<char>());
  EXPECT_NE(err.find("shim delete"), std::string::npos) << "no warning on stderr: " << err;
  lt.Sync([&] { useless.reset(); });
  std::error_code ec;
  fs::remove_all(dir, ec);
}

}  // namespace
}  // namespace peapod::shim
