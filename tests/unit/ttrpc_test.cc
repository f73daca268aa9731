// C++ ttrpc client and server against each other, plus raw frames a misbehaving peer might send.
#include <gtest/gtest.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <vector>

#include "common/ttrpc/client.h"
#include "common/ttrpc/frame.h"
#include "common/ttrpc/server.h"
#include "loop_fixture.h"
#include "ttrpc/request.pb.h"

namespace peapod::ttrpc {
namespace {

using namespace std::chrono_literals;
constexpr char kSvc[] = "peapod.test.Echo";

// A server with the methods the tests use, living on a LoopThread.
class TtrpcTest : public ::testing::Test {
 protected:
  void SetUp() override {
    lt_ = std::make_unique<peapod::testing::LoopThread>();
    lt_->Sync([this] {
      server_ = std::make_unique<Server>(lt_->loop());
      server_->Register(kSvc, "Echo",
                        [](const CallContext&, std::string p, Responder r) { r(std::move(p)); });
      server_->Register(kSvc, "Fail", [](const CallContext&, std::string p, Responder r) {
        r(Error(Code::kFailedPrecondition, "failing on purpose: " + p));
      });
      server_->Register(kSvc, "Metadata", [](const CallContext& ctx, std::string, Responder r) {
        std::string out;
        for (const auto& [k, vs] : ctx.metadata) {
          for (const auto& v : vs) out += k + "=" + v + ";";
        }
        r(out);
      });
      server_->Register(kSvc, "Big", [](const CallContext&, std::string p, Responder r) {
        r(std::string(std::stoul(p), 'b'));
      });
      // Held until Release is called: stands in for a task Wait.
      server_->Register(kSvc, "Hold", [this](const CallContext&, std::string p, Responder r) {
        held_.push_back({std::move(p), r});
      });
      server_->Register(kSvc, "Release", [this](const CallContext&, std::string, Responder r) {
        for (auto& [p, h] : held_) h("released " + p);
        held_.clear();
        r(std::string("ok"));
      });
      server_->Register(kSvc, "Never", [](const CallContext&, std::string, Responder) {});
    });
  }

  void TearDown() override {
    lt_->Sync([this] {
      clients_.clear();
      held_.clear();
      server_.reset();
    });
    lt_.reset();
  }

  // A client connected to the server through a socketpair.
  std::shared_ptr<Client> Connect() {
    return lt_->Sync([this] {
      auto pair = SocketPair();
      EXPECT_TRUE(pair.ok());
      EXPECT_TRUE(server_->ServeConnection(std::move(pair->first)).ok());
      auto c = Client::Create(lt_->loop(), std::move(pair->second));
      EXPECT_TRUE(c.ok());
      clients_.push_back(*c);
      return *c;
    });
  }

  // A client whose peer is a bare socket end the test holds (no server): closing it is the
  // peer dying.
  std::shared_ptr<Client> ConnectToBareEnd(UniqueFd* peer) {
    auto pair = SocketPair();
    EXPECT_TRUE(pair.ok());
    *peer = std::move(pair->first);
    return lt_->Sync([&] { return *Client::Create(lt_->loop(), std::move(pair->second)); });
  }

  // The raw client end of a server connection, blocking.
  UniqueFd ConnectRaw() {
    return lt_->Sync([this] {
      auto pair = SocketPair();
      EXPECT_TRUE(server_->ServeConnection(std::move(pair->first)).ok());
      return std::move(pair->second);
    });
  }

