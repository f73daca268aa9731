// peapod-agent in local mode: the real agent binary as a host process serving a unix socket,
// running real crun containers on the host's kernel (no VM, no cgroup limits). Covers the
// agent's request handling, stdio and error paths in seconds; what needs the guest kernel
// (cgroups, OOM, network) is covered by the vm tests.
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>

#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include "tests/common/agent_client.h"
#include "tests/unit/loop_fixture.h"

namespace peapod::agenttest {
namespace {

namespace fs = std::filesystem;

class LocalAgentTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (::geteuid() != 0) GTEST_SKIP() << "needs root (crun, mounts)";
    if (::access("/usr/bin/crun", X_OK) != 0) GTEST_SKIP() << "crun is not installed";
    dir_ = fs::temp_directory_path() / ("peapod-localagent-" + std::to_string(::getpid()));
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    if (auto why = BuildBusyboxRoot(dir_ + "/busybox"); !why.empty()) GTEST_SKIP() << why;
    std::string sock = dir_ + "/agent.sock";
    pid_ = ::fork();
    if (pid_ == 0) {
      std::string log = dir_ + "/agent.log";
      int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      ::dup2(fd, 1);
      ::dup2(fd, 2);
      // crun at fixed addresses, as in a TCG guest: the containers must not inherit that.
      ::execl(PEAPOD_AGENT_BINARY, PEAPOD_AGENT_BINARY, "--listen", sock.c_str(), "--run-dir",
              (dir_ + "/run").c_str(), "--fixed-helper-addresses", "on", "--log-level", "debug",
              nullptr);
      ::_exit(127);
    }
    std::shared_ptr<ttrpc::Client> client;
    for (int i = 0; i < 500 && !client; ++i) {
      if (auto fd = ConnectUnix(sock); fd.ok()) {
        client = lt_.Sync([&] { return *ttrpc::Client::Create(lt_.loop(), std::move(*fd)); });
      } else {
        std::this_thread::sleep_for(10ms);
      }
    }
    ASSERT_NE(client, nullptr) << "agent did not listen; log:\n" << Log();
    v1::Storage layer;
    layer.set_driver(v1::Storage::BIND);
    layer.set_source(dir_ + "/busybox");
    layer.add_options("ro");
    layer.set_mount_point(dir_ + "/run/layers/busybox");
    agent_ = std::make_unique<AgentClient>(std::move(client), layer);
  }

  void TearDown() override {
    if (agent_) lt_.Sync([&] { agent_.reset(); });
    if (pid_ > 0) {
      // A clean exit on SIGTERM: also how sanitizer reports from the agent fail the test.
      ::kill(pid_, SIGTERM);
      int status = 0;
      ::waitpid(pid_, &status, 0);
      EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "agent exit status " << status;
    }
    if (HasFailure() && !dir_.empty()) std::printf("agent log:\n%s\n", Log().c_str());
    if (!dir_.empty()) fs::remove_all(dir_);
  }

  std::string Log() {
    std::ifstream f(dir_ + "/agent.log");
    return std::string(std::istreambuf_iterator<char>(f), {});
  }

  peapod::testing::LoopThread lt_;
  std::string dir_;
  pid_t pid_ = -1;
  std::unique_ptr<AgentClient> agent_;
};

TEST_F(LocalAgentTest, RunsAContainerWithItsOutputAndExitCode) {
  auto pid = agent_->Create("c1", Spec({"sh", "-c", "echo out; echo err >&2; exit 3"}));
  ASSERT_TRUE(pid.ok()) << pid.error().ToString();
  EXPECT_GT(*pid, 0u);
  EXPECT_EQ(agent_->State("c1"), v1::StateContainerResponse::CREATED);
  ASSERT_TRUE(agent_->Start("c1").ok());
  EXPECT_EQ(agent_->ReadAll("c1"), "out\n");
  EXPECT_EQ(agent_->ReadAll("c1", "", true), "err\n");
  EXPECT_EQ(*agent_->Wait("c1"), 3u);
  EXPECT_EQ(agent_->State("c1"), v1::StateContainerResponse::STOPPED);
  // Waiting again answers at once with the same status.
  EXPECT_EQ(*agent_->Wait("c1"), 3u);
  ASSERT_TRUE(agent_->Remove("c1").ok());
  EXPECT_EQ(agent_->State("c1"), v1::StateContainerResponse::UNKNOWN);
}

