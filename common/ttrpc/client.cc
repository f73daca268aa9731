#include "common/ttrpc/client.h"

#include <future>

#include <spdlog/spdlog.h>

#include "ttrpc/request.pb.h"

namespace peapod::ttrpc {

Result<std::shared_ptr<Client>> Client::Create(EventLoop* loop, UniqueFd fd) {
  std::shared_ptr<Client> client(new Client(loop));
  std::weak_ptr<Client> weak = client;
  PP_ASSIGN_OR_RETURN(client->conn_, Connection::Create(
                                         loop, std::move(fd),
                                         [weak](Frame&& f) {
                                           if (auto c = weak.lock()) c->OnFrame(std::move(f));
                                         },
                                         [weak](const Error& why) {
                                           if (auto c = weak.lock()) c->OnClosed(why);
                                         }));
  return client;
}

Client::~Client() {
  if (conn_) conn_->Close();
}

void Client::Call(const std::string& service, const std::string& method, std::string payload,
                  const CallOptions& opts, Callback cb) {
  if (closed()) {
    cb(Error(Code::kUnavailable,
             fmt::format("{}.{}: ttrpc connection is closed", service, method)));
    return;
  }
  if (next_stream_ > UINT32_MAX) {
    cb(Error(Code::kUnavailable, "ttrpc stream ids exhausted on this connection; reconnect"));
    return;
  }
  ::ttrpc::Request req;
  req.set_service(service);
  req.set_method(method);
  req.set_payload(std::move(payload));
  if (opts.timeout.count() > 0) req.set_timeout_nano(opts.timeout.count());
  for (const auto& [key, values] : opts.metadata) {
    for (const auto& v : values) {
      auto* kv = req.add_metadata();
      kv->set_key(key);
      kv->set_value(v);
    }
  }
  std::string bytes = req.SerializeAsString();
  auto id = static_cast<uint32_t>(next_stream_);
  if (auto r = conn_->Send(id, kTypeRequest, 0, bytes); !r.ok()) {
    cb(std::move(r).error().Wrap(fmt::format("{}.{}", service, method)));
    return;
  }
  next_stream_ += 2;
  Pending p{std::move(cb), 0};
  if (opts.timeout.count() > 0) {
    std::weak_ptr<Client> weak = weak_from_this();
    std::string what = service + "." + method;
    p.timer = loop_->AddTimer(opts.timeout, [weak, id, what]() {
      if (auto c = weak.lock()) {
        auto it = c->pending_.find(id);
        if (it != c->pending_.end()) it->second.timer = 0;
        c->Complete(
            id, Error::Make(Code::kDeadlineExceeded, "{}: no answer before the deadline", what));
      }
    });
  }
  pending_.emplace(id, std::move(p));
}

Result<std::string> Client::CallSync(const std::string& service, const std::string& method,
                                     std::string payload, const CallOptions& opts) {
  if (loop_->InLoopThread()) {
    // Blocking here would stop the loop that must deliver the answer (or no loop runs yet).
    return Error(Code::kFailedPrecondition,
                 fmt::format("{}.{}: CallSync from the loop thread would deadlock; use Call",
                             service, method));
  }
  auto promise = std::make_shared<std::promise<Result<std::string>>>();
  auto future = promise->get_future();
  auto self = shared_from_this();
  loop_->Post([self, service, method, payload = std::move(payload), opts, promise]() mutable {
    self->Call(service, method, std::move(payload), opts,
               [promise](Result<std::string> r) { promise->set_value(std::move(r)); });
  });
  return future.get();
}

void Client::OnFrame(Frame&& f) {
  const FrameHeader& h = f.header;
  if (h.type != kTypeResponse) {
    spdlog::debug("ttrpc client: ignoring frame type {} on stream {}", h.type, h.stream_id);
    return;
  }
  if (pending_.find(h.stream_id) == pending_.end()) {
    // Late answer to a call that already timed out.
    return;
  }
  if (f.oversized) {
    Complete(h.stream_id, Error::Make(Code::kResourceExhausted,
                                      "response of {} bytes exceeds the ttrpc limit of {} bytes",
                                      h.length, kMaxMessageSize));
    return;
  }
  ::ttrpc::Response resp;
  if (!resp.ParseFromString(f.payload)) {
    Complete(h.stream_id, Error::Internal("malformed ttrpc response on stream {}", h.stream_id));
    return;
  }
  if (resp.has_status() && resp.status().code() != 0) {
    Complete(h.stream_id, Error(CodeFromInt(resp.status().code()), resp.status().message()));
    return;
  }
  Complete(h.stream_id, std::move(*resp.mutable_payload()));
}

void Client::Complete(uint32_t stream_id, Result<std::string> result) {
  auto it = pending_.find(stream_id);
  if (it == pending_.end()) return;
  Pending p = std::move(it->second);
  pending_.erase(it);
  if (p.timer != 0) loop_->CancelTimer(p.timer);
  p.cb(std::move(result));
}

void Client::OnClosed(const Error& why) {
  auto pending = std::move(pending_);
  pending_.clear();
  for (auto& [id, p] : pending) {
    if (p.timer != 0) loop_->CancelTimer(p.timer);
    p.cb(Error(why.code() == Code::kCancelled ? Code::kCancelled : Code::kUnavailable,
               "ttrpc connection lost: " + why.ToString()));
  }
  if (auto cb = std::move(on_close_)) cb(why);
}

void Client::Close() {
  if (conn_) conn_->Close(Error(Code::kCancelled, "client closed"));
}

}  // namespace peapod::ttrpc