  std::unique_ptr<peapod::testing::LoopThread> lt_;
  std::unique_ptr<Server> server_;
  std::vector<std::shared_ptr<Client>> clients_;
  std::vector<std::pair<std::string, Responder>> held_;
};

void WriteFrame(int fd, uint32_t stream, uint8_t type, const std::string& payload,
                uint32_t length_override = 0) {
  char h[kHeaderSize];
  uint32_t len = length_override ? length_override : static_cast<uint32_t>(payload.size());
  EncodeHeader(FrameHeader{len, stream, type, 0}, h);
  ASSERT_TRUE(WriteAll(fd, h, sizeof(h)).ok());
  ASSERT_TRUE(WriteAll(fd, payload.data(), payload.size()).ok());
}

std::string RequestBytes(const std::string& method, const std::string& payload) {
  ::ttrpc::Request req;
  req.set_service(kSvc);
  req.set_method(method);
  req.set_payload(payload);
  return req.SerializeAsString();
}

::ttrpc::Response ReadResponse(int fd, uint32_t* stream = nullptr) {
  char h[kHeaderSize];
  EXPECT_TRUE(ReadExact(fd, h, sizeof(h)).ok());
  FrameHeader hdr = DecodeHeader(h);
  EXPECT_EQ(hdr.type, kTypeResponse);
  std::string body(hdr.length, '\0');
  EXPECT_TRUE(ReadExact(fd, body.data(), body.size()).ok());
  if (stream) *stream = hdr.stream_id;
  ::ttrpc::Response resp;
  EXPECT_TRUE(resp.ParseFromString(body));
  return resp;
}

TEST_F(TtrpcTest, UnaryEcho) {
  auto c = Connect();
  auto r = c->CallSync(kSvc, "Echo", "hello");
  ASSERT_TRUE(r.ok()) << r.error().ToString();
  EXPECT_EQ(*r, "hello");
  // Empty payloads are legal.
  EXPECT_EQ(*c->CallSync(kSvc, "Echo", ""), "");
}

TEST_F(TtrpcTest, ErrorsKeepCodeAndMessage) {
  auto c = Connect();
  auto r = c->CallSync(kSvc, "Fail", "x");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Code::kFailedPrecondition);
  EXPECT_EQ(r.error().message(), "failing on purpose: x");

  auto unknown_method = c->CallSync(kSvc, "Nope", "");
  EXPECT_EQ(unknown_method.error().code(), Code::kUnimplemented);
  EXPECT_NE(unknown_method.error().message().find("peapod.test.Echo.Nope"), std::string::npos);
  auto unknown_service = c->CallSync("no.such.Service", "Echo", "");
  EXPECT_EQ(unknown_service.error().code(), Code::kUnimplemented);
  EXPECT_NE(unknown_service.error().message().find("no.such.Service"), std::string::npos);
}

TEST_F(TtrpcTest, MetadataRoundTrip) {
  auto c = Connect();
  CallOptions opts;
  opts.metadata["containerd-namespace-ttrpc"] = {"k8s.io"};
  opts.metadata["multi"] = {"a", "b"};
  auto r = c->CallSync(kSvc, "Metadata", "", opts);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, "containerd-namespace-ttrpc=k8s.io;multi=a;multi=b;");
}

TEST_F(TtrpcTest, ManyConcurrentCallsOnOneConnection) {
  auto c = Connect();
  constexpr int kCalls = 200;
  std::atomic<int> ok{0};
  std::atomic<int> finished{0};
  std::promise<void> all_done;
  lt_->Sync([&] {
    for (int i = 0; i < kCalls; ++i) {
      c->Call(kSvc, "Echo", std::to_string(i), {}, [&, i](Result<std::string> r) {
        if (r.ok() && *r == std::to_string(i)) ok++;
        if (++finished == kCalls) all_done.set_value();
      });
    }
  });
  all_done.get_future().wait();
  EXPECT_EQ(ok.load(), kCalls);
}

TEST_F(TtrpcTest, LongCallDoesNotBlockOthers) {
  auto c = Connect();
  auto other = Connect();
  std::promise<Result<std::string>> held;
  lt_->Sync([&] {
    c->Call(kSvc, "Hold", "wait-1", {},
            [&](Result<std::string> r) { held.set_value(std::move(r)); });
  });
  // While the first call is open, others on the same and another connection are answered.
  for (int i = 0; i < 5; ++i) EXPECT_TRUE(c->CallSync(kSvc, "Echo", "x").ok());
  EXPECT_TRUE(other->CallSync(kSvc, "Echo", "y").ok());
  EXPECT_EQ(lt_->Sync([&] { return server_->in_flight(); }), 1u);
  ASSERT_TRUE(other->CallSync(kSvc, "Release", "").ok());
  auto r = held.get_future().get();
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, "released wait-1");
}