TEST_F(LocalAgentTest, StdinReachesTheProcessAndCloseGivesItEof) {
  ASSERT_TRUE(agent_->Create("cat", Spec({"cat"}), /*stdin=*/true).ok());
  ASSERT_TRUE(agent_->Start("cat").ok());
  v1::WriteStreamRequest w;
  w.set_container_id("cat");
  w.set_data("ping\n");
  auto n = agent_->Sync(&agentapi::AgentClient::WriteStdin, w);
  ASSERT_TRUE(n.ok()) << n.error().ToString();
  EXPECT_EQ(n->len(), 5u);
  v1::ProcessRequest close;
  close.set_container_id("cat");
  ASSERT_TRUE(agent_->Sync(&agentapi::AgentClient::CloseStdin, close).ok());
  EXPECT_EQ(agent_->ReadAll("cat"), "ping\n");
  EXPECT_EQ(*agent_->Wait("cat"), 0u);
  ASSERT_TRUE(agent_->Remove("cat").ok());
}

TEST_F(LocalAgentTest, AChattyContainerDoesNotStarveAnother) {
  // "chatty" writes without end and nobody reads it: its buffer fills and it blocks, while the
  // quiet container's output still arrives promptly over the same connection.
  ASSERT_TRUE(agent_->Create("chatty", Spec({"sh", "-c", "while :; do echo spam; done"})).ok());
  ASSERT_TRUE(agent_->Start("chatty").ok());
  std::this_thread::sleep_for(300ms);
  ASSERT_TRUE(agent_->Create("quiet", Spec({"sh", "-c", "echo hello; exit 0"})).ok());
  ASSERT_TRUE(agent_->Start("quiet").ok());
  auto start = std::chrono::steady_clock::now();
  EXPECT_EQ(agent_->ReadAll("quiet"), "hello\n");
  EXPECT_LT(std::chrono::steady_clock::now() - start, 20s);
  EXPECT_EQ(*agent_->Wait("quiet"), 0u);
  // The chatty one's output is intact when finally read.
  auto first = agent_->ReadOnce("chatty");
  ASSERT_TRUE(first.ok());
  EXPECT_EQ(first->data().substr(0, 5), "spam\n");
  EXPECT_TRUE(agent_->Remove("chatty", true).ok());
  EXPECT_TRUE(agent_->Remove("quiet").ok());
}

TEST_F(LocalAgentTest, ExecWithAndWithoutATerminal) {
  ASSERT_TRUE(agent_->Create("svc", Spec({"sleep", "100"})).ok());
  ASSERT_TRUE(agent_->Start("svc").ok());
  ASSERT_TRUE(agent_->Exec("svc", "e1", {"sh", "-c", "echo from-exec; exit 5"}).ok());
  EXPECT_EQ(agent_->ReadAll("svc", "e1"), "from-exec\n");
  EXPECT_EQ(*agent_->Wait("svc", "e1"), 5u);
  auto tty = agent_->Exec("svc", "t1", {"sh", "-c", "tty"}, true);
  ASSERT_TRUE(tty.ok()) << tty.error().ToString();
  EXPECT_NE(agent_->ReadAll("svc", "t1").find("/dev/pts/"), std::string::npos);
  EXPECT_EQ(*agent_->Wait("svc", "t1"), 0u);
  // A terminal process has no separate stderr.
  EXPECT_EQ(agent_->ReadOnce("svc", "t1", true).error().code(), Code::kFailedPrecondition);
  // A running exec cannot be deleted; a finished one can, once.
  ASSERT_TRUE(agent_->Exec("svc", "long", {"sleep", "100"}).ok());
  v1::DeleteProcessRequest del;
  del.set_container_id("svc");
  del.set_exec_id("long");
  EXPECT_EQ(agent_->Sync(&agentapi::AgentClient::DeleteProcess, del).error().code(),
            Code::kFailedPrecondition);
  ASSERT_TRUE(agent_->Signal("svc", "long", SIGKILL).ok());
  EXPECT_EQ(*agent_->Wait("svc", "long"), 128u + SIGKILL);
  EXPECT_TRUE(agent_->Sync(&agentapi::AgentClient::DeleteProcess, del).ok());
  EXPECT_EQ(agent_->Sync(&agentapi::AgentClient::DeleteProcess, del).error().code(),
            Code::kNotFound);
  EXPECT_EQ(agent_->Signal("svc", "long", SIGTERM).error().code(), Code::kNotFound);
  EXPECT_TRUE(agent_->Remove("svc", true).ok());
}

