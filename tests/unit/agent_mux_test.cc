// The pod's agent channel mux: many ttrpc clients (shims) sharing one upstream channel to a
// ttrpc server (the agent), with one client dying mid-call and the channel going away; and a
// hostile guest on the channel, which must cost the host a bounded amount.
#include <poll.h>

#include <atomic>
#include <future>
#include <thread>

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

// The guest as the test writes it: raw frames on the channel, anything at all.
class HostileGuestTest : public ::testing::Test {
 protected:
  void SetUp() override {
    lt_.Sync([&] {
      mux_ = std::make_unique<AgentMux>(lt_.loop());
      auto [a, b] = *SocketPair();
      guest_ = std::move(a);
      ASSERT_TRUE(mux_->AttachUpstream(std::move(b)).ok());
    });
  }
  void TearDown() override {
    lt_.Sync([&] {
      clients_.clear();
      mux_.reset();
    });
  }
  // A client on a blocking socket that the test reads, or not.
  UniqueFd RawClient() {
    return lt_.Sync([&] {
      auto [a, b] = *SocketPair();
      EXPECT_TRUE(mux_->AddClient(std::move(a)).ok());
      return std::move(b);
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
  AgentMux::Stats Stats() {
    return lt_.Sync([&] { return mux_->stats(); });
  }
  // Polls pred on the loop until it holds or a generous timeout passes.
  bool WaitFor(const std::function<bool()>& pred) {
    for (int i = 0; i < 6000; ++i) {
      if (lt_.Sync(pred)) return true;
      std::this_thread::sleep_for(10ms);
    }
    return false;
  }

  peapod::testing::LoopThread lt_;
  std::unique_ptr<AgentMux> mux_;
  UniqueFd guest_;
  std::vector<std::shared_ptr<ttrpc::Client>> clients_;
};

void Put(int fd, uint32_t stream, uint8_t type, uint8_t flags, const std::string& payload) {
  char h[ttrpc::kHeaderSize];
  ttrpc::EncodeHeader({static_cast<uint32_t>(payload.size()), stream, type, flags}, h);
  ASSERT_TRUE(WriteAll(fd, h, sizeof(h)).ok());
  ASSERT_TRUE(WriteAll(fd, payload.data(), payload.size()).ok());
}

std::pair<ttrpc::FrameHeader, std::string> Get(int fd) {
  char h[ttrpc::kHeaderSize];
  EXPECT_TRUE(ReadExact(fd, h, sizeof(h)).ok());
  auto hdr = ttrpc::DecodeHeader(h);
  std::string body(hdr.length, '\0');
  EXPECT_TRUE(ReadExact(fd, body.data(), body.size()).ok());
  return {hdr, std::move(body)};
}

bool Readable(int fd) {
  pollfd p{fd, POLLIN, 0};
  return ::poll(&p, 1, 0) == 1;
}

TEST_F(HostileGuestTest, AFloodForAClientThatDoesNotReadStopsReadingTheChannel) {
  lt_.Sync([&] { mux_->set_stall_timeout(std::chrono::minutes(10)); });  // it reads, later
  UniqueFd a = RawClient();
  constexpr int kCalls = 8;
  for (int i = 0; i < kCalls; ++i) Put(a.get(), 1 + 2 * i, ttrpc::kTypeRequest, 0, "call");
  std::vector<uint32_t> ups;
  for (int i = 0; i < kCalls; ++i) {
    auto [h, p] = Get(guest_.get());
    EXPECT_EQ(h.type, ttrpc::kTypeRequest);
    ups.push_back(h.stream_id);
  }
  // Every call answered with a maximal frame, 32 MiB in all, from a thread: its writes block
  // once the mux stops reading.
  std::atomic<bool> all_written{false};
  std::thread guest([&] {
    std::string big(ttrpc::kMaxMessageSize, 'g');
    for (uint32_t up : ups) Put(guest_.get(), up, ttrpc::kTypeResponse, 0, big);
    all_written = true;
  });
  ASSERT_TRUE(WaitFor([&] { return mux_->upstream_paused(); }));
  // Nothing reads client a: what the mux holds for it only grows, so its last value is the
  // peak. It stays within one frame of the high-water mark, under the hard cap.
  size_t queued = 0;
  for (int i = 0; i < 20; ++i) {
    queued = lt_.Sync([&] { return mux_->queued_bytes(); });
    std::this_thread::sleep_for(10ms);
  }
  EXPECT_GE(queued, ttrpc::kQueueHighWater);
  EXPECT_LE(queued, ttrpc::kQueueHighWater + ttrpc::kHeaderSize + ttrpc::kMaxMessageSize);
  EXPECT_LT(queued, ttrpc::kQueueHardCap);
  // The guest could not write it all: the rest waits in the guest, not in the sandboxer.
  EXPECT_FALSE(all_written);
  EXPECT_TRUE(lt_.Sync([&] { return mux_->upstream_paused(); }));

  // The client reads: the channel goes on, every answer arrives whole and in order.
  for (int i = 0; i < kCalls; ++i) {
    auto [h, p] = Get(a.get());
    EXPECT_EQ(h.stream_id, static_cast<uint32_t>(1 + 2 * i));
    EXPECT_EQ(h.type, ttrpc::kTypeResponse);
    EXPECT_EQ(p.size(), ttrpc::kMaxMessageSize);
  }
  guest.join();
  EXPECT_TRUE(all_written);
  EXPECT_TRUE(WaitFor([&] { return !mux_->upstream_paused() && mux_->in_flight() == 0; }));
  auto st = Stats();
  EXPECT_GE(st.upstream_pauses, 1u);
  EXPECT_EQ(st.stalled_clients_closed, 0u);
}

TEST_F(HostileGuestTest, FramesThatAreNotResponsesAreDroppedAndCounted) {
  UniqueFd a = RawClient();
  Put(a.get(), 1, ttrpc::kTypeRequest, 0, "q");
  auto [req, body] = Get(guest_.get());
  uint32_t up = req.stream_id;
  // The guest calls the host, sends stream data, a type nobody knows and a response with
  // flags, on a stream of its own and on the call's.
  Put(guest_.get(), 2, ttrpc::kTypeRequest, 0, "guest calls host");
  Put(guest_.get(), up, ttrpc::kTypeRequest, 0, "on the call's stream");
  Put(guest_.get(), up, ttrpc::kTypeData, 0, "data");
  Put(guest_.get(), up, 0x7f, 0, "unknown type");
  Put(guest_.get(), up, ttrpc::kTypeResponse, 0x1, "flags");
  Put(guest_.get(), up, ttrpc::kTypeResponse, 0, "the answer");
  // Frames are handled in order: the first the client gets is the answer, so nothing before
  // it went through.
  auto [h, p] = Get(a.get());
  EXPECT_EQ(h.type, ttrpc::kTypeResponse);
  EXPECT_EQ(h.stream_id, 1u);
  EXPECT_EQ(h.flags, 0u);
  EXPECT_EQ(p, "the answer");
  EXPECT_FALSE(Readable(a.get()));
  auto st = Stats();
  EXPECT_EQ(st.dropped_not_response, 5u);
  EXPECT_EQ(st.dropped_unknown_stream, 0u);
  EXPECT_EQ(lt_.Sync([&] { return mux_->in_flight(); }), 0u);
}

TEST_F(HostileGuestTest, AnswersToStreamsNeverAskedAreDroppedAndCounted) {
  UniqueFd a = RawClient();
  // Stream ids the mux never hands out before the calls below (1, then 3).
  Put(guest_.get(), 1001, ttrpc::kTypeResponse, 0, "never asked");
  Put(guest_.get(), 0x7ffffff1u, ttrpc::kTypeResponse, 0, "never asked");
  Put(guest_.get(), 2, ttrpc::kTypeResponse, 0, "even");
  Put(a.get(), 1, ttrpc::kTypeRequest, 0, "q1");
  auto [r1, b1] = Get(guest_.get());
  Put(guest_.get(), r1.stream_id, ttrpc::kTypeResponse, 0, "a1");
  Put(guest_.get(), r1.stream_id, ttrpc::kTypeResponse, 0, "a1 again");  // answered already
  auto [h1, p1] = Get(a.get());
  EXPECT_EQ(h1.stream_id, 1u);
  EXPECT_EQ(p1, "a1");
  // One more call, after which every frame above has been handled.
  Put(a.get(), 3, ttrpc::kTypeRequest, 0, "q2");
  auto [r2, b2] = Get(guest_.get());
  Put(guest_.get(), r2.stream_id, ttrpc::kTypeResponse, 0, "a2");
  auto [h2, p2] = Get(a.get());
  EXPECT_EQ(h2.stream_id, 3u);
  EXPECT_EQ(p2, "a2");
  EXPECT_FALSE(Readable(a.get()));
  EXPECT_EQ(Stats().dropped_unknown_stream, 4u);
}

TEST_F(HostileGuestTest, AClientThatNeverReadsIsClosedAndTheOthersGoOn) {
  lt_.Sync([&] { mux_->set_stall_timeout(1s); });
  UniqueFd a = RawClient();
  auto b = NewClient();
  for (int i = 0; i < 3; ++i) Put(a.get(), 1 + 2 * i, ttrpc::kTypeRequest, 0, "a");
  std::vector<uint32_t> ups_a;
  for (int i = 0; i < 3; ++i) ups_a.push_back(Get(guest_.get()).first.stream_id);
  auto pb = std::make_shared<std::promise<Result<std::string>>>();
  auto fb = pb->get_future();
  lt_.Sync([&] {
    b->Call("t.Agent", "Echo", "b", {}, [pb](Result<std::string> r) { pb->set_value(r); });
  });
  uint32_t up_b = Get(guest_.get()).first.stream_id;
  // 12 MiB for a, which never reads, then b's answer behind them.
  std::thread guest([&] {
    std::string big(ttrpc::kMaxMessageSize, 'g');
    for (uint32_t up : ups_a) Put(guest_.get(), up, ttrpc::kTypeResponse, 0, big);
    Put(guest_.get(), up_b, ttrpc::kTypeResponse, 0,
        ttrpc::EncodeResponse(Result<std::string>(std::string("for b"))));
  });
  ASSERT_EQ(fb.wait_for(60s), std::future_status::ready);
  auto rb = fb.get();
  ASSERT_TRUE(rb.ok()) << rb.error().ToString();
  EXPECT_EQ(*rb, "for b");
  guest.join();
  auto st = Stats();
  EXPECT_EQ(st.stalled_clients_closed, 1u);
  EXPECT_GE(st.upstream_pauses, 1u);
  EXPECT_EQ(lt_.Sync([&] { return mux_->client_count(); }), 1u);
  // a was closed: past what its socket already held, EOF.
  char buf[65536];
  ssize_t n;
  size_t got = 0;
  while ((n = ::read(a.get(), buf, sizeof(buf))) > 0) got += static_cast<size_t>(n);
  EXPECT_EQ(n, 0);
  EXPECT_LT(got, 3 * ttrpc::kMaxMessageSize);
  // b goes on.
  auto again = std::async(std::launch::async, [&] {
    auto [h, p] = Get(guest_.get());
    Put(guest_.get(), h.stream_id, ttrpc::kTypeResponse, 0,
        ttrpc::EncodeResponse(Result<std::string>(std::string("again"))));
  });
  auto r2 = b->CallSync("t.Agent", "Echo", "b2");
  again.get();
  ASSERT_TRUE(r2.ok()) << r2.error().ToString();
  EXPECT_EQ(*r2, "again");
  EXPECT_FALSE(lt_.Sync([&] { return mux_->upstream_paused(); }));
}

TEST_F(HostileGuestTest, CallsTheGuestNeverAnswersAreCapped) {
  // The guest reads nothing and answers nothing.
  std::vector<std::shared_ptr<ttrpc::Client>> cs;
  for (int i = 0; i < 5; ++i) cs.push_back(NewClient());
  struct Tally {
    std::atomic<int> exhausted{0};
    std::atomic<int> other{0};
  };
  auto tally = std::make_shared<Tally>();
  auto call = [tally](const std::shared_ptr<ttrpc::Client>& c) {
    c->Call("t.Agent", "Hold", "x", {}, [tally](Result<std::string> r) {
      if (!r.ok() && r.error().code() == Code::kResourceExhausted) {
        ++tally->exhausted;
      } else {
        ++tally->other;  // cancelled at the end of the test
      }
    });
  };
  // One client: 1024 in flight, the 1025th refused.
  lt_.Sync([&] {
    for (size_t i = 0; i <= AgentMux::kMaxCallsPerClient; ++i) call(cs[0]);
  });
  ASSERT_TRUE(WaitFor([&] { return tally->exhausted == 1; }));
  EXPECT_EQ(lt_.Sync([&] { return mux_->in_flight(); }), AgentMux::kMaxCallsPerClient);
  // Three more fill the channel's 4096; a fifth client is refused though it has none.
  lt_.Sync([&] {
    for (int c = 1; c < 4; ++c) {
      for (size_t i = 0; i < AgentMux::kMaxCallsPerClient; ++i) call(cs[c]);
    }
  });
  ASSERT_TRUE(WaitFor([&] { return mux_->in_flight() == AgentMux::kMaxCalls; }));
  lt_.Sync([&] { call(cs[4]); });
  ASSERT_TRUE(WaitFor([&] { return tally->exhausted == 2; }));
  EXPECT_EQ(Stats().refused_calls, 2u);
  EXPECT_EQ(tally->other, 0);
  // A client that goes away takes its calls with it, whether or not the guest ever answers.
  lt_.Sync([&] { cs[1]->Close(); });
  ASSERT_TRUE(WaitFor([&] { return mux_->in_flight() == 3 * AgentMux::kMaxCallsPerClient; }));
  EXPECT_EQ(Stats().forgotten_calls, AgentMux::kMaxCallsPerClient);
  lt_.Sync([&] { call(cs[4]); });
  ASSERT_TRUE(WaitFor([&] { return mux_->in_flight() == 3 * AgentMux::kMaxCallsPerClient + 1; }));
  EXPECT_EQ(tally->exhausted, 2);
}

TEST_F(HostileGuestTest, AnOversizedAnswerIsSkippedAndRefused) {
  UniqueFd a = RawClient();
  Put(a.get(), 1, ttrpc::kTypeRequest, 0, "big?");
  Put(a.get(), 3, ttrpc::kTypeRequest, 0, "small");
  uint32_t up1 = Get(guest_.get()).first.stream_id;
  uint32_t up3 = Get(guest_.get()).first.stream_id;
  Put(guest_.get(), up1, ttrpc::kTypeResponse, 0, std::string(ttrpc::kMaxMessageSize + 1, 'o'));
  Put(guest_.get(), up3, ttrpc::kTypeResponse, 0, "fine");
  auto [h1, p1] = Get(a.get());
  EXPECT_EQ(h1.stream_id, 1u);
  ::ttrpc::Response resp;
  ASSERT_TRUE(resp.ParseFromString(p1));
  EXPECT_EQ(resp.status().code(), static_cast<int>(Code::kResourceExhausted));
  auto [h3, p3] = Get(a.get());
  EXPECT_EQ(h3.stream_id, 3u);
  EXPECT_EQ(p3, "fine");
  EXPECT_EQ(Stats().oversized_responses, 1u);
}

}  // namespace
}  // namespace peapod::sandboxer
