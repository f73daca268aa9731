// peapod's C++ ttrpc against the reference Go implementation (github.com/containerd/ttrpc, the
// version pinned in go/go.mod), both directions: C++ client -> Go server, Go client -> C++ server.
#include <fcntl.h>
#include <google/protobuf/wrappers.pb.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <vector>

#include "../unit/loop_fixture.h"
#include "common/ttrpc/client.h"
#include "common/ttrpc/frame.h"
#include "common/ttrpc/server.h"
#include "ttrpc/request.pb.h"

namespace peapod::ttrpc {
namespace {

using namespace std::chrono_literals;
using google::protobuf::BytesValue;
using google::protobuf::StringValue;
using google::protobuf::UInt64Value;

constexpr char kSvc[] = "peapod.test.Echo";

std::string InteropBinary() { return PEAPOD_INTEROP_BIN; }

std::string TempSocket(const char* tag) {
  return ::testing::TempDir() + "peapod-interop-" + tag + "-" + std::to_string(::getpid()) +
         ".sock";
}

// A child process with a pipe on stdin (closing it tells the Go program to exit) and stdout
// captured to a file.
struct Child {
  pid_t pid = -1;
  UniqueFd stdin_w;
  std::string out_path;

  Child(const std::vector<std::string>& argv, const std::string& path) : out_path(path) {
    int in[2];
    EXPECT_EQ(::pipe2(in, O_CLOEXEC), 0);
    pid = ::fork();
    if (pid == 0) {
      ::dup2(in[0], 0);
      int out = ::open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      ::dup2(out, 1);
      ::dup2(out, 2);
      std::vector<char*> args;
      for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
      args.push_back(nullptr);
      ::execv(args[0], args.data());
      ::_exit(127);
    }
    ::close(in[0]);
    stdin_w = UniqueFd(in[1]);
  }
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;
  std::string Output() const {
    std::ifstream f(out_path);
    return std::string(std::istreambuf_iterator<char>(f), {});
  }
  int Wait() {
    int st = 0;
    ::waitpid(pid, &st, 0);
    pid = -1;
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  }
  ~Child() {
    if (pid > 0) {
      stdin_w.Reset();
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);
    }
  }
};

class InteropTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!std::filesystem::exists(InteropBinary())) {
      GTEST_SKIP() << "Go interop binary " << InteropBinary()
                   << " was not built (is `go` installed? see the interop_build_go test)";
    }
  }
};

template <typename Resp>
Result<Resp> Call(Client& c, const std::string& method, const google::protobuf::Message& req,
                  const CallOptions& opts = {}) {
  return c.CallSyncTyped<Resp>(kSvc, method, req, opts);
}

BytesValue Bytes(std::string v) {
  BytesValue b;
  b.set_value(std::move(v));
  return b;
}
StringValue Str(std::string v) {
  StringValue s;
  s.set_value(std::move(v));
  return s;
}