// crun runs at fixed addresses (--fixed-helper-addresses on), which its children would inherit;
// a container's init and its execs must still have address randomization.
TEST_F(LocalAgentTest, ContainersKeepAddressRandomizationWhileCrunRunsWithout) {
  ASSERT_TRUE(
      agent_->Create("c", Spec({"sh", "-c", "cat /proc/self/personality; sleep 100"})).ok());
  ASSERT_TRUE(agent_->Start("c").ok());
  auto first = agent_->ReadOnce("c");
  ASSERT_TRUE(first.ok()) << first.error().ToString();
  EXPECT_EQ(first->data(), "00000000\n");
  ASSERT_TRUE(agent_->Exec("c", "e", {"cat", "/proc/self/personality"}).ok());
  EXPECT_EQ(agent_->ReadAll("c", "e"), "00000000\n");
  EXPECT_EQ(*agent_->Wait("c", "e"), 0u);
  EXPECT_TRUE(agent_->Remove("c", true).ok());
  EXPECT_NE(Log().find("crun runs at fixed addresses"), std::string::npos) << Log();

  // crun 1.8 skips a persona that is not an object (and crashes on one without a domain), so
  // the container would keep crun's fixed addresses: such specs are refused, and leave nothing.
  for (const char* bad : {R"("LINUX")", R"({})", R"({"domain": "PER_BSD"})"}) {
    auto spec = nlohmann::json::parse(Spec({"true"}));
    spec["linux"]["personality"] = nlohmann::json::parse(bad);
    auto r = agent_->Create("bad", spec.dump());
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_EQ(r.error().code(), Code::kInvalidArgument) << r.error().ToString();
    EXPECT_NE(r.error().message().find("linux.personality"), std::string::npos)
        << r.error().ToString();
  }
  // null is absent; LINUX32 is a persona of its own, also without the flag.
  for (const char* ok : {"null", R"({"domain": "LINUX32"})"}) {
    auto spec = nlohmann::json::parse(Spec({"cat", "/proc/self/personality"}));
    spec["linux"]["personality"] = nlohmann::json::parse(ok);
    ASSERT_TRUE(agent_->Create("p", spec.dump()).ok()) << ok;
    ASSERT_TRUE(agent_->Start("p").ok());
    EXPECT_EQ(agent_->ReadAll("p"), std::string(ok) == "null" ? "00000000\n" : "00000008\n");
    EXPECT_EQ(*agent_->Wait("p"), 0u);
    EXPECT_TRUE(agent_->Remove("p").ok());
  }
  EXPECT_TRUE(fs::is_empty(dir_ + "/run/containers"));
}

