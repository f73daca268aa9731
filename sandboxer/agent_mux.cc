#include "sandboxer/agent_mux.h"

#include <sys/socket.h>

#include <vector>

#include <spdlog/spdlog.h>

#include "common/ttrpc/server.h"

namespace peapod::sandboxer {

using ttrpc::Frame;

namespace {
// The mux's callbacks may still run while it is being destroyed (closing a connection calls
// back): they do nothing once the destructor has started.
bool Live(const std::weak_ptr<bool>& alive) {
  auto a = alive.lock();
  return a && *a;
}
}  // namespace

AgentMux::~AgentMux() {
  *alive_ = false;
  if (listen_watch_) loop_->Unwatch(listen_watch_);
  if (stall_timer_) loop_->CancelTimer(stall_timer_);
  if (drop_log_timer_) loop_->CancelTimer(drop_log_timer_);
  auto clients = clients_;
  for (auto& c : clients) c->conn->Close();
  if (upstream_) upstream_->Close();
}

void AgentMux::set_name(std::string name) { name_ = std::move(name); }

Result<void> AgentMux::AttachUpstream(UniqueFd fd) {
  if (upstream_) {
    auto old = std::move(upstream_);
    old->Close(Error(Code::kUnavailable, "agent channel replaced"));
  }
  std::weak_ptr<bool> alive = alive_;
  PP_ASSIGN_OR_RETURN(auto conn, ttrpc::Connection::Create(
                                     loop_, std::move(fd),
                                     [this, alive](Frame&& f) {
                                       if (Live(alive)) OnUpstreamFrame(std::move(f));
                                     },
                                     [this, alive](const Error& why) {
                                       if (Live(alive)) OnUpstreamClosed(why);
                                     }));
  upstream_ = std::move(conn);
  // Clients still backlogged from the previous channel hold this one too.
  UpdateBackpressure();
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
        spdlog::warn("mux pod={}: client not served: {}", name_, r.error().ToString());
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
                                          if (c && Live(alive)) OnClientFrame(c, std::move(f));
                                        },
                                        [this, alive, weak](const Error&) {
                                          auto c = weak.lock();
                                          if (c && Live(alive)) OnClientClosed(c);
                                        }));
  client->conn->SetOnDrain([this, alive] {
    // Only a stopped channel cares; this runs after every write that leaves a short queue.
    if (Live(alive) && paused_) UpdateBackpressure();
  });
  clients_.insert(client);
  return Ok();
}

size_t AgentMux::queued_bytes() const {
  size_t n = 0;
  for (const auto& c : clients_) n += c->conn->queued_bytes();
  return n;
}

void AgentMux::Answer(const std::shared_ptr<Client>& client, uint32_t stream, const Error& err) {
  (void)client->conn->Send(stream, ttrpc::kTypeResponse, 0, ttrpc::EncodeResponse(err));
}