TEST_F(TtrpcTest, OversizeRequestRefusedByClientWithoutSending) {
  auto c = Connect();
  auto r = c->CallSync(kSvc, "Echo", std::string(kMaxMessageSize + 1, 'x'));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Code::kResourceExhausted);
  // The connection is still good, and a payload just under the limit goes through.
  std::string near(kMaxMessageSize - 1024, 'n');
  auto big = c->CallSync(kSvc, "Echo", near);
  ASSERT_TRUE(big.ok()) << big.error().ToString();
  EXPECT_EQ(big->size(), near.size());
}

TEST_F(TtrpcTest, OversizeResponseBecomesResourceExhausted) {
  auto c = Connect();
  auto r = c->CallSync(kSvc, "Big", std::to_string(kMaxMessageSize + 1));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Code::kResourceExhausted);
  EXPECT_TRUE(c->CallSync(kSvc, "Echo", "still-alive").ok());
}

TEST_F(TtrpcTest, ServerRejectsOversizeFrameAndStaysInStep) {
  UniqueFd raw = ConnectRaw();
  // Announce 4 MiB + 1 and actually send it: the server must skip it and answer on stream 1.
  std::string junk(kMaxMessageSize + 1, 'j');
  WriteFrame(raw.get(), 1, kTypeRequest, junk);
  uint32_t stream = 0;
  auto resp = ReadResponse(raw.get(), &stream);
  EXPECT_EQ(stream, 1u);
  EXPECT_EQ(resp.status().code(), static_cast<int>(Code::kResourceExhausted));
  WriteFrame(raw.get(), 3, kTypeRequest, RequestBytes("Echo", "after"));
  resp = ReadResponse(raw.get(), &stream);
  EXPECT_EQ(stream, 3u);
  EXPECT_EQ(resp.status().code(), 0);
  EXPECT_EQ(resp.payload(), "after");
}

TEST_F(TtrpcTest, ServerRejectsBadStreamIdsAndMalformedRequests) {
  UniqueFd raw = ConnectRaw();
  WriteFrame(raw.get(), 2, kTypeRequest, RequestBytes("Echo", "even"));
  EXPECT_EQ(ReadResponse(raw.get()).status().code(), static_cast<int>(Code::kInvalidArgument));
  WriteFrame(raw.get(), 5, kTypeRequest, RequestBytes("Echo", "five"));
  EXPECT_EQ(ReadResponse(raw.get()).payload(), "five");
  WriteFrame(raw.get(), 5, kTypeRequest, RequestBytes("Echo", "again"));
  auto reused = ReadResponse(raw.get());
  EXPECT_EQ(reused.status().code(), static_cast<int>(Code::kInvalidArgument));
  EXPECT_NE(reused.status().message().find("reused"), std::string::npos);
  WriteFrame(raw.get(), 7, kTypeRequest, "\xff\xff\xff not protobuf");
  EXPECT_EQ(ReadResponse(raw.get()).status().code(), static_cast<int>(Code::kInvalidArgument));
  // Frames of other types are ignored, and the connection keeps serving.
  WriteFrame(raw.get(), 9, kTypeResponse, "stray");
  WriteFrame(raw.get(), 11, 0x7f, "unknown type");
  WriteFrame(raw.get(), 13, kTypeRequest, RequestBytes("Echo", "ok"));
  uint32_t stream = 0;
  EXPECT_EQ(ReadResponse(raw.get(), &stream).payload(), "ok");
  EXPECT_EQ(stream, 13u);
}

TEST_F(TtrpcTest, TruncatedFrameThenEofClosesCleanly) {
  UniqueFd raw = ConnectRaw();
  EXPECT_EQ(lt_->Sync([&] { return server_->connection_count(); }), 1u);
  char h[kHeaderSize];
  EncodeHeader(FrameHeader{100, 1, kTypeRequest, 0}, h);
  ASSERT_TRUE(WriteAll(raw.get(), h, sizeof(h)).ok());
  ASSERT_TRUE(WriteAll(raw.get(), "only-part", 9).ok());
  raw.Reset();
  for (int i = 0; i < 100 && lt_->Sync([&] { return server_->connection_count(); }) != 0; ++i) {
    std::this_thread::sleep_for(5ms);
  }
  EXPECT_EQ(lt_->Sync([&] { return server_->connection_count(); }), 0u);
}

