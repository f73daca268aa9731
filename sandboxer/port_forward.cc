#include "sandboxer/port_forward.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include <spdlog/spdlog.h>

#include "common/agentapi/agent_client.h"
#include "peapod/agent/v1/agent.pb.h"
#include "sandboxer/network.h"

namespace peapod::sandboxer {

namespace v1 = peapod::agent::v1;

namespace {

constexpr size_t kChunk = 64 << 10;  // per read from either side
constexpr size_t kMaxConnections = 1024;

}  // namespace

struct PortForwarder::Conn {
  uint64_t n = 0;  // key in conns_
  UniqueFd fd;     // the connection containerd made, accepted in the pod netns
  uint16_t port = 0;
  std::string id;  // the agent's name for its end; empty until OpenPort answers
  EventLoop::WatchId watch = 0;
  uint32_t events = 0;      // what watch asks for
  bool to_guest = false;    // a WritePort is in flight
  bool host_eof = false;    // the host side sent EOF (and the agent was told)
  bool from_guest = false;  // a ReadPort is in flight
  bool guest_eof = false;   // the guest side sent EOF
  std::string to_host;      // read from the guest, not yet written to the host side
};

PortForwarder::PortForwarder(EventLoop* loop, std::string pod_id,
                             std::shared_ptr<ttrpc::Client> agent)
    : loop_(loop), pod_id_(std::move(pod_id)), agent_(std::move(agent)) {}

Result<std::unique_ptr<PortForwarder>> PortForwarder::Start(EventLoop* loop,
                                                            const std::string& pod_id,
                                                            const std::string& netns_path,
                                                            std::shared_ptr<ttrpc::Client> agent) {
  std::unique_ptr<PortForwarder> f(new PortForwarder(loop, pod_id, std::move(agent)));
  PP_TRY(InNetns(netns_path, [&]() -> Result<void> {
    f->listener_ = UniqueFd(::socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0));
    if (!f->listener_) return Error::Errno("socket");
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (::bind(f->listener_.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) < 0) {
      return Error::Errno("bind 127.0.0.1 in the pod netns (is its loopback up?)");
    }
    if (::listen(f->listener_.get(), 128) < 0) return Error::Errno("listen");
    return Ok();
  }));
  PP_ASSIGN_OR_RETURN(f->steering_, SteerLoopback(netns_path, f->listener_.get()));
  PortForwarder* self = f.get();
  PP_ASSIGN_OR_RETURN(
      f->watch_, loop->Watch(f->listener_.get(), EPOLLIN, [self](uint32_t) { self->OnAccept(); }));
  f->CloseInGuest("");  // connections a previous sandboxer (before a restart) left open
  return f;
}

PortForwarder::~PortForwarder() {
  if (watch_) loop_->Unwatch(watch_);
  for (auto& [n, c] : conns_) {
    if (c->watch) loop_->Unwatch(c->watch);
    if (!c->id.empty()) CloseInGuest(c->id);
  }
}

void PortForwarder::CloseInGuest(const std::string& id) {
  if (!agent_ || agent_->closed()) return;
  v1::ClosePortRequest req;
  req.set_id(id);
  agentapi::AgentClient::Over(agent_).ClosePort(req, [](Result<agentapi::Empty>) {});
}

void PortForwarder::Forget(uint64_t n) {
  Conn* c = Find(n);
  if (!c) return;
  if (!c->id.empty()) CloseInGuest(c->id);
  if (c->watch) loop_->Unwatch(c->watch);
  conns_.erase(n);
}

PortForwarder::Conn* PortForwarder::Find(uint64_t n) {
  auto it = conns_.find(n);
  return it == conns_.end() ? nullptr : it->second.get();
}

void PortForwarder::OnAccept() {
  for (;;) {
    UniqueFd fd(::accept4(listener_.get(), nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC));
    if (!fd) {
      if (errno == EINTR) continue;
      if (errno != EAGAIN)
        spdlog::warn("pod {}: port forward: accept: {}", pod_id_, strerror(errno));
      return;
    }
    // The program kept the address containerd dialed: it is the accepted socket's own.
    sockaddr_in local{};
    socklen_t len = sizeof(local);
    if (::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&local), &len) < 0) continue;
    if (conns_.size() >= kMaxConnections) {
      spdlog::warn("pod {}: port forward: {} connections open; refusing another", pod_id_,
                   conns_.size());
      continue;
    }
    uint64_t n = next_++;
    auto c = std::make_unique<Conn>();
    c->n = n;
    c->fd = std::move(fd);
    c->port = ntohs(local.sin_port);
    spdlog::debug("pod {}: port forward: connection {} to port {}", pod_id_, n, c->port);
    v1::OpenPortRequest req;
    req.set_port(c->port);
    conns_[n] = std::move(c);
    std::weak_ptr<bool> alive = alive_;
    agentapi::AgentClient::Over(agent_).OpenPort(
        req,
        [this, alive, n](Result<v1::OpenPortResponse> r) {
          if (alive.expired()) return;
          if (!r.ok()) return Opened(n, std::move(r).error());
          if (r->id().empty()) return Opened(n, Error::Internal("malformed OpenPort answer"));
          Opened(n, r->id());
        },
        std::chrono::seconds(15));
  }
}

