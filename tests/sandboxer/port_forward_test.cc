// CRI PortForward's host relay without a VM: a PortForwarder in a netns made by the test,
// relaying through a real peapod-agent in local mode (its "guest" 127.0.0.1 is the host's), to
// a TCP server the test runs on the host. containerd does what the client here does: it enters
// the pod netns and connects to 127.0.0.1:<port>. Needs root (netns, BPF), so labelled root.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <future>
#include <string>
#include <thread>

#include <gtest/gtest.h>

#include "common/base/unique_fd.h"
#include "common/loop/event_loop.h"
#include "common/ttrpc/client.h"
#include "sandboxer/loopback_steer.h"
#include "sandboxer/network.h"
#include "sandboxer/port_forward.h"
#include "tests/sandboxer/fake_backend.h"

namespace peapod::sandboxer {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;
using testing::FakeBackend;

int Sh(const std::string& cmd) { return std::system(cmd.c_str()); }

// A TCP listener on the host's 127.0.0.1 (a free port).
UniqueFd ListenLoopback(uint16_t* port) {
  UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof(a)) < 0) return {};
  if (::listen(fd.get(), 16) < 0) return {};
  socklen_t len = sizeof(a);
  ::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&a), &len);
  *port = ntohs(a.sin_port);
  return fd;
}

// Reads until EOF (or an error, or 20 s without data).
std::string ReadAll(int fd) {
  std::string out;
  char buf[65536];
  for (;;) {
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 20000) <= 0) break;
    ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n <= 0) break;
    out.append(buf, static_cast<size_t>(n));
  }
  return out;
}

bool WriteAll(int fd, const std::string& data) {
  size_t off = 0;
  while (off < data.size()) {
    ssize_t n = ::send(fd, data.data() + off, data.size() - off, MSG_NOSIGNAL);
    if (n <= 0) return false;
    off += static_cast<size_t>(n);
  }
  return true;
}

class PortForwardTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (::geteuid() != 0) GTEST_SKIP() << "needs root (a netns, BPF, peapod-agent)";
    if (::access(PEAPOD_AGENT_BINARY, X_OK) != 0) {
      GTEST_SKIP() << PEAPOD_AGENT_BINARY << " is not built";
    }
    if (Sh("command -v ip >/dev/null") != 0) GTEST_SKIP() << "the test needs ip(8) for its netns";
    netns_ = "pp-pf-" + std::to_string(::getpid());
    ASSERT_EQ(Sh("ip netns add " + netns_), 0);
    ASSERT_EQ(Sh("ip -n " + netns_ + " link set lo up"), 0);
    char tmpl[] = "/tmp/peapod-pf-XXXXXX";
    ASSERT_NE(::mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    backend_ = std::make_unique<FakeBackend>(PEAPOD_AGENT_BINARY, dir_);
    VmSpec spec;
    spec.name = "pf";
    spec.agent_socket = dir_ + "/agent.sock";
    auto vm = backend_->Start(spec);
    ASSERT_TRUE(vm.ok()) << vm.error().ToString();
    auto loop = EventLoop::Create();
    ASSERT_TRUE(loop.ok());
    loop_ = std::move(*loop);
    thread_ = std::thread([this] { loop_->Run(); });
    OnLoop([this] {
      auto fd = ConnectUnix(dir_ + "/agent.sock");
      ASSERT_TRUE(fd.ok()) << fd.error().ToString();
      auto c = ttrpc::Client::Create(loop_.get(), std::move(*fd));
      ASSERT_TRUE(c.ok()) << c.error().ToString();
      agent_ = *c;
    });
    ASSERT_TRUE(agent_);
  }

  void TearDown() override {
    if (loop_) {
      OnLoop([this] {
        forwarder_.reset();
        if (agent_) agent_->Close();
        agent_.reset();
      });
      loop_->Stop();
      thread_.join();
    }
    backend_.reset();
    if (!netns_.empty()) Sh("ip netns del " + netns_ + " 2>/dev/null");
    if (!dir_.empty()) fs::remove_all(dir_);
  }

  void OnLoop(std::function<void()> fn) {
    std::promise<void> done;
    loop_->Post([&] {
      fn();
      done.set_value();
    });
    done.get_future().wait();
  }

  std::string NetnsPath() const { return "/var/run/netns/" + netns_; }

  Result<void> StartForwarder() {
    Result<void> r = Ok();
    OnLoop([&] {
      auto f = PortForwarder::Start(loop_.get(), "pf", NetnsPath(), agent_);
      if (!f.ok()) {
        r = std::move(f).error();
        return;
      }
      forwarder_ = std::move(*f);
    });
    return r;
  }

  // A connected socket to 127.0.0.1:port made in the pod netns (or the host's), as containerd
  // makes it.
  Result<UniqueFd> Dial(uint16_t port, bool in_pod = true) {
    UniqueFd fd;
    auto connect = [&]() -> Result<void> {
      fd = UniqueFd(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
      sockaddr_in a{};
      a.sin_family = AF_INET;
      a.sin_port = htons(port);
      a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
      if (::connect(fd.get(), reinterpret_cast<sockaddr*>(&a), sizeof(a)) < 0) {
        return Error::Errno("connect");
      }
      return Ok();
    };
    PP_TRY(in_pod ? InNetns(NetnsPath(), connect) : connect());
    return fd;
  }

  std::string netns_, dir_;
  std::unique_ptr<FakeBackend> backend_;
  std::unique_ptr<EventLoop> loop_;
  std::thread thread_;
  std::shared_ptr<ttrpc::Client> agent_;
  std::unique_ptr<PortForwarder> forwarder_;
};