TEST_F(TtrpcTest, ClientDeadline) {
  auto c = Connect();
  CallOptions opts;
  opts.timeout = 50ms;
  auto start = std::chrono::steady_clock::now();
  auto r = c->CallSync(kSvc, "Never", "", opts);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Code::kDeadlineExceeded);
  EXPECT_GE(std::chrono::steady_clock::now() - start, 50ms);
  EXPECT_TRUE(c->CallSync(kSvc, "Echo", "after-timeout").ok());
}

TEST_F(TtrpcTest, ServerEnforcesRequestTimeout) {
  UniqueFd raw = ConnectRaw();
  ::ttrpc::Request req;
  req.set_service(kSvc);
  req.set_method("Never");
  req.set_timeout_nano(std::chrono::nanoseconds(30ms).count());
  WriteFrame(raw.get(), 1, kTypeRequest, req.SerializeAsString());
  EXPECT_EQ(ReadResponse(raw.get()).status().code(), static_cast<int>(Code::kDeadlineExceeded));
  EXPECT_EQ(lt_->Sync([&] { return server_->in_flight(); }), 0u);
}

TEST_F(TtrpcTest, ConnectionLossFailsPendingCalls) {
  UniqueFd server_end;
  auto c = ConnectToBareEnd(&server_end);
  std::promise<Result<std::string>> p;
  lt_->Sync([&] {
    c->Call(kSvc, "Echo", "x", {}, [&](Result<std::string> r) { p.set_value(std::move(r)); });
  });
  server_end.Reset();  // the peer dies without answering
  auto r = p.get_future().get();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Code::kUnavailable);
  auto after = c->CallSync(kSvc, "Echo", "y");
  EXPECT_EQ(after.error().code(), Code::kUnavailable);
  lt_->Sync([&] { c.reset(); });
}

// The peer is gone but the loop has not read its EOF yet: the request's own write finds it
// out and closes the connection. The call must fail then, not wait for an answer forever (a
// shim's GetPod to a sandboxer killed a moment before hung until its 300 s deadline).
TEST_F(TtrpcTest, ACallWhoseWriteFindsThePeerGoneFailsAtOnce) {
  UniqueFd server_end;
  auto c = ConnectToBareEnd(&server_end);
  std::promise<Result<std::string>> p;
  lt_->Sync([&] {
    server_end.Reset();  // in the same loop turn as the call: no EOF seen before the write
    c->Call(kSvc, "Echo", "x", {}, [&](Result<std::string> r) { p.set_value(std::move(r)); });
  });
  auto f = p.get_future();
  ASSERT_EQ(f.wait_for(5s), std::future_status::ready) << "the call was never answered";
  auto r = f.get();
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Code::kUnavailable);
  lt_->Sync([&] { c.reset(); });
}

TEST_F(TtrpcTest, CallSyncOnLoopThreadIsRefused) {
  auto c = Connect();
  auto r = lt_->Sync([&] { return c->CallSync(kSvc, "Echo", "x"); });
  EXPECT_EQ(r.error().code(), Code::kFailedPrecondition);
}

TEST_F(TtrpcTest, ShutdownLetsInFlightCallsFinish) {
  auto c = Connect();
  auto idle = Connect();
  std::promise<Result<std::string>> held;
  lt_->Sync([&] {
    c->Call(kSvc, "Hold", "h", {}, [&](Result<std::string> r) { held.set_value(std::move(r)); });
  });
  ASSERT_TRUE(c->CallSync(kSvc, "Echo", "sync").ok());  // the Hold request has been read
  std::promise<void> done;
  lt_->Sync([&] { server_->Shutdown([&] { done.set_value(); }); });
  // New requests are refused while the held call is still open.
  auto refused = c->CallSync(kSvc, "Echo", "late");
  EXPECT_EQ(refused.error().code(), Code::kUnavailable);
  lt_->Sync([&] {
    for (auto& [p, h] : held_) h("bye");
    held_.clear();
  });
  auto r = held.get_future().get();
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(*r, "bye");
  EXPECT_EQ(done.get_future().wait_for(2s), std::future_status::ready);
}