TEST_F(InteropTest, CppClientAgainstGoServer) {
  std::string sock = TempSocket("goserver");
  Child server({InteropBinary(), "serve", "-socket", sock, "-lifetime", "120s"}, sock + ".log");
  for (int i = 0; i < 200 && !std::filesystem::exists(sock); ++i) std::this_thread::sleep_for(25ms);
  ASSERT_TRUE(std::filesystem::exists(sock)) << "Go server did not start: " << server.Output();

  peapod::testing::LoopThread lt;
  auto connect = [&] {
    auto fd = ConnectUnix(sock);
    EXPECT_TRUE(fd.ok());
    return lt.Sync([&] { return *Client::Create(lt.loop(), std::move(*fd)); });
  };
  auto c = connect();

  // Unary, including empty and 1 MiB payloads.
  for (const std::string& p : {std::string("hello"), std::string(), std::string(1 << 20, '\x7f')}) {
    auto r = Call<BytesValue>(*c, "Echo", Bytes(p));
    ASSERT_TRUE(r.ok()) << r.error().ToString();
    EXPECT_EQ(r->value(), p);
  }

  // Metadata, as containerd sends its namespace.
  {
    CallOptions opts;
    opts.metadata["containerd-namespace-ttrpc"] = {"k8s.io"};
    opts.metadata["multi"] = {"a", "b"};
    auto r = Call<StringValue>(*c, "Metadata", StringValue(), opts);
    ASSERT_TRUE(r.ok()) << r.error().ToString();
    EXPECT_EQ(r->value(), "containerd-namespace-ttrpc=k8s.io;multi=a;multi=b;");
  }

  // Status codes and messages from Go's status package.
  {
    auto r = Call<StringValue>(*c, "Fail", Str("x"));
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().code(), Code::kFailedPrecondition);
    EXPECT_EQ(r.error().message(), "failing on purpose: x");
    EXPECT_EQ(Call<StringValue>(*c, "Nope", Str("")).error().code(), Code::kUnimplemented);
  }

  // Concurrent calls on one connection, all in flight at once.
  {
    constexpr int kCalls = 64;
    std::atomic<int> good{0}, finished{0};
    std::promise<void> done;
    lt.Sync([&] {
      for (int i = 0; i < kCalls; ++i) {
        c->Call(kSvc, "Echo", Bytes("c" + std::to_string(i)).SerializeAsString(), {},
                [&, i](Result<std::string> r) {
                  BytesValue b;
                  if (r.ok() && b.ParseFromString(*r) && b.value() == "c" + std::to_string(i)) {
                    good++;
                  }
                  if (++finished == kCalls) done.set_value();
                });
      }
    });
    done.get_future().wait();
    EXPECT_EQ(good.load(), kCalls);
  }

  // A call that outlives others: Hold stays open while Echo calls complete.
  {
    std::promise<Result<std::string>> held;
    lt.Sync([&] {
      c->Call(kSvc, "Hold", Str("long").SerializeAsString(), {},
              [&](Result<std::string> r) { held.set_value(std::move(r)); });
    });
    auto fut = held.get_future();
    for (int i = 0; i < 10; ++i) ASSERT_TRUE(Call<BytesValue>(*c, "Echo", Bytes("m")).ok());
    EXPECT_EQ(fut.wait_for(0ms), std::future_status::timeout);
    ASSERT_TRUE(Call<StringValue>(*connect(), "Release", StringValue()).ok());
    auto r = fut.get();
    ASSERT_TRUE(r.ok()) << r.error().ToString();
    StringValue s;
    ASSERT_TRUE(s.ParseFromString(*r));
    EXPECT_EQ(s.value(), "released long");
  }

  // Deadline: the Go server sees timeout_nano and cancels; we also stop waiting.
  {
    CallOptions opts;
    opts.timeout = 200ms;
    auto r = Call<StringValue>(*c, "Hold", Str("deadline"), opts);
    EXPECT_EQ(r.error().code(), Code::kDeadlineExceeded);
    EXPECT_TRUE(Call<BytesValue>(*c, "Echo", Bytes("after")).ok());
  }

  // 4 MiB + 1: refused by our client before sending; the connection stays usable.
  {
    auto r = Call<BytesValue>(*c, "Echo", Bytes(std::string(kMaxMessageSize + 1, 'x')));
    EXPECT_EQ(r.error().code(), Code::kResourceExhausted);
    EXPECT_TRUE(Call<BytesValue>(*c, "Echo", Bytes("after")).ok());
  }

  // A raw 4 MiB + 1 frame that bypasses our client check: the Go server answers that stream with
  // RESOURCE_EXHAUSTED and keeps the connection, which is what our server does too.
  {
    auto fd = ConnectUnix(sock);
    ASSERT_TRUE(fd.ok());
    char h[kHeaderSize];
    std::string junk(kMaxMessageSize + 1, 'j');
    EncodeHeader(FrameHeader{static_cast<uint32_t>(junk.size()), 1, kTypeRequest, 0}, h);
    ASSERT_TRUE(WriteAll(fd->get(), h, sizeof(h)).ok());
    ASSERT_TRUE(WriteAll(fd->get(), junk.data(), junk.size()).ok());
    ASSERT_TRUE(ReadExact(fd->get(), h, sizeof(h)).ok());
    FrameHeader rh = DecodeHeader(h);
    EXPECT_EQ(rh.stream_id, 1u);
    std::string body(rh.length, '\0');
    ASSERT_TRUE(ReadExact(fd->get(), body.data(), body.size()).ok());
    ::ttrpc::Response resp;
    ASSERT_TRUE(resp.ParseFromString(body));
    EXPECT_EQ(resp.status().code(), static_cast<int>(Code::kResourceExhausted));
  }

  // An oversize response: the Go server cannot send it and drops the connection. The call must
  // fail promptly, never hang.
  {
    auto c2 = connect();
    UInt64Value n;
    n.set_value(kMaxMessageSize + 1);
    CallOptions opts;
    opts.timeout = 10s;
    auto r = Call<BytesValue>(*c2, "Big", n, opts);
    ASSERT_FALSE(r.ok());
    EXPECT_NE(r.error().code(), Code::kDeadlineExceeded) << r.error().ToString();
    lt.Sync([&] { c2.reset(); });
  }

  lt.Sync([&] { c.reset(); });
  server.stdin_w.Reset();
  EXPECT_EQ(server.Wait(), 0) << server.Output();
}

