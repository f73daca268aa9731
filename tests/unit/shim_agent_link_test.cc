// AgentLink on its loop: calls that may be re-sent survive a lost connection (the sandboxer's
// restart) and reach the agent at its new address; they end when the pod is gone or the link
// stops; calls sent once give up after their patience. No threads but the loop's.
#include "shim/agent_link.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <future>

#include "common/agentapi/agent_client.h"
#include "tests/unit/loop_fixture.h"

namespace peapod::shim {
namespace {

namespace fs = std::filesystem;
namespace v1 = peapod::agent::v1;
using namespace std::chrono_literals;

// A fake agent on a unix socket: WaitProcess answers with `status`, unless `hold` (then the
// call is kept unanswered until the server goes).
struct FakeAgent {
  FakeAgent(EventLoop* loop, const std::string& path, uint32_t status, bool hold)
      : server(std::make_unique<ttrpc::Server>(loop)) {
    ttrpc::RegisterTyped<v1::WaitProcessRequest, v1::WaitProcessResponse>(
        *server, agentapi::kService, "WaitProcess",
        [this, status, hold](const ttrpc::CallContext&, v1::WaitProcessRequest&&,
                             ttrpc::TypedResponder<v1::WaitProcessResponse> reply) {
          ++calls;
          if (unavailable) return reply(Error(Code::kUnavailable, "no channel to the guest"));
          if (hold) return held.push_back(reply);
          v1::WaitProcessResponse r;
          r.set_exit_status(status);
          reply(r);
        });
    auto l = ListenUnix(path);
    EXPECT_TRUE(l.ok());
    EXPECT_TRUE(server->ServeListener(std::move(*l)).ok());
  }
  std::unique_ptr<ttrpc::Server> server;
  std::vector<ttrpc::TypedResponder<v1::WaitProcessResponse>> held;
  int calls = 0;
  bool unavailable = false;  // answer every call UNAVAILABLE, on a live connection
};

class AgentLinkTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/pplink-XXXXXX";
    dir_ = ::mkdtemp(tmpl);
  }
  void TearDown() override {
    lt_.Sync([&] {
      if (link_) link_->Stop();
      link_.reset();
      a_.reset();
      b_.reset();
    });
    fs::remove_all(dir_);
  }
  // A link whose Locate answers what `where` says at the time.
  void MakeLink(AgentLink::Backoff backoff = {std::chrono::milliseconds(10),
                                              std::chrono::milliseconds(50),
                                              std::chrono::milliseconds(300)}) {
    lt_.Sync([&] {
      link_ = AgentLink::Create(
          lt_.loop(),
          [this](auto done) {
            ++locates_;
            done(where_);
          },
          backoff);
    });
  }
  // Sends WaitProcess through the typed client over the link; the future holds its answer.
  std::future<Result<v1::WaitProcessResponse>> Wait() {
    auto p = std::make_shared<std::promise<Result<v1::WaitProcessResponse>>>();
    auto f = p->get_future();
    lt_.Sync([&] {
      agentapi::AgentClient agent([link = link_](const char* method, std::string payload,
                                                 auto timeout, agentapi::Resend resend,
                                                 ttrpc::Client::Callback done) {
        if (resend == agentapi::Resend::kSafe) {
          link->CallRetrying(method, std::move(payload), timeout, std::move(done));
        } else {
          link->CallOnce(method, std::move(payload), timeout, std::move(done));
        }
      });
      agent.WaitProcess(v1::WaitProcessRequest(), [p](auto r) { p->set_value(std::move(r)); });
    });
    return f;
  }

  // A WaitProcess that agent A (at a.sock) holds unanswered.
  std::future<Result<v1::WaitProcessResponse>> WaitHeldByA() {
    lt_.Sync([&] {
      a_ = std::make_unique<FakeAgent>(lt_.loop(), dir_ + "/a.sock", 0, /*hold=*/true);
      where_ = dir_ + "/a.sock";
    });
    MakeLink();
    auto answer = Wait();
    for (int i = 0; i < 100 && lt_.Sync([&] { return a_->calls; }) == 0; ++i) {
      std::this_thread::sleep_for(10ms);
    }
    return answer;
  }