TEST_F(PortForwardTest, AConnectionToAnyPortInThePodNetnsReachesThatPortInTheGuest) {
  uint16_t port = 0;
  UniqueFd server = ListenLoopback(&port);
  ASSERT_TRUE(server);
  // Nothing in the pod netns listens there: without the forwarder the connection is refused.
  auto before = Dial(port);
  ASSERT_FALSE(before.ok());
  EXPECT_EQ(before.error().code(), Code::kUnavailable) << before.error().ToString();

  ASSERT_TRUE(StartForwarder().ok());
  // The "guest" (the host, for a local agent) reads everything, then answers with it: 2 MiB each
  // way go through the relay's back-pressure, and EOF crosses in both directions.
  std::string payload(2 << 20, 'x');
  for (size_t i = 0; i < payload.size(); i += 4096) payload[i] = static_cast<char>('a' + i % 26);
  std::thread guest([&] {
    UniqueFd c(::accept(server.get(), nullptr, nullptr));
    std::string got = ReadAll(c.get());
    WriteAll(c.get(), "echo:" + got);
  });
  auto conn = Dial(port);
  ASSERT_TRUE(conn.ok()) << conn.error().ToString();
  ASSERT_TRUE(WriteAll(conn->get(), payload));
  ::shutdown(conn->get(), SHUT_WR);
  std::string answer = ReadAll(conn->get());
  guest.join();
  EXPECT_EQ(answer.size(), payload.size() + 5);
  EXPECT_TRUE(answer == "echo:" + payload);

  // The host's own 127.0.0.1 is untouched: a port nobody listens on is still refused there.
  uint16_t unused = 0;
  { UniqueFd probe = ListenLoopback(&unused); }
  auto host = Dial(unused, /*in_pod=*/false);
  EXPECT_FALSE(host.ok());
  // The finished connection is gone from the relay.
  size_t open = 1;
  for (int i = 0; i < 100 && open; ++i) {
    OnLoop([&] { open = forwarder_->connections(); });
    if (open) std::this_thread::sleep_for(20ms);
  }
  EXPECT_EQ(open, 0u);
}

TEST_F(PortForwardTest, APortNobodyListensOnInTheGuestClosesTheConnection) {
  ASSERT_TRUE(StartForwarder().ok());
  uint16_t unused = 0;
  { UniqueFd probe = ListenLoopback(&unused); }
  auto conn = Dial(unused);
  ASSERT_TRUE(conn.ok()) << conn.error().ToString();  // the relay accepts for any port...
  auto t0 = std::chrono::steady_clock::now();
  EXPECT_EQ(ReadAll(conn->get()), "");  // ...and closes as soon as the guest refuses
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 10s);
}

TEST_F(PortForwardTest, DroppingTheForwarderDetachesItFromTheNetns) {
  uint16_t port = 0;
  UniqueFd server = ListenLoopback(&port);
  ASSERT_TRUE(StartForwarder().ok());
  OnLoop([&] { forwarder_.reset(); });
  auto conn = Dial(port);
  ASSERT_FALSE(conn.ok());
  EXPECT_EQ(conn.error().code(), Code::kUnavailable) << conn.error().ToString();
}

}  // namespace
}  // namespace peapod::sandboxer
