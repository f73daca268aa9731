// The shim's connection to its pod's agent (through the sandboxer's mux), kept across a
// sandboxer restart.
//
// When peapod-sandboxer dies, the mux dies with it and every call in flight fails UNAVAILABLE.
// The pod and its containers live on in the guest, so the shim must not report them exited:
// AgentLink redials the pod's agent socket (found again through the sandboxer) with backoff and
// re-sends the calls the agent can take twice — waits, OOM waits, and stdio reads and writes at
// an offset, which the agent keeps until collected (agent.proto). Other calls are sent once, on
// a connection that is up (after a redial if needed).
//
// It gives up only when the sandboxer says the pod is gone or not ready (its VM died), or when
// the shim stops. Calls are blocking: use them from worker threads, not the loop thread.
#pragma once

#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>

#include <google/protobuf/message.h>

#include "common/base/result.h"
#include "common/loop/event_loop.h"
#include "common/ttrpc/client.h"

namespace peapod::shim {

class AgentLink {
 public:
  // Answers where the pod's agent socket is now, or an error: kNotFound or
  // kFailedPrecondition when the pod is gone or its VM is not running (the link gives up),
  // anything else while the sandboxer cannot say (it is retried).
  using Locate = std::function<Result<std::string>()>;

  struct Backoff {
    std::chrono::milliseconds first{100};
    std::chrono::milliseconds max{2000};
    // How long a call sent once waits for a lost connection to come back.
    std::chrono::milliseconds once_patience{30000};
  };

  AgentLink(EventLoop* loop, Locate locate, Backoff backoff);
  AgentLink(EventLoop* loop, Locate locate) : AgentLink(loop, std::move(locate), Backoff()) {}
  ~AgentLink();

  // Sent once, on a live connection: for calls the agent must not take twice.
  Result<std::string> CallOnce(const std::string& method, const std::string& payload,
                               std::chrono::nanoseconds timeout);
  // Re-sent on a new connection whenever the old one is lost, until answered, the pod is
  // gone, or Stop.
  Result<std::string> CallRetrying(const std::string& method, const std::string& payload,
                                   std::chrono::nanoseconds timeout);

  template <typename Resp>
  Result<Resp> Once(const std::string& method, const google::protobuf::Message& req,
                    std::chrono::nanoseconds timeout = std::chrono::seconds(60)) {
    return Parse<Resp>(CallOnce(method, req.SerializeAsString(), timeout), method);
  }
  template <typename Resp>
  Result<Resp> Retrying(const std::string& method, const google::protobuf::Message& req,
                        std::chrono::nanoseconds timeout = std::chrono::nanoseconds(0)) {
    return Parse<Resp>(CallRetrying(method, req.SerializeAsString(), timeout), method);
  }

  // Makes waiting calls give up (the shim is exiting). The client is closed on the loop.
  void Stop();

 private:
  template <typename Resp>
  static Result<Resp> Parse(Result<std::string> raw, const std::string& method) {
    if (!raw.ok()) return std::move(raw).error();
    Resp r;
    if (!r.ParseFromString(*raw)) {
      return Error::Make(Code::kInternal, "the agent's answer to {} does not parse", method);
    }
    return r;
  }
  // A live client; redials if the connection was lost. patience 0: as long as it takes.
  Result<std::shared_ptr<ttrpc::Client>> Live(std::chrono::milliseconds patience);
  // Whether the pod still runs; false with the reason once it is gone.
  Result<void> PodAlive();
  // Sleeps d unless stopped; false if stopped.
  bool Pause(std::chrono::milliseconds d);

  EventLoop* loop_;
  Locate locate_;
  Backoff backoff_;
  mutable std::mutex mu_;
  std::condition_variable stopped_cv_;
  bool stopped_ = false;
  std::shared_ptr<ttrpc::Client> client_;
  bool ever_connected_ = false;  // a later connection is a reconnection (logged)
};

}  // namespace peapod::shim
