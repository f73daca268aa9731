// ttrpc client on an EventLoop. Calls are asynchronous on the loop thread (Call) or blocking from
// any other thread (CallSync); many calls share one connection, each on its own odd stream id.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <unordered_map>

#include <google/protobuf/message_lite.h>

#include "common/base/result.h"
#include "common/loop/event_loop.h"
#include "common/ttrpc/connection.h"
#include "common/ttrpc/server.h"  // Metadata

namespace peapod::ttrpc {

struct CallOptions {
  // Zero: no deadline. Otherwise sent to the server as timeout_nano and enforced locally.
  std::chrono::nanoseconds timeout{0};
  Metadata metadata;
};

class Client : public std::enable_shared_from_this<Client> {
 public:
  using Callback = std::function<void(Result<std::string>)>;

  // Takes a connected stream fd. Loop thread (or before the loop runs).
  static Result<std::shared_ptr<Client>> Create(EventLoop* loop, UniqueFd fd);
  ~Client();

  // Loop thread. cb runs exactly once, on the loop thread: with the response payload, the
  // server's status as an Error, DEADLINE_EXCEEDED, or UNAVAILABLE if the connection goes.
  void Call(const std::string& service, const std::string& method, std::string payload,
            const CallOptions& opts, Callback cb);
  // Any thread but the loop's (it would deadlock there): blocks until the call completes.
  Result<std::string> CallSync(const std::string& service, const std::string& method,
                               std::string payload, const CallOptions& opts = {});

  // Typed convenience over CallSync.
  template <typename Resp>
  Result<Resp> CallSyncTyped(const std::string& service, const std::string& method,
                             const google::protobuf::MessageLite& req,
                             const CallOptions& opts = {}) {
    std::string bytes;
    if (!req.SerializeToString(&bytes)) return Error::Internal("could not encode {}", method);
    PP_ASSIGN_OR_RETURN(std::string out, CallSync(service, method, std::move(bytes), opts));
    Resp resp;
    if (!resp.ParseFromString(out)) {
      return Error::Make(Code::kInternal, "{}.{}: malformed response", service, method);
    }
    return resp;
  }

  // Fails every pending call with CANCELLED and closes. Loop thread.
  void Close();
  bool closed() const { return !conn_ || conn_->closed(); }
  size_t pending() const { return pending_.size(); }
  // Runs once when the connection closes for any reason. Loop thread.
  void SetOnClose(std::function<void(const Error&)> cb) { on_close_ = std::move(cb); }

 private:
  struct Pending {
    Callback cb;
    EventLoop::TimerId timer = 0;
  };
  explicit Client(EventLoop* loop) : loop_(loop) {}
  void OnFrame(Frame&& f);
  void OnClosed(const Error& why);
  void Complete(uint32_t stream_id, Result<std::string> result);

  EventLoop* loop_;
  std::shared_ptr<Connection> conn_;
  uint64_t next_stream_ = 1;  // odd, increasing; past UINT32_MAX the connection is spent
  std::unordered_map<uint32_t, Pending> pending_;
  std::function<void(const Error&)> on_close_;
};

}  // namespace peapod::ttrpc