// The agent starts exec processes itself (podagent/exec.h), which must give the process crun
// exec would have given it. The same processes, once through the agent and once through a crun
// exec run by hand on the same container, print their identity, capabilities, limits,
// namespaces, environment, directory, umask, persona and seccomp: the two must match.
TEST_F(LocalAgentTest, AnExecTheAgentStartsIsTheOneCrunWouldStart) {
  std::ofstream(dir_ + "/busybox/etc/passwd")
      << "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n";
  auto spec = nlohmann::json::parse(Spec({"sleep", "100"}));
  spec["linux"]["seccomp"] = nlohmann::json::parse(R"({"defaultAction": "SCMP_ACT_ALLOW",
      "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO"}]})");
  ASSERT_TRUE(agent_->Create("svc", spec.dump()).ok());
  ASSERT_TRUE(agent_->Start("svc").ok());
  const std::string probe =
      "b=busybox; $b id; pwd; umask; $b env | $b sort; "
      "$b grep -E '^(Cap|NoNewPrivs|Seccomp|Groups|Uid|Gid)' /proc/self/status; "
      "cat /proc/self/personality; $b grep -E 'open files|processes' /proc/self/limits; "
      "for n in mnt pid ipc uts net cgroup; do readlink /proc/self/ns/$n; done; "
      "$b mkdir /tmp/probe-dir 2>/dev/null || echo mkdir refused; "
      "$b stat -L -c 'stdout owner %u' /proc/self/fd/1";
  auto user = nlohmann::json::parse(ProcessJson({"sh", "-c", probe}));
  user["user"] = {{"uid", 1000}, {"gid", 1000}, {"umask", 23}, {"additionalGids", {5, 10}}};
  user["cwd"] = "/bin";
  user["env"] = {"PATH=/bin", "A=1", "B=b", "A=2"};  // no HOME: from the container's passwd
  user["capabilities"] = {{"bounding", {"CAP_KILL", "CAP_CHOWN", "CAP_NET_BIND_SERVICE"}},
                          {"effective", {"CAP_KILL", "CAP_CHOWN"}},
                          {"permitted", {"CAP_KILL", "CAP_CHOWN"}},
                          {"inheritable", {"CAP_CHOWN"}},
                          {"ambient", {"CAP_CHOWN"}}};
  user["rlimits"] = {{{"type", "RLIMIT_NOFILE"}, {"hard", 1000}, {"soft", 900}},
                     {{"type", "RLIMIT_NPROC"}, {"hard", 500}, {"soft", 500}}};
  user["noNewPrivileges"] = true;
  auto root = nlohmann::json::parse(ProcessJson({"sh", "-c", probe}));
  root.erase("capabilities");  // the container's then
  root["noNewPrivileges"] = false;
  root["env"] = {"PATH=/usr/bin:/bin", "HOME=/custom"};

  int n = 0;
  for (const auto& process : {user, root}) {
    const std::string eid = "probe" + std::to_string(++n);
    v1::ExecProcessRequest req;
    req.set_container_id("svc");
    req.set_exec_id(eid);
    req.set_process(process.dump());
    auto started = agent_->Sync(&agentapi::AgentClient::ExecProcess, req);
    ASSERT_TRUE(started.ok()) << started.error().ToString();
    std::string by_agent = agent_->ReadAll("svc", eid);
    EXPECT_EQ(*agent_->Wait("svc", eid), 0u);

    const std::string file = dir_ + "/" + eid + ".json";
    std::ofstream(file) << process.dump();
    std::string cmd = "/usr/bin/crun --root=" + dir_ +
                      "/run/crun --cgroup-manager=disabled exec --process=" + file + " svc";
    std::string by_crun;
    if (FILE* f = ::popen(cmd.c_str(), "r")) {
      char buf[4096];
      for (size_t k; (k = std::fread(buf, 1, sizeof(buf), f)) > 0;) by_crun.append(buf, k);
      EXPECT_EQ(::pclose(f), 0) << cmd;
    }
    EXPECT_EQ(by_agent, by_crun) << "agent:\n" << by_agent << "\ncrun:\n" << by_crun;
    EXPECT_NE(by_agent.find("mkdir refused"), std::string::npos) << by_agent;
    EXPECT_NE(by_agent.find("Seccomp:\t2"), std::string::npos) << by_agent;
    if (n == 1) {
      for (const char* want :
           {"uid=1000(user) gid=1000 groups=5,10", "\n/bin\n", "\n0027\n", "A=2\n",
            "HOME=/home/user\n", "NoNewPrivs:\t1", "CapAmb:\t0000000000000001",
            "CapBnd:\t0000000000000421", "stdout owner 1000", "Max open files            900"}) {
        EXPECT_NE(by_agent.find(want), std::string::npos) << want << " in\n" << by_agent;
      }
    } else {
      EXPECT_NE(by_agent.find("uid=0(root) gid=0"), std::string::npos) << by_agent;
      EXPECT_NE(by_agent.find("HOME=/custom\n"), std::string::npos) << by_agent;
    }
  }
  EXPECT_NE(Log().find("exec probe1 in svc started by the agent"), std::string::npos) << Log();
  EXPECT_NE(Log().find("exec probe2 in svc started by the agent"), std::string::npos) << Log();

  // An exec has a session and process group of its own, not the agent's: kill(0, ...) in it
  // must not reach the agent or other execs.
  auto sleeper = agent_->Exec("svc", "sleeper", {"sleep", "100"});
  ASSERT_TRUE(sleeper.ok()) << sleeper.error().ToString();
  auto session_of = [](pid_t pid) {
    std::ifstream f("/proc/" + std::to_string(pid) + "/stat");
    std::string stat((std::istreambuf_iterator<char>(f)), {});
    std::istringstream rest(stat.substr(stat.rfind(')') + 2));
    std::string state, ppid, pgrp, sid;
    rest >> state >> ppid >> pgrp >> sid;
    return pgrp + "/" + sid;
  };
  EXPECT_NE(session_of(static_cast<pid_t>(*sleeper)), session_of(pid_));
  EXPECT_TRUE(agent_->Signal("svc", "sleeper", SIGKILL).ok());
  EXPECT_EQ(*agent_->Wait("svc", "sleeper"), 128u + SIGKILL);

  // A process that may have CAP_SYS_PTRACE could read the agent's child before its exec: crun
  // starts it, and every exec of that container after it.
  auto tracer = nlohmann::json::parse(ProcessJson({"true"}));
  tracer["capabilities"]["bounding"].push_back("CAP_SYS_PTRACE");
  v1::ExecProcessRequest traced;
  traced.set_container_id("svc");
  traced.set_exec_id("tracer");
  traced.set_process(tracer.dump());
  ASSERT_TRUE(agent_->Sync(&agentapi::AgentClient::ExecProcess, traced).ok());
  EXPECT_EQ(*agent_->Wait("svc", "tracer"), 0u);
  ASSERT_TRUE(agent_->Exec("svc", "after", {"true"}).ok());
  EXPECT_EQ(*agent_->Wait("svc", "after"), 0u);
  EXPECT_NE(Log().find("exec tracer in svc goes to crun: CAP_SYS_PTRACE"), std::string::npos)
      << Log();
  EXPECT_NE(Log().find("exec after in svc goes to crun: CAP_SYS_PTRACE"), std::string::npos)
      << Log();

  // What the agent cannot start goes wrong the same way crun's would: clearly.
  auto missing = agent_->Exec("svc", "nope", {"no-such-program"});
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.error().message().find("executable file `no-such-program` not found in $PATH"),
            std::string::npos)
      << missing.error().ToString();
  // The exec id is free again, and the container runs on.
  ASSERT_TRUE(agent_->Exec("svc", "nope", {"true"}).ok());
  EXPECT_EQ(*agent_->Wait("svc", "nope"), 0u);
  EXPECT_EQ(agent_->State("svc"), v1::StateContainerResponse::RUNNING);
  EXPECT_TRUE(agent_->Remove("svc", true).ok());
}

