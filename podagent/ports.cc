#include "podagent/ports.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <spdlog/spdlog.h>

namespace peapod::agent {

PortRelay::~PortRelay() {
  for (auto& [id, c] : conns_) Drop(c);
}

void PortRelay::Drop(Conn& c) {
  if (c.watch) loop_->Unwatch(c.watch);
  if (c.timer) loop_->CancelTimer(c.timer);
  c.watch = 0;
  c.timer = 0;
  if (c.done) {
    auto done = std::move(c.done);
    c.done = nullptr;
    done(Error::Make(Code::kCancelled, "connection to port {} closed while connecting", c.port));
  }
}

void PortRelay::Open(uint32_t port, std::function<void(Result<std::string>)> done) {
  if (port == 0 || port > 65535) {
    return done(Error::Invalid("port {} is not a TCP port (1-65535)", port));
  }
  if (conns_.size() >= kMaxConnections) {
    return done(Error::Make(Code::kResourceExhausted,
                            "{} forwarded connections are open already; close some first",
                            conns_.size()));
  }
  UniqueFd fd(::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
  if (!fd) return done(Error::Errno("socket"));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(port));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  int rc = ::connect(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr));
  if (rc < 0 && errno != EINPROGRESS) {
    return done(Error::Errno(fmt::format("connect to 127.0.0.1:{} in the pod", port)));
  }
  std::string id = std::to_string(next_id_++);
  Conn& c = conns_[id];
  c.port = port;
  c.connecting = std::move(fd);
  c.done = std::move(done);
  if (rc == 0) return Connected(id, 0);
  auto w = loop_->Watch(c.connecting.get(), EPOLLOUT, [this, id](uint32_t) {
    auto it = conns_.find(id);
    if (it == conns_.end()) return;
    int err = 0;
    socklen_t len = sizeof(err);
    if (::getsockopt(it->second.connecting.get(), SOL_SOCKET, SO_ERROR, &err, &len) < 0) {
      err = errno;
    }
    Connected(id, err);
  });
  if (!w.ok()) {
    auto d = std::move(c.done);
    conns_.erase(id);
    return d(w.error());
  }
  c.watch = *w;
  c.timer = loop_->AddTimer(kConnectTimeout, [this, id] {
    auto it = conns_.find(id);
    if (it == conns_.end()) return;
    it->second.timer = 0;
    Connected(id, ETIMEDOUT);
  });
}

void PortRelay::Connected(const std::string& id, int err) {
  auto it = conns_.find(id);
  if (it == conns_.end()) return;
  Conn& c = it->second;
  if (c.watch) loop_->Unwatch(c.watch);
  if (c.timer) loop_->CancelTimer(c.timer);
  c.watch = 0;
  c.timer = 0;
  auto done = std::move(c.done);
  c.done = nullptr;
  if (err != 0) {
    Error e = Error::Errno(fmt::format("connect to 127.0.0.1:{} in the pod", c.port), err);
    conns_.erase(it);
    return done(std::move(e));
  }
  // Two fds on one socket: the output stream reads until the peer's EOF while the input stream
  // may already have half-closed the sending side.
  UniqueFd rd(::fcntl(c.connecting.get(), F_DUPFD_CLOEXEC, 0));
  if (!rd) {
    Error e = Error::Errno("dup");
    conns_.erase(it);
    return done(std::move(e));
  }
  c.out = std::make_unique<OutputStream>(loop_, std::move(rd), false);
  c.in = std::make_unique<InputStream>(loop_, std::move(c.connecting), true);
  if (auto r = c.out->Start(); !r.ok()) {
    conns_.erase(it);
    return done(r.error());
  }
  spdlog::debug("agent: port {}: connection {} open", c.port, id);
  done(id);
}

Result<OutputStream*> PortRelay::Output(const std::string& id) {
  auto it = conns_.find(id);
  if (it == conns_.end() || !it->second.out) {
    return Error::NotFound("no forwarded connection {}", id);
  }
  return it->second.out.get();
}

Result<InputStream*> PortRelay::Input(const std::string& id) {
  auto it = conns_.find(id);
  if (it == conns_.end() || !it->second.in) {
    return Error::NotFound("no forwarded connection {}", id);
  }
  return it->second.in.get();
}

void PortRelay::Close(const std::string& id) {
  if (id.empty()) {
    auto all = std::move(conns_);
    conns_.clear();
    for (auto& [i, c] : all) Drop(c);
    return;
  }
  auto it = conns_.find(id);
  if (it == conns_.end()) return;
  Conn c = std::move(it->second);
  conns_.erase(it);
  Drop(c);
}

}  // namespace peapod::agent
