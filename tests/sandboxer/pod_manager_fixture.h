// The PodManager fixture of the root tests: a PodManager over a FakeBackend whose "VMs" are the
// real peapod-agent as local processes, on a loop thread, with blocking helpers for its calls.
// Shared by tests/sandboxer/pod_manager_test.cc and the hostile group (tests/hostile/).
#pragma once

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <future>
#include <memory>
#include <string>

#include <gtest/gtest.h>

#include "common/base/unique_fd.h"
#include "common/ttrpc/client.h"
#include "peapod/agent/v1/agent.pb.h"
#include "sandboxer/pods.h"
#include "sandboxer/storage.h"
#include "tests/sandboxer/fake_backend.h"
#include "tests/unit/loop_fixture.h"

namespace peapod::sandboxer {

namespace fs = std::filesystem;
namespace v1 = peapod::agent::v1;
using namespace std::chrono_literals;
using testing::FakeBackend;

constexpr auto kReplyTimeout = 120s;

#define ASSERT_OK(expr)                                                 \
  do {                                                                  \
    auto&& pp_r = (expr);                                               \
    ASSERT_TRUE(pp_r.ok()) << #expr << ": " << pp_r.error().ToString(); \
  } while (0)

inline std::string Domain(const std::string& id) { return "peapod-" + id; }

inline PodOptions InNetns(const std::string& netns) {
  PodOptions o;
  o.netns = netns;
  return o;
}

class PodManagerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (::geteuid() != 0) GTEST_SKIP() << "needs root (peapod-agent in local mode)";
    if (::access("/usr/bin/crun", X_OK) != 0) GTEST_SKIP() << "crun is not installed";
    if (::access(PEAPOD_AGENT_BINARY, X_OK) != 0) {
      GTEST_SKIP() << PEAPOD_AGENT_BINARY << " is not built";
    }
    dir_ = (fs::temp_directory_path() / ("peapod-pmtest-" + std::to_string(::getpid()))).string();
    fs::remove_all(dir_);
    fs::create_directories(dir_);
    cfg_.state_dir = dir_ + "/state";
    cfg_.run_dir = dir_ + "/run";
    cfg_.image_dir = dir_ + "/images";
    cfg_.accel = "tcg";
    cfg_.boot_timeout_seconds = 30;
    backend_ = std::make_unique<FakeBackend>(PEAPOD_AGENT_BINARY, dir_ + "/vms");
    lt_ = std::make_unique<peapod::testing::LoopThread>();
    auto r = NewManager();
    ASSERT_TRUE(r.ok()) << r.error().ToString();
  }

  void TearDown() override {
    DropManager();
    if (HasFailure() && backend_) {
      for (const auto& e : fs::recursive_directory_iterator(dir_, ec_)) {
        auto p = e.path().string();
        if (p.ends_with(".log")) {
          std::ifstream f(p);
          std::printf("--- %s\n%s\n", p.c_str(),
                      std::string(std::istreambuf_iterator<char>(f), {}).c_str());
        }
      }
    }
    backend_.reset();  // kills what is left
    lt_.reset();
    // Pods left running keep their share mounted: unmount (by fd) before deleting.
    if (!dir_.empty()) (void)RemoveTreeSafely(cfg_.run_dir);
    if (!dir_.empty()) fs::remove_all(dir_, ec_);
  }

  // A sandboxer (re)starting: a PodManager over the backend, recovered from the state dir.
  Result<void> NewManager() {
    lt_->Sync([&] { pm_ = std::make_unique<PodManager>(lt_->loop(), cfg_, backend_.get()); });
    PodManager* pm = pm_.get();
    backend_->SetOnStopped([pm](const std::string& name) { pm->VmStopped(name); });
    return lt_->Sync([&] { return pm_->Recover(); });
  }

  // The sandboxer going away (as on SIGTERM): waiters answered, pods left running.
  void DropManager() {
    if (!pm_) return;
    backend_->SetOnStopped(nullptr);
    lt_->Sync([&] {
      pm_->CancelWaiters();
      pm_.reset();
    });
  }

  // Runs op(reply) on the loop and waits for the reply.
  template <typename T, typename Op>
  Result<T> OnLoop(Op op) {
    auto f = OnLoopAsync<T>(std::move(op));
    if (f.wait_for(kReplyTimeout) != std::future_status::ready) {
      return Error(Code::kDeadlineExceeded, "no reply from the PodManager");
    }
    return f.get();
  }
  template <typename T, typename Op>
  std::future<Result<T>> OnLoopAsync(Op op) {
    auto p = std::make_shared<std::promise<Result<T>>>();
    auto f = p->get_future();
    lt_->loop()->Post([op = std::move(op), p]() mutable {
      op([p](Result<T> r) { p->set_value(std::move(r)); });
    });
    return f;
  }

  Result<void> Create(const std::string& id, PodOptions opts = {}) {
    return OnLoop<void>([pm = pm_.get(), id, opts](auto done) { pm->Create(id, opts, done); });
  }
  Result<PodStatus> Start(const std::string& id) {
    return OnLoop<PodStatus>([pm = pm_.get(), id](auto done) { pm->Start(id, done); });
  }
  Result<void> Stop(const std::string& id, uint32_t timeout = 5) {
    return OnLoop<void>([pm = pm_.get(), id, timeout](auto done) { pm->Stop(id, timeout, done); });
  }
  Result<void> Shutdown(const std::string& id) {
    return OnLoop<void>([pm = pm_.get(), id](auto done) { pm->Shutdown(id, done); });
  }
  std::future<Result<PodExit>> WaitAsync(const std::string& id) {
    return OnLoopAsync<PodExit>([pm = pm_.get(), id](auto done) { pm->Wait(id, done); });
  }
  Result<PodStatus> Status(const std::string& id) {
    return lt_->Sync([&] { return pm_->Status(id); });
  }

  // Asks the agent behind a pod's address (ttrpc+unix://...) for Check, as a shim would.
  Result<void> CheckAgent(const std::string& address) {
    constexpr std::string_view kScheme = "ttrpc+unix://";
    if (address.rfind(kScheme, 0) != 0) return Error::Invalid("address {}", address);
    PP_ASSIGN_OR_RETURN(auto fd, ConnectUnix(address.substr(kScheme.size())));
    auto client = lt_->Sync([&] { return ttrpc::Client::Create(lt_->loop(), std::move(fd)); });
    if (!client.ok()) return std::move(client).error();
    ttrpc::CallOptions opts;
    opts.timeout = 10s;
    auto r = (*client)->CallSyncTyped<v1::CheckResponse>("peapod.agent.v1.Agent", "Check",
                                                         v1::CheckRequest(), opts);
    lt_->Sync([&] { client->reset(); });
    if (!r.ok()) return std::move(r).error();
    return Ok();
  }

  std::string AgentSocket(const std::string& id) {
    return cfg_.run_dir + "/pods/" + id + "/agent.sock";
  }
  std::string RunDir(const std::string& id) { return cfg_.run_dir + "/pods/" + id; }
  std::string RecordDir(const std::string& id) { return cfg_.state_dir + "/pods/" + id; }

  // Create + Start, asserting both work.
  void StartPod(const std::string& id, PodStatus* out = nullptr) {
    ASSERT_OK(Create(id));
    auto s = Start(id);
    ASSERT_TRUE(s.ok()) << s.error().ToString();
    ASSERT_TRUE(s->ready);
    if (out) *out = *s;
  }

  std::string dir_;
  std::error_code ec_;
  Config cfg_;
  std::unique_ptr<FakeBackend> backend_;
  std::unique_ptr<peapod::testing::LoopThread> lt_;
  std::unique_ptr<PodManager> pm_;
};

}  // namespace peapod::sandboxer
