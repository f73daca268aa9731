// ttrpc server on an EventLoop. Methods answer through a one-shot Responder that may be called
// later, from the loop thread, so a long call (a task Wait) never blocks other calls on the
// same or other connections: concurrency without threads.
#pragma once

#include <chrono>
#include <functional>
#include <initializer_list>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <unordered_map>
#include <vector>

#include "common/base/result.h"
#include "common/loop/event_loop.h"
#include "common/ttrpc/connection.h"

namespace peapod::ttrpc {

using Metadata = std::map<std::string, std::vector<std::string>>;

struct CallContext {
  uint32_t stream_id = 0;
  std::string service;
  std::string method;
  Metadata metadata;
  // Set when the client sent timeout_nano; the server answers DEADLINE_EXCEEDED itself if the
  // method has not answered by then.
  std::optional<EventLoop::Clock::time_point> deadline;

  // The first value of a metadata key, or empty.
  std::string Get(const std::string& key) const;
};

// Answers one call. Copyable; only the first invocation counts and later ones are ignored, as
// is any answer after the client's connection has gone. Loop thread only.
class Responder {
 public:
  void operator()(Result<std::string> payload) const;
  void operator()(std::string payload) const { (*this)(Result<std::string>(std::move(payload))); }
  void operator()(Error error) const { (*this)(Result<std::string>(std::move(error))); }
  // A successful answer whose payload is the concatenation of parts, written to the connection
  // from where they are (Connection::SendParts; copied only into the write queue, for what the
  // connection does not take at once): a stream's data is not copied into a message, a
  // Response and a frame first, and under TCG each copy is paid in the guest's emulated CPU.
  void Reply(std::initializer_list<std::string_view> parts) const;
  bool answered() const;
  // True while an answer would still reach the caller: not answered (nor timed out by the
  // server), and the connection is still open.
  bool waiting() const;

 private:
  friend class Server;
  struct State;
  // Sends the frame (made only if the answer still goes somewhere) and ends the call.
  void Answer(const std::function<std::string()>& frame) const;
  // The same, the frame sent by send on the call's connection.
  void AnswerWith(const std::function<Result<void>(Connection&)>& send) const;
  explicit Responder(std::shared_ptr<State> s) : state_(std::move(s)) {}
  std::shared_ptr<State> state_;
};

using Method = std::function<void(const CallContext&, std::string payload, Responder)>;

// Answers a typed method: an error, or the response message.
template <typename Resp>
using TypedResponder = std::function<void(Result<Resp>)>;

// A ttrpc Response message: the payload, or the error as a google.rpc.Status. A response that
// would exceed kMaxMessageSize becomes a RESOURCE_EXHAUSTED status instead.
std::string EncodeResponse(const Result<std::string>& result);
// The same Response for a successful payload made of parts, laid out after kHeaderSize bytes
// of room for the frame header (Connection::SendFrame); empty if the payload is too large.
std::string EncodeOkResponseFrame(std::initializer_list<std::string_view> parts);
// What such a Response has before a payload of size bytes (at most kOkResponsePrefixMax
// bytes, written to out); 0 if the Response would be too large.
constexpr size_t kOkResponsePrefixMax = 13;
size_t EncodeOkResponsePrefix(size_t size, char* out);

class Server {
 public:
  explicit Server(EventLoop* loop) : loop_(loop) {}
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  void Register(const std::string& service, const std::string& method, Method m);

  // Accepts connections on a listening socket (owned by the server from now on).
  Result<void> ServeListener(UniqueFd listen_fd);
  // Listens on a unix socket path and serves it.
  Result<void> Listen(const std::string& path);
  // Serves one already connected stream (socketpair end, virtio-serial port). on_closed runs
  // when that connection ends, for whatever reason.
  Result<void> ServeConnection(UniqueFd fd, std::function<void()> on_closed = nullptr);

  // Stops accepting, lets in-flight calls finish (new requests get UNAVAILABLE), closes each
  // connection once it has no call in flight, then runs done. Idempotent.
  void Shutdown(std::function<void()> done = nullptr);

  // The write-queue cap of connections served from now on (Connection::set_max_queued_bytes;
  // kQueueHardCap unless set). An answer that does not fit is dropped, so a server whose peer
  // may pause reading on purpose (the guest agent, behind AgentMux) sets kNoQueueCap.
  void set_max_queued_bytes(size_t n) { max_queued_ = n; }

  size_t connection_count() const { return conns_.size(); }
  size_t in_flight() const;

 private:
  friend class Responder;
  struct Conn;
  void Accept();
  void OnFrame(const std::shared_ptr<Conn>& conn, Frame&& frame);
  void Dispatch(const std::shared_ptr<Conn>& conn, uint32_t stream_id, std::string&& payload);
  void SendStatus(const std::shared_ptr<Conn>& conn, uint32_t stream_id, const Error& err);
  void Finish(const std::shared_ptr<Conn>& conn, uint32_t stream_id);
  void MaybeFinishShutdown();

  EventLoop* loop_;
  std::unordered_map<std::string, Method> methods_;  // key: "/service/method"
  UniqueFd listen_fd_;
  EventLoop::WatchId listen_watch_ = 0;
  std::set<std::shared_ptr<Conn>> conns_;
  bool shutting_down_ = false;
  size_t max_queued_ = kQueueHardCap;
  std::function<void()> shutdown_done_;
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
};

// Registers a method whose request and response are protobuf messages. fn is called as
// fn(const CallContext&, Req&&, TypedResponder<Resp>); a request that does not parse is answered
// INVALID_ARGUMENT without calling fn.
template <typename Req, typename Resp, typename Fn>
void RegisterTyped(Server& server, const std::string& service, const std::string& method, Fn fn) {
  server.Register(
      service, method,
      [fn = std::move(fn), method](const CallContext& ctx, std::string payload, Responder r) {
        Req req;
        if (!req.ParseFromString(payload)) {
          r(Error::Invalid("{}: request is not a valid {}", method,
                           Req::descriptor()->full_name()));
          return;
        }
        fn(ctx, std::move(req), TypedResponder<Resp>([r](Result<Resp> resp) {
             if (!resp.ok()) {
               r(std::move(resp).error());
             } else {
               r(resp->SerializeAsString());
             }
           }));
      });
}

}  // namespace peapod::ttrpc