void AgentMux::OnClientFrame(const std::shared_ptr<Client>& client, Frame&& frame) {
  const auto& h = frame.header;
  if (h.type != ttrpc::kTypeRequest) {
    spdlog::debug("mux pod={}: dropping client frame type {} on stream {}", name_, h.type,
                  h.stream_id);
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
  if (client->routes.size() >= kMaxCallsPerClient || routes_.size() >= kMaxCalls) {
    // The agent is not answering (or a client forgets its calls): refuse rather than remember
    // without bound.
    ++stats_.refused_calls;
    return Answer(
        client, h.stream_id,
        Error::Make(Code::kResourceExhausted,
                    "too many calls in flight to the pod's agent: {} of this client "
                    "(limit {}), {} in all (limit {})",
                    client->routes.size(), kMaxCallsPerClient, routes_.size(), kMaxCalls));
  }
  if (next_upstream_stream_ > 0x7fffffffu) {
    // ttrpc stream ids may not wrap: a channel this old is reconnected by the sandboxer.
    return Answer(client, h.stream_id,
                  Error(Code::kUnavailable, "agent channel stream ids exhausted; reconnecting"));
  }
  uint32_t up = next_upstream_stream_;
  next_upstream_stream_ += 2;
  routes_[up] = Route{client, h.stream_id};
  client->routes.insert(up);
  // The channel's own write queue is capped too (a guest that stops reading): past it the
  // call is refused with RESOURCE_EXHAUSTED.
  if (auto r = upstream_->Send(up, ttrpc::kTypeRequest, h.flags, frame.payload); !r.ok()) {
    routes_.erase(up);
    client->routes.erase(up);
    Answer(client, h.stream_id, r.error());
  }
}

void AgentMux::OnClientClosed(const std::shared_ptr<Client>& client) {
  clients_.erase(client);
  // Its calls are forgotten now, not when (if ever) the agent answers them.
  for (uint32_t up : client->routes) routes_.erase(up);
  stats_.forgotten_calls += client->routes.size();
  client->routes.clear();
  if (paused_) UpdateBackpressure();
}

void AgentMux::OnUpstreamFrame(Frame&& frame) {
  const auto& h = frame.header;
  // The agent serves; it never calls. peapod's services are unary: a response carries no
  // flags. Anything else is not forwarded (the decoder already skipped an oversized payload).
  if (h.type != ttrpc::kTypeResponse || h.flags != 0) return CountDrop(Drop::kNotResponse, h);
  auto it = routes_.find(h.stream_id);
  if (it == routes_.end()) return CountDrop(Drop::kUnknownStream, h);
  Route route = it->second;
  routes_.erase(it);
  auto client = route.client.lock();
  if (!client) return;
  client->routes.erase(h.stream_id);
  if (client->conn->closed()) return;
  if (frame.oversized) {
    ++stats_.oversized_responses;
    return Answer(client, route.client_stream,
                  Error::Make(Code::kResourceExhausted,
                              "agent response of {} bytes exceeds the ttrpc limit", h.length));
  }
  if (auto r = client->conn->Send(route.client_stream, ttrpc::kTypeResponse, 0, frame.payload);
      !r.ok()) {
    // Cannot happen below the hard cap, which back-pressure keeps the queue under; a client
    // that got there anyway would wait forever for this answer: close it instead.
    spdlog::warn("mux pod={}: closing a client: {}", name_, r.error().ToString());
    client->conn->Close(r.error());
    return;
  }
  if (client->conn->queued_bytes() > 0) UpdateBackpressure();
}

void AgentMux::OnUpstreamClosed(const Error& why) {
  spdlog::warn("mux pod={}: agent channel closed: {}", name_, why.ToString());
  auto routes = std::move(routes_);
  routes_.clear();
  for (const auto& c : clients_) c->routes.clear();
  paused_ = false;
  if (stall_timer_) loop_->CancelTimer(stall_timer_);
  stall_timer_ = 0;
  Error err(Code::kUnavailable, "the pod's agent channel closed: " + why.message());
  for (auto& [up, route] : routes) {
    if (auto client = route.client.lock()) Answer(client, route.client_stream, err);
  }
  upstream_.reset();
  next_upstream_stream_ = 1;
  if (on_upstream_closed_) on_upstream_closed_(why);
}

void AgentMux::UpdateBackpressure() {
  size_t total = 0;
  bool backlogged = false;
  for (const auto& c : clients_) {
    size_t q = c->conn->queued_bytes();
    if (c->conn->over_high_water()) {
      c->backlogged = true;
    } else if (c->conn->below_low_water()) {
      c->backlogged = false;
    }
    backlogged = backlogged || c->backlogged;
    total += q;
  }
  bool pause = upstream_attached() &&
               (backlogged || total >= (paused_ ? kMaxQueuedBytes / 2 : kMaxQueuedBytes));
  if (pause == paused_) return;
  paused_ = pause;
  if (pause) {
    ++stats_.upstream_pauses;
    spdlog::debug("mux pod={}: clients hold {} bytes; not reading the agent channel", name_, total);
    upstream_->PauseReading();
    std::weak_ptr<bool> alive = alive_;
    stall_timer_ = loop_->AddTimer(stall_timeout_, [this, alive] {
      if (Live(alive)) OnStallTimeout();
    });
  } else {
    spdlog::debug("mux pod={}: clients drained; reading the agent channel again", name_);
    if (stall_timer_) loop_->CancelTimer(stall_timer_);
    stall_timer_ = 0;
    if (upstream_) upstream_->ResumeReading();
  }
}

void AgentMux::OnStallTimeout() {
  stall_timer_ = 0;
  if (!paused_) return;
  // The clients that stopped the channel: each one past its high-water mark, or else (the
  // total is over kMaxQueuedBytes) the one holding the most.
  std::vector<std::shared_ptr<Client>> victims;
  for (const auto& c : clients_) {
    if (c->backlogged) victims.push_back(c);
  }
  if (victims.empty()) {
    std::shared_ptr<Client> biggest;
    for (const auto& c : clients_) {
      if (!biggest || c->conn->queued_bytes() > biggest->conn->queued_bytes()) biggest = c;
    }
    if (biggest) victims.push_back(biggest);
  }
  for (const auto& c : victims) {
    ++stats_.stalled_clients_closed;
    spdlog::warn("mux pod={}: closing a client that left {} bytes of answers unread for {} ms",
                 name_, c->conn->queued_bytes(), stall_timeout_.count());
    c->conn->Close(Error::Make(Code::kResourceExhausted,
                               "client did not read its answers for {} ms",
                               stall_timeout_.count()));
  }
  UpdateBackpressure();
  if (paused_ && stall_timer_ == 0) {
    std::weak_ptr<bool> alive = alive_;
    stall_timer_ = loop_->AddTimer(stall_timeout_, [this, alive] {
      if (Live(alive)) OnStallTimeout();
    });
  }
}

void AgentMux::CountDrop(Drop kind, const ttrpc::FrameHeader& h) {
  if (kind == Drop::kNotResponse) {
    ++stats_.dropped_not_response;
    ++unlogged_not_response_;
  } else {
    ++stats_.dropped_unknown_stream;
    ++unlogged_unknown_stream_;
  }
  if (drop_log_timer_ != 0) return;
  // The first drop of a series is logged as it is; the rest are summed once per period.
  spdlog::warn(
      "mux pod={}: dropped a frame from the agent ({}: type {} flags {:#x} stream {} length {}); "
      "further drops are summed every {} s",
      name_, kind == Drop::kNotResponse ? "not a response" : "no call in flight on that stream",
      h.type, h.flags, h.stream_id, h.length, kDropLogPeriod.count());
  unlogged_not_response_ = 0;
  unlogged_unknown_stream_ = 0;
  std::weak_ptr<bool> alive = alive_;
  drop_log_timer_ = loop_->AddTimer(kDropLogPeriod, [this, alive] {
    if (Live(alive)) LogDrops();
  });
}

void AgentMux::LogDrops() {
  drop_log_timer_ = 0;
  if (unlogged_not_response_ == 0 && unlogged_unknown_stream_ == 0) return;
  spdlog::warn(
      "mux pod={}: dropped {} frames from the agent that were not responses and {} responses to "
      "no call in flight in the last {} s (totals {} and {})",
      name_, unlogged_not_response_, unlogged_unknown_stream_, kDropLogPeriod.count(),
      stats_.dropped_not_response, stats_.dropped_unknown_stream);
  unlogged_not_response_ = 0;
  unlogged_unknown_stream_ = 0;
  std::weak_ptr<bool> alive = alive_;
  drop_log_timer_ = loop_->AddTimer(kDropLogPeriod, [this, alive] {
    if (Live(alive)) LogDrops();
  });
}

}  // namespace peapod::sandboxer