TEST_F(TtrpcTest, ListenOnUnixSocket) {
  std::string path = ::testing::TempDir() + "ttrpc-test-" + std::to_string(::getpid()) + ".sock";
  ASSERT_TRUE(lt_->Sync([&] { return server_->Listen(path); }).ok());
  std::vector<std::shared_ptr<Client>> cs;
  for (int i = 0; i < 3; ++i) {
    auto fd = ConnectUnix(path);
    ASSERT_TRUE(fd.ok()) << fd.error().ToString();
    cs.push_back(lt_->Sync([&] { return *Client::Create(lt_->loop(), std::move(*fd)); }));
  }
  for (size_t i = 0; i < cs.size(); ++i) {
    EXPECT_EQ(*cs[i]->CallSync(kSvc, "Echo", std::to_string(i)), std::to_string(i));
  }
  lt_->Sync([&] { cs.clear(); });
  std::filesystem::remove(path);
}

// The hand-written Response (one copy of the payload, straight into the frame) is byte for byte
// what protobuf writes, for every length class of the payload's varint and for none.
TEST(ResponseEncoding, AnswerInPartsIsWhatProtobufWrites) {
  for (size_t size : {size_t{0}, size_t{1}, size_t{127}, size_t{128}, size_t{16383}, size_t{16384},
                      size_t{1} << 20}) {
    std::string payload(size, 'x');
    for (size_t i = 0; i < size; ++i) payload[i] = static_cast<char>(i * 7);
    size_t cut = size / 3;
    std::string frame = EncodeOkResponseFrame(
        {std::string_view(payload).substr(0, cut), std::string_view(payload).substr(cut)});
    ASSERT_GE(frame.size(), kHeaderSize) << size;
    EXPECT_EQ(frame.substr(kHeaderSize), EncodeResponse(Result<std::string>(payload))) << size;
  }
  // Past the message limit there is no frame; the responder answers RESOURCE_EXHAUSTED.
  std::string big(kMaxMessageSize, 'y');
  EXPECT_TRUE(EncodeOkResponseFrame({big}).empty());
}

TEST(FrameDecoder, SplitsAndJoinsAcrossReads) {
  std::string stream;
  for (uint32_t id : {1u, 3u, 5u}) {
    char h[kHeaderSize];
    std::string payload(id * 10, static_cast<char>('a' + id));
    EncodeHeader(FrameHeader{static_cast<uint32_t>(payload.size()), id, kTypeRequest, 0}, h);
    stream.append(h, kHeaderSize);
    stream += payload;
  }
  FrameDecoder d;
  std::vector<Frame> frames;
  for (char ch : stream) {  // worst case: one byte at a time
    d.Feed(&ch, 1);
    while (auto f = d.Next()) frames.push_back(std::move(*f));
  }
  ASSERT_EQ(frames.size(), 3u);
  EXPECT_EQ(frames[1].header.stream_id, 3u);
  EXPECT_EQ(frames[2].payload, std::string(50, 'f'));
  EXPECT_FALSE(d.in_frame());
}

TEST(FrameDecoder, OversizeFrameIsSkippedWithoutBuffering) {
  FrameDecoder d;
  char h[kHeaderSize];
  EncodeHeader(FrameHeader{0xffffffffu, 9, kTypeRequest, 0}, h);
  d.Feed(h, kHeaderSize);
  auto f = d.Next();
  ASSERT_TRUE(f.has_value());
  EXPECT_TRUE(f->oversized);
  EXPECT_EQ(f->header.length, 0xffffffffu);
  std::string chunk(1 << 20, 'z');
  d.Feed(chunk.data(), chunk.size());
  EXPECT_EQ(d.buffered(), 0u);  // dropped, not kept
  EXPECT_FALSE(d.Next().has_value());
}

