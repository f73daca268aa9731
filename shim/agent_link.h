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
// the shim stops. Everything runs on the loop thread: calls answer through callbacks, and the
// waits between redials are loop timers, never a sleeping thread.
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "common/base/result.h"
#include "common/loop/event_loop.h"
#include "common/ttrpc/client.h"

namespace peapod::shim {

class AgentLink : public std::enable_shared_from_this<AgentLink> {
 public:
  using Done = std::function<void(Result<std::string>)>;
  // Answers (through its callback, on the loop) where the pod's agent socket is now, or an
  // error: kNotFound or kFailedPrecondition when the pod is gone or its VM is not running (the
  // link gives up), anything else while the sandboxer cannot say (it is retried).
  using Locate = std::function<void(std::function<void(Result<std::string>)>)>;

  struct Backoff {
    std::chrono::milliseconds first{100};
    std::chrono::milliseconds max{2000};
    // How long a call sent once waits for a lost connection to come back.
    std::chrono::milliseconds once_patience{30000};
  };

  static std::shared_ptr<AgentLink> Create(EventLoop* loop, Locate locate, Backoff backoff);
  static std::shared_ptr<AgentLink> Create(EventLoop* loop, Locate locate) {
    return Create(loop, std::move(locate), Backoff());
  }
  ~AgentLink();

  // Loop thread. Sent once, on a live connection: for calls the agent must not take twice.
  void CallOnce(const std::string& method, std::string payload, std::chrono::nanoseconds timeout,
                Done done);
  // Loop thread. Re-sent on a new connection whenever the old one is lost, until answered, the
  // pod is gone, or Stop.
  void CallRetrying(const std::string& method, std::string payload,
                    std::chrono::nanoseconds timeout, Done done);

  // Loop thread. Makes waiting calls give up (the shim is exiting) and closes the client.
  void Stop();

 private:
  using Got = std::function<void(Result<std::shared_ptr<ttrpc::Client>>)>;
  struct Waiter {
    std::chrono::steady_clock::time_point deadline;
    Got got;
  };
  struct Retry;

  AgentLink(EventLoop* loop, Locate locate, Backoff backoff)
      : loop_(loop), locate_(std::move(locate)), backoff_(backoff) {}
  // Hands got a live client, dialling first if needed; patience 0: as long as it takes.
  void Live(std::chrono::milliseconds patience, Got got);
  // One round of locate + dial for the waiters; the next one `wait` later if it failed.
  void Attempt(std::chrono::milliseconds wait);
  void Fail(const Error& why);  // every waiter
  void SendRetry(std::shared_ptr<Retry> r);
  // Runs fn after d, unless stopped (then fn never runs: its owner was failed by Stop).
  void After(std::chrono::milliseconds d, std::function<void()> fn);

  EventLoop* loop_;
  Locate locate_;
  Backoff backoff_;
  bool stopped_ = false;
  std::shared_ptr<ttrpc::Client> client_;
  bool ever_connected_ = false;  // a later connection is a reconnection (logged)
  bool dialling_ = false;
  std::vector<Waiter> waiters_;
  // Calls re-sent after a lost connection wait here between tries; Stop fails them.
  std::vector<std::shared_ptr<Retry>> resting_;
};

}  // namespace peapod::shim