void PortForwarder::Opened(uint64_t n, Result<std::string> id) {
  Conn* c = Find(n);
  if (!c) return;
  if (!id.ok()) {
    // Nothing listens on that port in the guest (or the guest is going away): the client sees
    // its connection closed, as a plain TCP proxy would do.
    spdlog::info("pod {}: port forward to port {}: {}", pod_id_, c->port, id.error().ToString());
    conns_.erase(n);
    return;
  }
  c->id = *id;
  UpdateWatch(*c);
  ReadGuest(n);
}

void PortForwarder::UpdateWatch(Conn& c) {
  uint32_t want = 0;
  if (!c.id.empty() && !c.to_guest && !c.host_eof) want |= EPOLLIN;
  if (!c.to_host.empty()) want |= EPOLLOUT;
  if (want == c.events && (c.watch != 0) == (want != 0)) return;
  // Nothing wanted: no watch at all, since epoll reports a hang-up even for no events and a
  // level-triggered hang-up would spin while a WritePort is in flight.
  if (want == 0) {
    if (c.watch) loop_->Unwatch(c.watch);
    c.watch = 0;
    c.events = 0;
    return;
  }
  if (c.watch) {
    if (loop_->Modify(c.watch, want).ok()) c.events = want;
    return;
  }
  uint64_t n = c.n;
  auto w = loop_->Watch(c.fd.get(), want, [this, n](uint32_t ev) { OnHostEvents(n, ev); });
  if (!w.ok()) {
    spdlog::warn("pod {}: port forward: {}", pod_id_, w.error().ToString());
    return;
  }
  c.watch = *w;
  c.events = want;
}

void PortForwarder::OnHostEvents(uint64_t n, uint32_t events) {
  Conn* c = Find(n);
  if (!c) return;
  if (events & EPOLLOUT) {
    FlushToHost(*c);
    if (!(c = Find(n))) return;
  }
  if (!(c->events & EPOLLIN)) {
    // Only a hang-up or error while we wait to write: FlushToHost sees it (EPIPE) when it writes.
    if ((events & (EPOLLHUP | EPOLLERR)) && c->to_host.empty()) UpdateWatch(*c);
    return;
  }
  if (!(events & (EPOLLIN | EPOLLHUP | EPOLLERR))) return;
  std::string data(kChunk, '\0');
  ssize_t got = ::read(c->fd.get(), data.data(), data.size());
  if (got < 0) {
    if (errno == EAGAIN || errno == EINTR) return;
    if (errno == ECONNRESET) return Abort(n, "");
    return Abort(n, std::string("read: ") + strerror(errno));
  }
  data.resize(static_cast<size_t>(got));
  v1::PortIoRequest req;
  req.set_id(c->id);
  if (got == 0) {
    req.set_close_write(true);
    c->host_eof = true;
  } else {
    req.set_data(std::move(data));
  }
  c->to_guest = true;
  UpdateWatch(*c);
  std::weak_ptr<bool> alive = alive_;
  agentapi::AgentClient::Over(agent_).WritePort(
      req, [this, alive, n](Result<v1::WriteStreamResponse> r) {
        if (alive.expired()) return;
        Conn* c = Find(n);
        if (!c) return;
        // The guest side closed its receiving end: the client loses nothing it could
        // still deliver, so end the connection.
        if (!r.ok()) return Abort(n, "");
        c->to_guest = false;
        UpdateWatch(*c);
        MaybeFinish(n);
      });
}

void PortForwarder::ReadGuest(uint64_t n) {
  Conn* c = Find(n);
  if (!c || c->from_guest || c->guest_eof || !c->to_host.empty()) return;
  v1::PortIoRequest req;
  req.set_id(c->id);
  req.set_max_bytes(kChunk);
  c->from_guest = true;
  std::weak_ptr<bool> alive = alive_;
  agentapi::AgentClient::Over(agent_).ReadPort(req,
                                               [this, alive, n](Result<v1::ReadStreamResponse> r) {
                                                 if (alive.expired()) return;
                                                 Conn* c = Find(n);
                                                 if (!c) return;
                                                 c->from_guest = false;
                                                 if (!r.ok()) return Abort(n, "");
                                                 c->to_host += r->data();
                                                 if (r->eof()) c->guest_eof = true;
                                                 FlushToHost(*c);
                                               });
}

void PortForwarder::FlushToHost(Conn& c) {
  uint64_t n = c.n;
  while (!c.to_host.empty()) {
    ssize_t put = ::send(c.fd.get(), c.to_host.data(), c.to_host.size(), MSG_NOSIGNAL);
    if (put < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) break;
      return Abort(n, "");  // the client went away
    }
    c.to_host.erase(0, static_cast<size_t>(put));
  }
  UpdateWatch(c);
  if (!c.to_host.empty()) return;
  if (c.guest_eof) {
    ::shutdown(c.fd.get(), SHUT_WR);
    return MaybeFinish(n);
  }
  ReadGuest(n);
}

void PortForwarder::MaybeFinish(uint64_t n) {
  Conn* c = Find(n);
  if (!c || !c->host_eof || c->to_guest || !c->guest_eof || !c->to_host.empty()) return;
  Forget(n);
}

void PortForwarder::Abort(uint64_t n, const std::string& why) {
  Conn* c = Find(n);
  if (!c) return;
  if (!why.empty()) spdlog::info("pod {}: port forward to port {}: {}", pod_id_, c->port, why);
  Forget(n);
}

}  // namespace peapod::sandboxer
