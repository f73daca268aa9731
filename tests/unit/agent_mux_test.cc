// The pod's agent channel mux: many ttrpc clients (shims) sharing one upstream channel to a
// ttrpc server (the agent), with one client dying mid-call and the channel going away.
#include <future>

#include "common/ttrpc/client.h"
#include "common/ttrpc/server.h"
#include "sandboxer/agent_mux.h"
#include "tests/unit/loop_fixture.h"
#include "ttrpc/request.pb.h"

namespace peapod::sandboxer {
namespace {

using namespace std::chrono_literals;

// An "agent" with Echo (answers at once) and Hold (answers only when released).
struct FakeAgent {
  explicit FakeAgent(EventLoop* loop) : server(loop) {
    server.Register(
        "t.Agent", "Echo",
        [](const ttrpc::CallContext&, std::string p, ttrpc::Responder r) { r("echo:" + p); });
    server.Register("t.Agent", "Hold",
                    [this](const ttrpc::CallContext&, std::string p, ttrpc::Responder r) {
                      held.push_back({std::move(p), r});
                    });
  }
  void ReleaseAll() {
    for (auto& [p, r] : held) r("released:" + p);
    held.clear();
  }
  ttrpc::Server server;
  std::vector<std::pair<std::string, ttrpc::Responder>> held;
};

class AgentMuxTest : public ::testing::Test {
 protected:
  void SetUp() override {
    lt_.Sync([&] {
      agent_ = std::make_unique<FakeAgent>(lt_.loop());
      mux_ = std::make_unique<AgentMux>(lt_.loop());
      auto [a, b] = *SocketPair();
      ASSERT_TRUE(agent_->server.ServeConnection(std::move(a)).ok());
      ASSERT_TRUE(mux_->AttachUpstream(std::move(b)).ok());
    });
  }
  void TearDown() override {
    lt_.Sync([&] {
      clients_.clear();
      mux_.reset();
      agent_.reset();
    });
  }
  std::shared_ptr<ttrpc::Client> NewClient() {
    return lt_.Sync([&] {
      auto [a, b] = *SocketPair();
      EXPECT_TRUE(mux_->AddClient(std::move(a)).ok());
      auto c = *ttrpc::Client::Create(lt_.loop(), std::move(b));
      clients_.push_back(c);
      return c;
    });
  }
  // Starts a call from the test thread; the future gets its result.
  std::future<Result<std::string>> Call(const std::shared_ptr<ttrpc::Client>& c,
                                        const std::string& method, const std::string& payload) {
    auto p = std::make_shared<std::promise<Result<std::string>>>();
    auto f = p->get_future();
    lt_.Sync([&] {
      c->Call("t.Agent", method, payload, {},
              [p](Result<std::string> r) { p->set_value(std::move(r)); });
    });
    return f;
  }

