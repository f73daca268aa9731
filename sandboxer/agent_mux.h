// One pod's agent channel shared by many shims.
//
// The guest has one channel (a virtio-serial port can be opened once), but every container of
// the pod has its own shim, and the sandboxer talks to the agent too. AgentMux owns the host
// end of that channel ("upstream") and serves any number of ttrpc clients (shims, on the pod's
// agent.sock): each request frame is forwarded with a fresh upstream stream id, and the
// response is routed back to the client under the id it used. The mux does not decode
// requests: deadlines and metadata travel inside them to the agent, which enforces them.
//
// A client that goes away takes only its own calls with it: late responses for them are
// dropped. If the upstream goes away, every call in flight is answered UNAVAILABLE and new
// requests are refused until a new upstream is attached.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>

#include "common/base/result.h"
#include "common/base/unique_fd.h"
#include "common/loop/event_loop.h"
#include "common/ttrpc/connection.h"

namespace peapod::sandboxer {

class AgentMux {
 public:
  explicit AgentMux(EventLoop* loop) : loop_(loop) {}
  ~AgentMux();
  AgentMux(const AgentMux&) = delete;
  AgentMux& operator=(const AgentMux&) = delete;

  // The host end of the guest channel. Replaces (and closes) a previous one.
  Result<void> AttachUpstream(UniqueFd fd);
  // Serves a listening socket: every accepted connection is a client.
  Result<void> ServeListener(UniqueFd listen_fd);
  // Serves one connected client.
  Result<void> AddClient(UniqueFd fd);
  // Runs when the upstream closes (the VM died or the channel broke).
  void SetOnUpstreamClosed(std::function<void(const Error&)> cb) {
    on_upstream_closed_ = std::move(cb);
  }

  bool upstream_attached() const { return upstream_ && !upstream_->closed(); }
  size_t client_count() const { return clients_.size(); }
  size_t in_flight() const { return routes_.size(); }

 private:
  struct Client {
    std::shared_ptr<ttrpc::Connection> conn;
  };
  struct Route {
    std::weak_ptr<Client> client;
    uint32_t client_stream = 0;
  };

  void OnClientFrame(const std::shared_ptr<Client>& client, ttrpc::Frame&& frame);
  void OnUpstreamFrame(ttrpc::Frame&& frame);
  void OnUpstreamClosed(const Error& why);
  void Answer(const std::shared_ptr<Client>& client, uint32_t stream, const Error& err);

  EventLoop* loop_;
  std::shared_ptr<ttrpc::Connection> upstream_;
  uint32_t next_upstream_stream_ = 1;
  std::map<uint32_t, Route> routes_;  // upstream stream id -> who asked
  std::set<std::shared_ptr<Client>> clients_;
  UniqueFd listen_fd_;
  EventLoop::WatchId listen_watch_ = 0;
  std::function<void(const Error&)> on_upstream_closed_;
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
};

}  // namespace peapod::sandboxer