// A bare Connection on a LoopThread, its peer a blocking socket the test drives.
class ConnectionLimitsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto [mine, theirs] = *SocketPair();
    peer_ = std::move(theirs);
    conn_ = lt_.Sync([&, fd = std::move(mine)]() mutable {
      return *Connection::Create(
          lt_.loop(), std::move(fd),
          [this](Frame&& f) {
            frames_.push_back(f.payload);
            if (pause_after_first_ && frames_.size() == 1) conn_->PauseReading();
          },
          [](const Error&) {});
    });
  }
  void TearDown() override {
    lt_.Sync([&] {
      conn_->Close();
      conn_.reset();
    });
  }
  bool WaitFor(const std::function<bool()>& pred) {
    for (int i = 0; i < 3000; ++i) {
      if (lt_.Sync(pred)) return true;
      std::this_thread::sleep_for(10ms);
    }
    return false;
  }

  peapod::testing::LoopThread lt_;
  std::shared_ptr<Connection> conn_;
  UniqueFd peer_;
  std::vector<std::string> frames_;  // loop thread
  bool pause_after_first_ = false;
};

TEST_F(ConnectionLimitsTest, SendPastTheHardCapIsRefusedAndTheQueueDrains) {
  int drains = 0;
  lt_.Sync([&] { conn_->SetOnDrain([&] { ++drains; }); });
  std::string payload(kMaxMessageSize, 'x');
  int sent = 0;
  Result<void> refused = Ok();
  size_t queued = 0;
  lt_.Sync([&] {
    for (int i = 0; i < 16 && refused.ok(); ++i) {
      refused = conn_->Send(1 + 2 * i, kTypeResponse, 0, payload);
      if (refused.ok()) ++sent;
    }
    queued = conn_->queued_bytes();
  });
  // The peer reads nothing: the queue stops short of the cap, the next frame is refused.
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.error().code(), Code::kResourceExhausted);
  EXPECT_LE(queued, kQueueHardCap);
  EXPECT_GT(queued + kHeaderSize + kMaxMessageSize, kQueueHardCap);
  EXPECT_LT(sent, 16);
  EXPECT_TRUE(lt_.Sync([&] { return conn_->over_high_water(); }));
  // The peer reads it all: the queue empties and the producer is told.
  std::string got(static_cast<size_t>(sent) * (kHeaderSize + kMaxMessageSize), '\0');
  ASSERT_TRUE(ReadExact(peer_.get(), got.data(), got.size()).ok());
  ASSERT_TRUE(WaitFor([&] { return conn_->queued_bytes() == 0; }));
  EXPECT_GE(lt_.Sync([&] { return drains; }), 1);
  EXPECT_TRUE(lt_.Sync([&] { return conn_->Send(99, kTypeResponse, 0, "again").ok(); }));
  lt_.Sync([&] { conn_->SetOnDrain(nullptr); });
}

