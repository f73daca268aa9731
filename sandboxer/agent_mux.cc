#include "sandboxer/agent_mux.h"

#include <sys/socket.h>

#include <spdlog/spdlog.h>

#include "common/ttrpc/server.h"

namespace peapod::sandboxer {

using ttrpc::Frame;

AgentMux::~AgentMux() {
  *alive_ = false;
  if (listen_watch_) loop_->Unwatch(listen_watch_);
  auto clients = clients_;
  for (auto& c : clients) c->conn->Close();
  if (upstream_) upstream_->Close();
}

Result<void> AgentMux::AttachUpstream(UniqueFd fd) {
  if (upstream_) {
    auto old = std::move(upstream_);
    old->Close(Error(Code::kUnavailable, "agent channel replaced"));
  }
  std::weak_ptr<bool> alive = alive_;
  PP_ASSIGN_OR_RETURN(auto conn, ttrpc::Connection::Create(
                                     loop_, std::move(fd),
                                     [this, alive](Frame&& f) {
                                       if (!alive.expired()) OnUpstreamFrame(std::move(f));
                                     },
                                     [this, alive](const Error& why) {
                                       if (!alive.expired()) OnUpstreamClosed(why);
                                     }));
  upstream_ = std::move(conn);
  return Ok();
}

Result<void> AgentMux::ServeListener(UniqueFd listen_fd) {
  PP_TRY(SetNonBlocking(listen_fd.get()));
  listen_fd_ = std::move(listen_fd);
  PP_ASSIGN_OR_RETURN(listen_watch_, loop_->Watch(listen_fd_.get(), EPOLLIN, [this](uint32_t) {
    for (;;) {
      UniqueFd fd(::accept4(listen_fd_.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK));
      if (!fd) return;
      if (auto r = AddClient(std::move(fd)); !r.ok()) {
        spdlog::warn("mux: client not served: {}", r.error().ToString());
      }
    }
  }));
  return Ok();
}

Result<void> AgentMux::AddClient(UniqueFd fd) {
  auto client = std::make_shared<Client>();
  std::weak_ptr<Client> weak = client;
  std::weak_ptr<bool> alive = alive_;
  PP_ASSIGN_OR_RETURN(client->conn, ttrpc::Connection::Create(
                                        loop_, std::move(fd),
                                        [this, alive, weak](Frame&& f) {
                                          auto c = weak.lock();
                                          if (c && !alive.expired()) OnClientFrame(c, std::move(f));
                                        },
                                        [this, alive, weak](const Error&) {
                                          if (alive.expired()) return;
                                          // Its in-flight calls stay routed to a dead weak_ptr:
                                          // their responses are dropped when they come.
                                          if (auto c = weak.lock()) clients_.erase(c);
                                        }));
  clients_.insert(client);
  return Ok();
}

void AgentMux::Answer(const std::shared_ptr<Client>& client, uint32_t stream, const Error& err) {
  (void)client->conn->Send(stream, ttrpc::kTypeResponse, 0, ttrpc::EncodeResponse(err));
}

void AgentMux::OnClientFrame(const std::shared_ptr<Client>& client, Frame&& frame) {
  const auto& h = frame.header;
  if (h.type != ttrpc::kTypeRequest) {
    spdlog::debug("mux: dropping client frame type {} on stream {}", h.type, h.stream_id);
    return;
  }
  if (frame.oversized) {
    return Answer(client, h.stream_id,
                  Error::Make(Code::kResourceExhausted,
                              "request of {} bytes exceeds the ttrpc limit of {} bytes", h.length,
                              ttrpc::kMaxMessageSize));
  }
  if (!upstream_attached()) {
    return Answer(client, h.stream_id,
                  Error(Code::kUnavailable, "the pod's agent channel is not connected"));
  }
  if (next_upstream_stream_ > 0x7fffffffu) {
    // ttrpc stream ids may not wrap: a channel this old is reconnected by the sandboxer.
    return Answer(client, h.stream_id,
                  Error(Code::kUnavailable, "agent channel stream ids exhausted; reconnecting"));
  }
  uint32_t up = next_upstream_stream_;
  next_upstream_stream_ += 2;
  routes_[up] = Route{client, h.stream_id};
  if (auto r = upstream_->Send(up, ttrpc::kTypeRequest, h.flags, frame.payload); !r.ok()) {
    routes_.erase(up);
    Answer(client, h.stream_id, r.error());
  }
}

void AgentMux::OnUpstreamFrame(Frame&& frame) {
  const auto& h = frame.header;
  auto it = routes_.find(h.stream_id);
  if (it == routes_.end()) {
    spdlog::debug("mux: agent answered unknown stream {}", h.stream_id);
    return;
  }
  Route route = it->second;
  // A unary call ends with its response; stream data (unused by the agent API) keeps the route.
  if (h.type == ttrpc::kTypeResponse) routes_.erase(it);
  auto client = route.client.lock();
  if (!client || client->conn->closed()) return;  // the caller went away: drop it
  if (frame.oversized) {
    return Answer(client, route.client_stream,
                  Error::Make(Code::kResourceExhausted,
                              "agent response of {} bytes exceeds the ttrpc limit", h.length));
  }
  (void)client->conn->Send(route.client_stream, h.type, h.flags, frame.payload);
}

void AgentMux::OnUpstreamClosed(const Error& why) {
  spdlog::warn("mux: agent channel closed: {}", why.ToString());
  auto routes = std::move(routes_);
  routes_.clear();
  Error err(Code::kUnavailable, "the pod's agent channel closed: " + why.message());
  for (auto& [up, route] : routes) {
    if (auto client = route.client.lock()) Answer(client, route.client_stream, err);
  }
  upstream_.reset();
  next_upstream_stream_ = 1;
  if (on_upstream_closed_) on_upstream_closed_(why);
}

}  // namespace peapod::sandboxer