TEST_F(InteropTest, GoClientAgainstCppServer) {
  std::string sock = TempSocket("cppserver");
  peapod::testing::LoopThread lt;
  std::vector<Responder> held;
  std::vector<std::string> held_values;
  std::unique_ptr<Server> server;
  lt.Sync([&] {
    server = std::make_unique<Server>(lt.loop());
    auto typed = [&](const char* method, auto fn) {
      server->Register(kSvc, method, [fn](const CallContext& ctx, std::string p, Responder r) {
        fn(ctx, std::move(p), std::move(r));
      });
    };
    typed("Echo", [](const CallContext&, std::string p, Responder r) { r(std::move(p)); });
    typed("Fail", [](const CallContext&, std::string p, Responder r) {
      StringValue s;
      s.ParseFromString(p);
      r(Error(Code::kFailedPrecondition, "failing on purpose: " + s.value()));
    });
    typed("Metadata", [](const CallContext& ctx, std::string, Responder r) {
      std::string out;
      for (const auto& [k, vs] : ctx.metadata) {  // std::map: keys sorted, as the Go side does
        for (const auto& v : vs) out += k + "=" + v + ";";
      }
      r(Str(out).SerializeAsString());
    });
    typed("Big", [](const CallContext&, std::string p, Responder r) {
      UInt64Value n;
      n.ParseFromString(p);
      r(Bytes(std::string(n.value(), 'b')).SerializeAsString());
    });
    typed("Hold", [&](const CallContext&, std::string p, Responder r) {
      StringValue s;
      s.ParseFromString(p);
      // Answer later with the request's value, as the Go server does.
      held.push_back(r);
      held_values.push_back(s.value());
    });
    typed("Release", [&](const CallContext&, std::string, Responder r) {
      for (size_t i = 0; i < held.size(); ++i) {
        held[i](Str("released " + held_values[i]).SerializeAsString());
      }
      held.clear();
      held_values.clear();
      r(Str("ok").SerializeAsString());
    });
    ASSERT_TRUE(server->Listen(sock).ok());
  });

  Child client({InteropBinary(), "client", "-socket", sock}, sock + ".log");
  client.stdin_w.Reset();
  int rc = client.Wait();
  std::string out = client.Output();
  std::printf("%s", out.c_str());
  EXPECT_EQ(rc, 0) << out;
  EXPECT_NE(out.find("10 passed, 0 failed"), std::string::npos) << out;
  lt.Sync([&] {
    held.clear();
    server.reset();
  });
  std::filesystem::remove(sock);
}

}  // namespace
}  // namespace peapod::ttrpc