  peapod::testing::LoopThread lt_;
  std::unique_ptr<FakeAgent> agent_;
  std::unique_ptr<AgentMux> mux_;
  std::vector<std::shared_ptr<ttrpc::Client>> clients_;
};

TEST_F(AgentMuxTest, ManyClientsEachGetTheirOwnAnswers) {
  std::vector<std::shared_ptr<ttrpc::Client>> cs;
  for (int i = 0; i < 8; ++i) cs.push_back(NewClient());
  std::vector<std::future<Result<std::string>>> fs;
  for (int round = 0; round < 20; ++round) {
    for (size_t i = 0; i < cs.size(); ++i) {
      fs.push_back(Call(cs[i], "Echo", std::to_string(i) + "/" + std::to_string(round)));
    }
  }
  size_t n = 0;
  for (int round = 0; round < 20; ++round) {
    for (size_t i = 0; i < cs.size(); ++i) {
      auto r = fs[n++].get();
      ASSERT_TRUE(r.ok()) << r.error().ToString();
      EXPECT_EQ(*r, "echo:" + std::to_string(i) + "/" + std::to_string(round));
    }
  }
  EXPECT_EQ(lt_.Sync([&] { return mux_->in_flight(); }), 0u);
}

TEST_F(AgentMuxTest, AClientDyingMidCallDisturbsNoOther) {
  auto doomed = NewClient();
  auto other = NewClient();
  auto lost = Call(doomed, "Hold", "doomed");
  auto kept = Call(other, "Hold", "other");
  // Both calls reached the agent.
  for (int i = 0; i < 200 && lt_.Sync([&] { return agent_->held.size(); }) < 2; ++i) {
    std::this_thread::sleep_for(5ms);
  }
  ASSERT_EQ(lt_.Sync([&] { return agent_->held.size(); }), 2u);
  lt_.Sync([&] { doomed->Close(); });
  EXPECT_EQ(lost.get().error().code(), Code::kCancelled);
  for (int i = 0; i < 200 && lt_.Sync([&] { return mux_->client_count(); }) != 1; ++i) {
    std::this_thread::sleep_for(5ms);
  }
  EXPECT_EQ(lt_.Sync([&] { return mux_->client_count(); }), 1u);
  // The agent answers both; the dead client's answer is dropped, the other's arrives.
  lt_.Sync([&] { agent_->ReleaseAll(); });
  auto r = kept.get();
  ASSERT_TRUE(r.ok()) << r.error().ToString();
  EXPECT_EQ(*r, "released:other");
  auto again = Call(other, "Echo", "still here").get();
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, "echo:still here");
  EXPECT_EQ(lt_.Sync([&] { return mux_->in_flight(); }), 0u);
}

TEST_F(AgentMuxTest, ALostChannelFailsCallsInFlightAndNewOnesUntilReattached) {
  auto c = NewClient();
  auto pending = Call(c, "Hold", "x");
  for (int i = 0; i < 200 && lt_.Sync([&] { return agent_->held.size(); }) < 1; ++i) {
    std::this_thread::sleep_for(5ms);
  }
  bool told = false;
  lt_.Sync([&] {
    mux_->SetOnUpstreamClosed([&](const Error&) { told = true; });
    agent_.reset();  // the VM is gone: its end of the channel closes
  });
  auto r = pending.get();
  EXPECT_EQ(r.error().code(), Code::kUnavailable);
  EXPECT_TRUE(lt_.Sync([&] { return told; }));
  EXPECT_EQ(Call(c, "Echo", "y").get().error().code(), Code::kUnavailable);
  // A new channel (say, the sandboxer reconnected to QEMU): the same client goes on.
  lt_.Sync([&] {
    agent_ = std::make_unique<FakeAgent>(lt_.loop());
    auto [a, b] = *SocketPair();
    ASSERT_TRUE(agent_->server.ServeConnection(std::move(a)).ok());
    ASSERT_TRUE(mux_->AttachUpstream(std::move(b)).ok());
  });
  auto ok = Call(c, "Echo", "z").get();
  ASSERT_TRUE(ok.ok()) << ok.error().ToString();
  EXPECT_EQ(*ok, "echo:z");
}

TEST_F(AgentMuxTest, OversizedRequestsAreRefusedAndTheClientGoesOn) {
  auto c = NewClient();
  // The C++ client refuses to send these itself; write the frame by hand on a raw socket.
  auto [mine, theirs] = lt_.Sync([&] { return *SocketPair(); });
  lt_.Sync([&] { ASSERT_TRUE(mux_->AddClient(std::move(theirs)).ok()); });
  char header[ttrpc::kHeaderSize];
  ttrpc::EncodeHeader({ttrpc::kMaxMessageSize + 1, 1, ttrpc::kTypeRequest, 0}, header);
  ASSERT_TRUE(WriteAll(mine.get(), header, sizeof(header)).ok());
  std::string junk(ttrpc::kMaxMessageSize + 1, 'j');
  ASSERT_TRUE(WriteAll(mine.get(), junk.data(), junk.size()).ok());
  char reply[ttrpc::kHeaderSize];
  ASSERT_TRUE(ReadExact(mine.get(), reply, sizeof(reply)).ok());
  auto h = ttrpc::DecodeHeader(reply);
  EXPECT_EQ(h.stream_id, 1u);
  EXPECT_EQ(h.type, ttrpc::kTypeResponse);
  std::string body(h.length, '\0');
  ASSERT_TRUE(ReadExact(mine.get(), body.data(), body.size()).ok());
  ::ttrpc::Response resp;
  ASSERT_TRUE(resp.ParseFromString(body));
  EXPECT_EQ(resp.status().code(), static_cast<int>(Code::kResourceExhausted));
  auto ok = Call(c, "Echo", "fine").get();
  ASSERT_TRUE(ok.ok());
}

}  // namespace
}  // namespace peapod::sandboxer