// The agent starts a created container itself, as `crun start` would: afterwards crun's own
// view of it must be the same, since crun exec, kill and delete rely on it.
TEST_F(LocalAgentTest, StartingLeavesTheContainerAsCrunStartWould) {
  ASSERT_TRUE(agent_->Create("svc", Spec({"sleep", "100"})).ok());
  const std::string fifo = dir_ + "/run/crun/svc/exec.fifo";
  ASSERT_TRUE(fs::exists(fifo)) << "crun create keeps no exec fifo where the agent looks for it";
  ASSERT_TRUE(agent_->Start("svc").ok());
  EXPECT_FALSE(fs::exists(fifo));
  std::string cmd = "/usr/bin/crun --root=" + dir_ + "/run/crun state svc";
  std::string state;
  if (FILE* f = ::popen(cmd.c_str(), "r")) {
    char buf[4096];
    for (size_t n; (n = std::fread(buf, 1, sizeof(buf), f)) > 0;) state.append(buf, n);
    ::pclose(f);
  }
  EXPECT_NE(state.find("\"status\": \"running\""), std::string::npos) << state;
  EXPECT_EQ(agent_->State("svc"), v1::StateContainerResponse::RUNNING);
  // The init really runs its process: an exec sees it.
  ASSERT_TRUE(agent_->Exec("svc", "ps", {"sh", "-c", "cat /proc/1/cmdline"}).ok());
  EXPECT_EQ(agent_->ReadAll("svc", "ps"), std::string("sleep\0"
                                                      "100\0",
                                                      10));
  EXPECT_EQ(*agent_->Wait("svc", "ps"), 0u);
  EXPECT_TRUE(agent_->Remove("svc", true).ok());

  // A container whose init died before its start: a clear error, not a hang.
  auto pid = agent_->Create("gone", Spec({"sleep", "100"}));
  ASSERT_TRUE(pid.ok());
  ::kill(static_cast<pid_t>(*pid), SIGKILL);
  for (int i = 0; i < 200 && agent_->State("gone") != v1::StateContainerResponse::STOPPED; ++i) {
    std::this_thread::sleep_for(10ms);
  }
  auto start = agent_->Start("gone");
  ASSERT_FALSE(start.ok());
  EXPECT_NE(start.error().message().find("gone"), std::string::npos) << start.error().ToString();
  EXPECT_TRUE(agent_->Remove("gone", true).ok());
}

