// One pod's agent channel shared by many shims.
//
// The guest has one channel (a virtio-serial port can be opened once), but every container of
// the pod has its own shim, and the sandboxer talks to the agent too. AgentMux owns the host
// end of that channel ("upstream") and serves any number of ttrpc clients (shims, on the pod's
// agent.sock): each request frame is forwarded with a fresh upstream stream id, and the
// response is routed back to the client under the id it used. The mux does not decode
// requests: deadlines and metadata travel inside them to the agent, which enforces them.
//
// A client that goes away takes only its own calls with it: their routes are forgotten and
// late responses for them are dropped. If the upstream goes away, every call in flight is
// answered UNAVAILABLE and new requests are refused until a new upstream is attached.
//
// Everything that comes up the channel is the guest's and hostile; what it can make the host
// hold is bounded (docs/security.md, "What a guest can cost the host"):
// * only responses to calls in flight are forwarded; requests, stream data, unknown types or
//   flags, and answers to streams nobody asked on are dropped and counted (stats());
// * a frame over the ttrpc limit is skipped by the decoder without being buffered;
// * when a client's write queue passes its high-water mark, or all clients together hold
//   kMaxQueuedBytes, the mux stops reading the channel (the guest blocks) until they drain;
//   a client that keeps it stopped for kStallTimeout is closed so the others go on (their
//   answers wait behind it meanwhile: the channel is one stream);
// * calls in flight are capped per client and per mux (RESOURCE_EXHAUSTED beyond).
#pragma once

#include <chrono>
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
  // Calls in flight one client may have; beyond, RESOURCE_EXHAUSTED. A shim needs a handful
  // per process (wait, stdout, stderr, stdin, OOM) plus short calls.
  static constexpr size_t kMaxCallsPerClient = 1024;
  // Calls in flight on the whole channel.
  static constexpr size_t kMaxCalls = 4096;
  // Bytes queued towards all clients together at which the channel is no longer read (each
  // client also stops it at ttrpc::kQueueHighWater); reading goes on below half of it.
  static constexpr size_t kMaxQueuedBytes = 32u << 20;
  // How long a stopped channel waits for the clients that stopped it before closing them.
  static constexpr std::chrono::seconds kStallTimeout{5};
  // At most one log line per kind of dropped frame per this period.
  static constexpr std::chrono::seconds kDropLogPeriod{10};

  struct Stats {
    uint64_t dropped_not_response = 0;    // requests, data, unknown types or flags
    uint64_t dropped_unknown_stream = 0;  // responses to no call in flight
    uint64_t oversized_responses = 0;     // over the ttrpc limit: the caller got an error
    uint64_t refused_calls = 0;           // call caps reached
    uint64_t forgotten_calls = 0;         // routes dropped because their client went away
    uint64_t upstream_pauses = 0;         // times the channel stopped being read
    uint64_t stalled_clients_closed = 0;  // clients closed after kStallTimeout
  };

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
  // Names the pod (or pool VM) in log lines.
  void set_name(std::string name);
  // kStallTimeout unless set (tests).
  void set_stall_timeout(std::chrono::milliseconds t) { stall_timeout_ = t; }
  // Runs when the upstream closes (the VM died or the channel broke).
  void SetOnUpstreamClosed(std::function<void(const Error&)> cb) {
    on_upstream_closed_ = std::move(cb);
  }

  bool upstream_attached() const { return upstream_ && !upstream_->closed(); }
  size_t client_count() const { return clients_.size(); }
  size_t in_flight() const { return routes_.size(); }
  // The channel is not being read because clients are slow.
  bool upstream_paused() const { return paused_; }
  // Bytes queued towards all clients.
  size_t queued_bytes() const;
  const Stats& stats() const { return stats_; }

 private:
  struct Client {
    std::shared_ptr<ttrpc::Connection> conn;
    std::set<uint32_t> routes;  // upstream stream ids of its calls in flight
    bool backlogged = false;    // passed the high-water mark and not yet below the low one
  };
  struct Route {
    std::weak_ptr<Client> client;
    uint32_t client_stream = 0;
  };
  enum class Drop { kNotResponse, kUnknownStream };

  void OnClientFrame(const std::shared_ptr<Client>& client, ttrpc::Frame&& frame);
  void OnClientClosed(const std::shared_ptr<Client>& client);
  void OnUpstreamFrame(ttrpc::Frame&& frame);
  void OnUpstreamClosed(const Error& why);
  void Answer(const std::shared_ptr<Client>& client, uint32_t stream, const Error& err);
  // Pauses or resumes reading the upstream from the clients' queues.
  void UpdateBackpressure();
  void OnStallTimeout();
  void CountDrop(Drop kind, const ttrpc::FrameHeader& h);
  void LogDrops();

  EventLoop* loop_;
  std::string name_;
  std::shared_ptr<ttrpc::Connection> upstream_;
  uint32_t next_upstream_stream_ = 1;
  std::map<uint32_t, Route> routes_;  // upstream stream id -> who asked
  std::set<std::shared_ptr<Client>> clients_;
  UniqueFd listen_fd_;
  EventLoop::WatchId listen_watch_ = 0;
  std::function<void(const Error&)> on_upstream_closed_;
  bool paused_ = false;
  std::chrono::milliseconds stall_timeout_ = kStallTimeout;
  EventLoop::TimerId stall_timer_ = 0;
  Stats stats_;
  // Drops not logged yet, and the timer that logs them as one line.
  uint64_t unlogged_not_response_ = 0;
  uint64_t unlogged_unknown_stream_ = 0;
  EventLoop::TimerId drop_log_timer_ = 0;
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
};

}  // namespace peapod::sandboxer
