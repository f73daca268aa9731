#include "shim/agent_link.h"

#include <spdlog/spdlog.h>

#include "shim/dial.h"

namespace peapod::shim {

namespace {

constexpr char kAgent[] = "peapod.agent.v1.Agent";

bool MeansGone(const Error& e) {
  return e.code() == Code::kNotFound || e.code() == Code::kFailedPrecondition;
}

}  // namespace

AgentLink::AgentLink(EventLoop* loop, Locate locate, Backoff backoff)
    : loop_(loop), locate_(std::move(locate)), backoff_(backoff) {}

AgentLink::~AgentLink() { Stop(); }

void AgentLink::Stop() {
  std::shared_ptr<ttrpc::Client> c;
  {
    std::lock_guard<std::mutex> l(mu_);
    stopped_ = true;
    c = std::move(client_);
  }
  stopped_cv_.notify_all();
  // A client is closed on its loop; calls in flight on it fail there.
  if (c) loop_->Post([c = std::move(c)]() mutable { c->Close(); });
}

bool AgentLink::Pause(std::chrono::milliseconds d) {
  std::unique_lock<std::mutex> l(mu_);
  return !stopped_cv_.wait_for(l, d, [&] { return stopped_; });
}

Result<void> AgentLink::PodAlive() {
  auto where = locate_();
  if (!where.ok() && MeansGone(where.error())) return std::move(where).error();
  return Ok();
}

Result<std::shared_ptr<ttrpc::Client>> AgentLink::Live(std::chrono::milliseconds patience) {
  std::shared_ptr<ttrpc::Client> lost;
  {
    std::lock_guard<std::mutex> l(mu_);
    if (stopped_) return Error(Code::kUnavailable, "the shim is stopping");
    if (client_ && !client_->closed()) return client_;
    lost = std::move(client_);
  }
  if (lost) loop_->Post([lost = std::move(lost)]() mutable { lost.reset(); });
  // mu_ is not held while dialling: threads that redial at once keep the first client made.
  const auto start = std::chrono::steady_clock::now();
  auto wait = backoff_.first;
  Error last(Code::kUnavailable, "not connected");
  for (;;) {
    {
      std::lock_guard<std::mutex> l(mu_);
      if (stopped_) return Error(Code::kUnavailable, "the shim is stopping");
      if (client_ && !client_->closed()) return client_;  // another thread got there first
    }
    auto where = locate_();
    if (!where.ok()) {
      if (MeansGone(where.error())) return std::move(where).error();
      last = std::move(where).error();
    } else if (auto c = Dial(loop_, *where); c.ok()) {
      std::lock_guard<std::mutex> l(mu_);
      if (client_ && !client_->closed()) {  // raced: keep the first, drop ours on the loop
        loop_->Post([c = std::move(*c)]() mutable { c.reset(); });
        return client_;
      }
      if (ever_connected_) {
        spdlog::info("shim: reconnected to the pod's agent at {}", *where);
      }
      ever_connected_ = true;
      client_ = std::move(*c);
      return client_;
    } else {
      last = std::move(c).error();
    }
    if (patience.count() > 0 && std::chrono::steady_clock::now() - start >= patience) {
      return last.Wrap("the pod's agent is not reachable");
    }
    if (!Pause(wait)) return Error(Code::kUnavailable, "the shim is stopping");
    wait = std::min(wait * 2, backoff_.max);
  }
}

Result<std::string> AgentLink::CallOnce(const std::string& method, const std::string& payload,
                                        std::chrono::nanoseconds timeout) {
  PP_ASSIGN_OR_RETURN(auto c, Live(backoff_.once_patience));
  ttrpc::CallOptions o;
  o.timeout = timeout;
  auto r = c->CallSync(kAgent, method, payload, o);
  loop_->Post([c = std::move(c)]() mutable { c.reset(); });
  return r;
}

Result<std::string> AgentLink::CallRetrying(const std::string& method, const std::string& payload,
                                            std::chrono::nanoseconds timeout) {
  auto wait = backoff_.first;
  for (;;) {
    PP_ASSIGN_OR_RETURN(auto c, Live(std::chrono::milliseconds(0)));
    ttrpc::CallOptions o;
    o.timeout = timeout;
    auto r = c->CallSync(kAgent, method, payload, o);
    bool lost = !r.ok() && r.error().code() == Code::kUnavailable;
    bool closed = c->closed();
    loop_->Post([c = std::move(c)]() mutable { c.reset(); });
    if (!lost) return r;
    // The connection went (the sandboxer restarts), or the mux has no channel to the guest
    // just now (it reattaches, or the VM died): go on while the pod lives.
    if (auto alive = PodAlive(); !alive.ok()) {
      return std::move(alive).error().Wrap(method + " cannot be answered");
    }
    if (closed) {
      wait = backoff_.first;  // Live redials with its own backoff
      continue;
    }
    if (!Pause(wait)) return Error(Code::kUnavailable, "the shim is stopping");
    wait = std::min(wait * 2, backoff_.max);
  }
}

}  // namespace peapod::shim