  peapod::testing::LoopThread lt_;
  std::string dir_;
  std::shared_ptr<AgentLink> link_;
  std::unique_ptr<FakeAgent> a_, b_;
  Result<std::string> where_ = Error(Code::kUnavailable, "not yet");
  std::atomic<int> locates_{0};
};

TEST_F(AgentLinkTest, AWaitSurvivesALostConnectionAndReachesTheAgentAtItsNewAddress) {
  auto answer = WaitHeldByA();
  ASSERT_EQ(lt_.Sync([&] { return a_->calls; }), 1);
  // The sandboxer restarts: the old socket goes with every connection on it; the agent is
  // found again at a new address.
  lt_.Sync([&] {
    b_ = std::make_unique<FakeAgent>(lt_.loop(), dir_ + "/b.sock", 7, /*hold=*/false);
    where_ = dir_ + "/b.sock";
    a_.reset();
  });
  ASSERT_EQ(answer.wait_for(10s), std::future_status::ready) << "the wait was never re-sent";
  auto r = answer.get();
  ASSERT_TRUE(r.ok()) << r.error().ToString();
  EXPECT_EQ(r->exit_status(), 7u);
  EXPECT_EQ(lt_.Sync([&] { return b_->calls; }), 1);
}

TEST_F(AgentLinkTest, AWaitEndsWhenThePodIsGone) {
  auto answer = WaitHeldByA();
  lt_.Sync([&] {
    where_ = Error::NotFound("pod p1 not found");
    a_.reset();
  });
  ASSERT_EQ(answer.wait_for(10s), std::future_status::ready);
  auto r = answer.get();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Code::kNotFound) << r.error().ToString();
}

TEST_F(AgentLinkTest, StopEndsCallsWaitingForTheAgent) {
  MakeLink();  // Locate: the sandboxer cannot say, for ever
  auto answer = Wait();
  for (int i = 0; i < 100 && locates_ < 3; ++i) std::this_thread::sleep_for(10ms);
  EXPECT_GE(locates_, 3) << "no redial with backoff";
  lt_.Sync([&] { link_->Stop(); });
  ASSERT_EQ(answer.wait_for(5s), std::future_status::ready);
  EXPECT_EQ(answer.get().error().code(), Code::kUnavailable);
}

// An agent that answers UNAVAILABLE for ever, on a live connection: a call that may be re-sent
// but has a deadline ends at its deadline, not never.
TEST_F(AgentLinkTest, ARetriedCallWithADeadlineEndsThen) {
  lt_.Sync([&] {
    a_ = std::make_unique<FakeAgent>(lt_.loop(), dir_ + "/a.sock", 0, /*hold=*/false);
    a_->unavailable = true;
    where_ = dir_ + "/a.sock";
  });
  MakeLink();
  auto p = std::make_shared<std::promise<Result<std::string>>>();
  auto f = p->get_future();
  lt_.Sync([&] {
    link_->CallRetrying("WaitProcess", "", 500ms, [p](Result<std::string> r) { p->set_value(r); });
  });
  ASSERT_EQ(f.wait_for(5s), std::future_status::ready) << "re-sent for ever";
  EXPECT_FALSE(f.get().ok());
  EXPECT_GE(lt_.Sync([&] { return a_->calls; }), 2) << "never re-sent";
}

TEST_F(AgentLinkTest, ACallSentOnceGivesUpAfterItsPatience) {
  MakeLink();
  auto p = std::make_shared<std::promise<Result<std::string>>>();
  auto f = p->get_future();
  lt_.Sync([&] {
    link_->CallOnce("StartContainer", "", 1s, [p](Result<std::string> r) { p->set_value(r); });
  });
  ASSERT_EQ(f.wait_for(5s), std::future_status::ready);
  auto r = f.get();
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message().find("not reachable"), std::string::npos) << r.error().ToString();
}

}  // namespace
}  // namespace peapod::shim
