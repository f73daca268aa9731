#include "common/ttrpc/server.h"

#include <sys/socket.h>

#include <cstring>
#include <span>

#include <spdlog/spdlog.h>

#include "ttrpc/request.pb.h"

namespace peapod::ttrpc {

struct Server::Conn {
  std::shared_ptr<Connection> c;
  uint32_t last_stream = 0;
  std::set<uint32_t> in_flight;
};

struct Responder::State {
  Server* server = nullptr;
  std::weak_ptr<bool> server_alive;
  std::weak_ptr<Server::Conn> conn;
  uint32_t stream_id = 0;
  bool answered = false;
  EventLoop* loop = nullptr;
  EventLoop::TimerId deadline_timer = 0;
};

std::string CallContext::Get(const std::string& key) const {
  auto it = metadata.find(key);
  if (it == metadata.end() || it->second.empty()) return {};
  return it->second.front();
}

namespace {

// The Response that tells a client its answer of `bytes` could not be sent, instead of leaving
// it waiting for a frame we cannot send.
std::string TooLargeResponse(size_t bytes) {
  ::ttrpc::Response too_big;
  too_big.mutable_status()->set_code(static_cast<int>(Code::kResourceExhausted));
  too_big.mutable_status()->set_message(fmt::format(
      "response of {} bytes exceeds the ttrpc limit of {} bytes", bytes, kMaxMessageSize));
  return too_big.SerializeAsString();
}

}  // namespace

std::string EncodeResponse(const Result<std::string>& result) {
  ::ttrpc::Response resp;
  auto* status = resp.mutable_status();
  if (result.ok()) {
    resp.set_payload(result.value());
  } else {
    status->set_code(static_cast<int>(result.error().code()));
    status->set_message(result.error().ToString());
  }
  std::string out = resp.SerializeAsString();
  if (out.size() > kMaxMessageSize) out = TooLargeResponse(out.size());
  return out;
}

size_t EncodeOkResponsePrefix(size_t size, char* out) {
  // Response{status: {} (field 1, empty), payload (field 2, bytes)}, as protobuf writes it.
  char len[10];
  size_t len_size = EncodeVarint(size, len);
  size_t message = 2 + (size ? 1 + len_size + size : 0);
  if (message > kMaxMessageSize) return 0;
  size_t n = 0;
  out[n++] = '\x0a';
  out[n++] = '\x00';
  if (size) {
    out[n++] = '\x12';
    std::memcpy(out + n, len, len_size);
    n += len_size;
  }
  return n;
}

std::string EncodeOkResponseFrame(std::initializer_list<std::string_view> parts) {
  size_t size = 0;
  for (auto p : parts) size += p.size();
  char prefix[kOkResponsePrefixMax];
  size_t n = EncodeOkResponsePrefix(size, prefix);
  if (n == 0) return {};
  std::string frame;
  frame.reserve(kHeaderSize + n + size);
  frame.append(kHeaderSize, '\0');
  frame.append(prefix, n);
  for (auto p : parts) frame.append(p);
  return frame;
}

void Responder::operator()(Result<std::string> payload) const {
  if (payload.ok()) return Reply({*payload});
  Answer([&] { return std::string(kHeaderSize, '\0') + EncodeResponse(payload); });
}

void Responder::Reply(std::initializer_list<std::string_view> parts) const {
  constexpr size_t kMaxParts = 8;
  size_t size = 0;
  for (auto p : parts) size += p.size();
  char prefix[kOkResponsePrefixMax];
  size_t n = EncodeOkResponsePrefix(size, prefix);
  if (n == 0 || parts.size() > kMaxParts) {
    return Answer([&] {
      std::string frame = EncodeOkResponseFrame(parts);
      if (!frame.empty()) return frame;
      return std::string(kHeaderSize, '\0') + TooLargeResponse(size);
    });
  }
  // The Response's prefix, then the caller's bytes, from where they are (Connection::SendParts).
  std::string_view pieces[kMaxParts + 1];
  size_t count = 0;
  pieces[count++] = std::string_view(prefix, n);
  for (auto p : parts) pieces[count++] = p;
  AnswerWith([&](Connection& c) {
    return c.SendParts(state_->stream_id, kTypeResponse, 0,
                       std::span<const std::string_view>(pieces, count));
  });
}

void Responder::Answer(const std::function<std::string()>& frame) const {
  AnswerWith(
      [&](Connection& c) { return c.SendFrame(state_->stream_id, kTypeResponse, 0, frame()); });
}

void Responder::AnswerWith(const std::function<Result<void>(Connection&)>& send) const {
  State& s = *state_;
  if (s.answered) return;
  s.answered = true;
  if (s.server_alive.expired()) return;
  if (s.deadline_timer != 0) s.loop->CancelTimer(s.deadline_timer);
  auto conn = s.conn.lock();
  if (!conn || conn->c->closed()) return;
  if (auto r = send(*conn->c); !r.ok()) {
    spdlog::debug("ttrpc: response on stream {} not sent: {}", s.stream_id, r.error().ToString());
  }
  s.server->Finish(conn, s.stream_id);
}

bool Responder::answered() const { return state_->answered; }

bool Responder::waiting() const {
  const State& s = *state_;
  if (s.answered || s.server_alive.expired()) return false;
  auto conn = s.conn.lock();
  return conn && !conn->c->closed();
}

Server::~Server() {
  *alive_ = false;
  if (listen_watch_ != 0) loop_->Unwatch(listen_watch_);
  auto conns = conns_;
  for (auto& c : conns) c->c->Close();
}

void Server::Register(const std::string& service, const std::string& method, Method m) {
  methods_["/" + service + "/" + method] = std::move(m);
}

Result<void> Server::Listen(const std::string& path) {
  PP_ASSIGN_OR_RETURN(UniqueFd fd, ListenUnix(path));
  return ServeListener(std::move(fd));
}

Result<void> Server::ServeListener(UniqueFd listen_fd) {
  PP_TRY_CTX(SetNonBlocking(listen_fd.get()), "ttrpc listener");
  listen_fd_ = std::move(listen_fd);
  PP_ASSIGN_OR_RETURN(listen_watch_,
                      loop_->Watch(listen_fd_.get(), EPOLLIN, [this](uint32_t) { Accept(); }));
  return Ok();
}

void Server::Accept() {
  for (;;) {
    int fd = ::accept4(listen_fd_.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
    if (fd < 0) {
      if (errno == EINTR || errno == ECONNABORTED) continue;
      if (errno == EAGAIN) return;
      int err = errno;
      spdlog::warn("ttrpc: accept: {}", Error::Errno("accept", err).ToString());
      // Out of descriptors passes; anything else (the fd is not a listening socket any more)
      // would only repeat on every wakeup: stop accepting rather than spin.
      if (err != EMFILE && err != ENFILE && err != ENOBUFS && err != ENOMEM) {
        loop_->Unwatch(listen_watch_);
        listen_watch_ = 0;
      }
      return;
    }
    if (auto r = ServeConnection(UniqueFd(fd)); !r.ok()) {
      spdlog::warn("ttrpc: serve accepted connection: {}", r.error().ToString());
    }
  }
}

Result<void> Server::ServeConnection(UniqueFd fd, std::function<void()> on_closed) {
  auto conn = std::make_shared<Conn>();
  std::weak_ptr<Conn> weak = conn;
  std::weak_ptr<bool> alive = alive_;
  PP_ASSIGN_OR_RETURN(conn->c,
                      Connection::Create(
                          loop_, std::move(fd),
                          [this, weak, alive](Frame&& f) {
                            auto c = weak.lock();
                            if (c && !alive.expired()) OnFrame(c, std::move(f));
                          },
                          [this, weak, alive, on_closed = std::move(on_closed)](const Error& why) {
                            if (alive.expired()) return;
                            spdlog::debug("ttrpc: server connection closed: {}", why.ToString());
                            if (auto c = weak.lock()) conns_.erase(c);
                            if (on_closed) on_closed();
                            MaybeFinishShutdown();
                          }));
  conn->c->set_max_queued_bytes(max_queued_);
  conns_.insert(conn);
  return Ok();
}

size_t Server::in_flight() const {
  size_t n = 0;
  for (const auto& c : conns_) n += c->in_flight.size();
  return n;
}

void Server::SendStatus(const std::shared_ptr<Conn>& conn, uint32_t stream_id, const Error& err) {
  (void)conn->c->Send(stream_id, kTypeResponse, 0, EncodeResponse(Result<std::string>(err)));
}

void Server::OnFrame(const std::shared_ptr<Conn>& conn, Frame&& frame) {
  const FrameHeader& h = frame.header;
  if (h.type != kTypeRequest) {
    // Responses and stream data are never addressed to a unary server; drop them.
    spdlog::debug("ttrpc: ignoring frame type {} on stream {}", h.type, h.stream_id);
    return;
  }
  if (h.stream_id % 2 != 1) {
    SendStatus(
        conn, h.stream_id,
        Error::Invalid("stream id {} is even: client streams must use odd ids", h.stream_id));
    return;
  }
  if (h.stream_id <= conn->last_stream) {
    SendStatus(conn, h.stream_id,
               Error::Invalid("stream id {} reused: ids must increase (last was {})", h.stream_id,
                              conn->last_stream));
    return;
  }
  conn->last_stream = h.stream_id;
  if (frame.oversized) {
    SendStatus(conn, h.stream_id,
               Error::Make(Code::kResourceExhausted,
                           "request of {} bytes exceeds the ttrpc limit of {} bytes", h.length,
                           kMaxMessageSize));
    return;
  }
  Dispatch(conn, h.stream_id, std::move(frame.payload));
}

void Server::Dispatch(const std::shared_ptr<Conn>& conn, uint32_t stream_id,
                      std::string&& payload) {
  ::ttrpc::Request req;
  if (!req.ParseFromString(payload)) {
    SendStatus(conn, stream_id, Error::Invalid("malformed ttrpc request: not a valid protobuf"));
    return;
  }
  if (shutting_down_) {
    SendStatus(conn, stream_id, Error(Code::kUnavailable, "ttrpc server is shutting down"));
    return;
  }
  auto it = methods_.find("/" + req.service() + "/" + req.method());
  if (it == methods_.end()) {
    bool service_known = false;
    std::string prefix = "/" + req.service() + "/";
    for (const auto& [name, m] : methods_) {
      if (name.compare(0, prefix.size(), prefix) == 0) service_known = true;
    }
    SendStatus(conn, stream_id,
               service_known ? Error::Make(Code::kUnimplemented, "method {}.{} is not implemented",
                                           req.service(), req.method())
                             : Error::Make(Code::kUnimplemented, "service {} is not served here",
                                           req.service()));
    return;
  }

  CallContext ctx;
  ctx.stream_id = stream_id;
  ctx.service = req.service();
  ctx.method = req.method();
  for (const auto& kv : req.metadata()) ctx.metadata[kv.key()].push_back(kv.value());

  auto state = std::make_shared<Responder::State>();
  state->server = this;
  state->server_alive = alive_;
  state->conn = conn;
  state->stream_id = stream_id;
  state->loop = loop_;
  Responder responder(state);
  conn->in_flight.insert(stream_id);

  if (req.timeout_nano() > 0) {
    auto timeout = std::chrono::nanoseconds(req.timeout_nano());
    ctx.deadline = EventLoop::Clock::now() + timeout;
    state->deadline_timer = loop_->AddTimer(timeout, [responder, state, ctx_name = ctx.method]() {
      state->deadline_timer = 0;
      responder(
          Error::Make(Code::kDeadlineExceeded, "{} did not finish before its deadline", ctx_name));
    });
  }
  it->second(ctx, std::move(*req.mutable_payload()), responder);
}

void Server::Finish(const std::shared_ptr<Conn>& conn, uint32_t stream_id) {
  conn->in_flight.erase(stream_id);
  if (shutting_down_ && conn->in_flight.empty()) conn->c->CloseAfterFlush();
}

void Server::Shutdown(std::function<void()> done) {
  if (done) shutdown_done_ = std::move(done);
  if (shutting_down_) {
    MaybeFinishShutdown();
    return;
  }
  shutting_down_ = true;
  if (listen_watch_ != 0) {
    loop_->Unwatch(listen_watch_);
    listen_watch_ = 0;
  }
  listen_fd_.Reset();
  auto conns = conns_;
  for (auto& c : conns) {
    if (c->in_flight.empty()) c->c->CloseAfterFlush();
  }
  MaybeFinishShutdown();
}

void Server::MaybeFinishShutdown() {
  if (!shutting_down_ || !conns_.empty() || !shutdown_done_) return;
  auto done = std::move(shutdown_done_);
  shutdown_done_ = nullptr;
  done();
}

}  // namespace peapod::ttrpc