// A frame in parts goes out straight from the caller's memory while nothing is queued; what the
// peer does not take yet is copied, so the caller's bytes may change once the call returns,
// and a later frame waits behind it.
TEST_F(ConnectionLimitsTest, AFrameInPartsIsWrittenFromTheCallersBytesAndItsRestQueued) {
  auto frame = [](uint32_t id, std::string_view payload) {
    std::string f(kHeaderSize, '\0');
    EncodeHeader(FrameHeader{static_cast<uint32_t>(payload.size()), id, kTypeResponse, 0},
                 f.data());
    return f + std::string(payload);
  };
  // Small: all of it written at once, nothing queued; empty parts add nothing.
  std::string small = "abc";
  size_t queued = 1;
  ASSERT_TRUE(lt_.Sync([&] {
    std::string_view parts[] = {"x", "", small, "yz"};
    auto r = conn_->SendParts(1, kTypeResponse, 0, parts);
    queued = conn_->queued_bytes();
    return r.ok();
  }));
  EXPECT_EQ(queued, 0u);
  std::string want = frame(1, "xabcyz");
  std::string got(want.size(), '\0');
  ASSERT_TRUE(ReadExact(peer_.get(), got.data(), got.size()).ok());
  EXPECT_EQ(got, want);

  // Larger than the socket takes: the rest is queued, a copy; the next frame comes after it.
  std::string big(3 << 20, '\0');
  for (size_t i = 0; i < big.size(); ++i) big[i] = static_cast<char>(i * 13 + i / 4096);
  std::string expect = frame(3, big) + frame(5, "after");
  ASSERT_TRUE(lt_.Sync([&] {
    std::string_view parts[] = {std::string_view(big).substr(0, 1000),
                                std::string_view(big).substr(1000)};
    auto r = conn_->SendParts(3, kTypeResponse, 0, parts);
    queued = conn_->queued_bytes();
    std::fill(big.begin(), big.end(), 'z');  // the caller's bytes are its own again
    std::string_view next[] = {"after"};
    return r.ok() && conn_->SendParts(5, kTypeResponse, 0, next).ok();
  }));
  EXPECT_GT(queued, 0u);
  EXPECT_LT(queued, expect.size() - 5 - kHeaderSize);
  got.assign(expect.size(), '\0');
  ASSERT_TRUE(ReadExact(peer_.get(), got.data(), got.size()).ok());
  EXPECT_TRUE(got == expect) << "the peer got other bytes than the frames sent";
  ASSERT_TRUE(WaitFor([&] { return conn_->queued_bytes() == 0; }));

  // The same limits as Send: too large a payload, or a closed connection, sends nothing.
  std::string huge(kMaxMessageSize + 1, 'h');
  std::string_view too_large[] = {huge};
  auto refused = lt_.Sync([&] { return conn_->SendParts(7, kTypeResponse, 0, too_large); });
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.error().code(), Code::kResourceExhausted);
  auto closed = lt_.Sync([&] {
    conn_->Close();
    std::string_view parts[] = {"late"};
    return conn_->SendParts(9, kTypeResponse, 0, parts);
  });
  ASSERT_FALSE(closed.ok());
  EXPECT_EQ(closed.error().code(), Code::kUnavailable);
}

TEST_F(ConnectionLimitsTest, APausedConnectionDeliversNothingUntilResumed) {
  lt_.Sync([&] { conn_->PauseReading(); });
  for (uint32_t i = 0; i < 3; ++i) {
    WriteFrame(peer_.get(), 1 + 2 * i, kTypeRequest, "f" + std::to_string(i));
  }
  std::this_thread::sleep_for(100ms);
  EXPECT_EQ(lt_.Sync([&] { return frames_.size(); }), 0u);
  lt_.Sync([&] { conn_->ResumeReading(); });
  ASSERT_TRUE(WaitFor([&] { return frames_.size() == 3; }));
  EXPECT_EQ(lt_.Sync([&] { return frames_; }), (std::vector<std::string>{"f0", "f1", "f2"}));
}

TEST_F(ConnectionLimitsTest, FramesDecodedBeforeAPauseComeAfterTheResume) {
  lt_.Sync([&] { pause_after_first_ = true; });
  // Three frames in one write: one read decodes them all, the callback pauses after the first.
  std::string bytes;
  for (uint32_t i = 0; i < 3; ++i) {
    char h[kHeaderSize];
    std::string p = "g" + std::to_string(i);
    EncodeHeader(FrameHeader{static_cast<uint32_t>(p.size()), 1 + 2 * i, kTypeRequest, 0}, h);
    bytes.append(h, kHeaderSize).append(p);
  }
  ASSERT_TRUE(WriteAll(peer_.get(), bytes.data(), bytes.size()).ok());
  ASSERT_TRUE(WaitFor([&] { return frames_.size() == 1; }));
  std::this_thread::sleep_for(100ms);
  EXPECT_EQ(lt_.Sync([&] { return frames_.size(); }), 1u);
  EXPECT_TRUE(lt_.Sync([&] { return conn_->reading_paused(); }));
  // Nothing more comes from the socket; the two frames in the decoder still arrive.
  lt_.Sync([&] {
    pause_after_first_ = false;
    conn_->ResumeReading();
  });
  ASSERT_TRUE(WaitFor([&] { return frames_.size() == 3; }));
  EXPECT_EQ(lt_.Sync([&] { return frames_; }), (std::vector<std::string>{"g0", "g1", "g2"}));
}

}  // namespace
}  // namespace peapod::ttrpc