TEST_F(LocalAgentTest, BadRequestsGetClearErrorsAndChangeNothing) {
  auto bad_json = agent_->Create("bad", "{not json");
  ASSERT_FALSE(bad_json.ok());
  EXPECT_EQ(bad_json.error().code(), Code::kInvalidArgument);
  EXPECT_NE(bad_json.error().message().find("config.json"), std::string::npos);
  auto bad_id = agent_->Create("../escape", Spec({"true"}));
  EXPECT_EQ(bad_id.error().code(), Code::kInvalidArgument);
  auto bad_cmd = agent_->Create("nocmd", Spec({"/bin/does-not-exist"}));
  // crun reports a missing executable at create or start, never silently.
  if (bad_cmd.ok()) {
    EXPECT_FALSE(agent_->Start("nocmd").ok());
    EXPECT_TRUE(agent_->Remove("nocmd", true).ok());
  } else {
    EXPECT_NE(bad_cmd.error().message().find("does-not-exist"), std::string::npos)
        << bad_cmd.error().message();
  }
  EXPECT_EQ(agent_->Start("nosuch").error().code(), Code::kNotFound);
  EXPECT_EQ(agent_->Wait("nosuch").error().code(), Code::kNotFound);
  EXPECT_EQ(agent_->Remove("nosuch").error().code(), Code::kNotFound);

  ASSERT_TRUE(agent_->Create("dup", Spec({"sleep", "100"})).ok());
  EXPECT_EQ(agent_->Create("dup", Spec({"true"})).error().code(), Code::kAlreadyExists);
  EXPECT_EQ(agent_->Exec("dup", "e", {"true"}).error().code(), Code::kFailedPrecondition)
      << "exec before start";
  ASSERT_TRUE(agent_->Start("dup").ok());
  EXPECT_EQ(agent_->Start("dup").error().code(), Code::kFailedPrecondition);
  EXPECT_EQ(agent_->Remove("dup").error().code(), Code::kFailedPrecondition);
  // Garbage bytes for a request.
  auto garbage = agent_->raw()->CallSync(kAgent, "CreateContainer", "\xff\xff\xff");
  EXPECT_EQ(garbage.error().code(), Code::kInvalidArgument);
  // Still serving, and the failed creates left nothing behind: the ids are free again.
  EXPECT_TRUE(agent_->Sync(&agentapi::AgentClient::Check, v1::CheckRequest()).ok());
  ASSERT_TRUE(agent_->Create("bad", Spec({"true"})).ok());
  EXPECT_TRUE(agent_->Remove("bad", true).ok());
  EXPECT_TRUE(agent_->Remove("dup", true).ok());
  EXPECT_TRUE(fs::is_empty(dir_ + "/run/containers"));
}

}  // namespace
}  // namespace peapod::agenttest
