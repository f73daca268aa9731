#include "shim/agent_link.h"

#include <algorithm>
#include <optional>

#include <spdlog/spdlog.h>

#include "shim/dial.h"

namespace peapod::shim {

namespace {

constexpr char kAgent[] = "peapod.agent.v1.Agent";

bool MeansGone(const Error& e) {
  return e.code() == Code::kNotFound || e.code() == Code::kFailedPrecondition;
}

Error Stopping() { return Error(Code::kUnavailable, "the shim is stopping"); }

}  // namespace

struct AgentLink::Retry {
  std::string method;
  std::string payload;
  std::chrono::nanoseconds timeout;
  Done done;
  std::chrono::milliseconds wait;
  // A call with a timeout is re-sent only until then: its caller has given up by then, and an
  // agent that answers UNAVAILABLE for ever must not make it live for ever. Long polls (no
  // timeout) are re-sent as long as the pod lives.
  std::optional<std::chrono::steady_clock::time_point> deadline;
  bool Expired() const { return deadline && std::chrono::steady_clock::now() >= *deadline; }
};

std::shared_ptr<AgentLink> AgentLink::Create(EventLoop* loop, Locate locate, Backoff backoff) {
  return std::shared_ptr<AgentLink>(new AgentLink(loop, std::move(locate), backoff));
}

AgentLink::~AgentLink() { Stop(); }

void AgentLink::Stop() {
  if (stopped_) return;
  stopped_ = true;
  Fail(Stopping());
  auto resting = std::move(resting_);
  resting_.clear();
  for (auto& r : resting) r->done(Stopping());
  // Calls in flight on the client fail (CANCELLED) as it closes.
  if (auto c = std::move(client_)) c->Close();
}

void AgentLink::After(std::chrono::milliseconds d, std::function<void()> fn) {
  loop_->AddTimer(d, [weak = weak_from_this(), fn = std::move(fn)] {
    auto self = weak.lock();
    if (self && !self->stopped_) fn();
  });
}

void AgentLink::Fail(const Error& why) {
  auto waiters = std::move(waiters_);
  waiters_.clear();
  for (auto& w : waiters) w.got(why);
}

void AgentLink::Live(std::chrono::milliseconds patience, Got got) {
  if (stopped_) return got(Stopping());
  if (client_ && !client_->closed()) return got(client_);
  auto deadline = patience.count() > 0 ? std::chrono::steady_clock::now() + patience
                                       : std::chrono::steady_clock::time_point::max();
  waiters_.push_back({deadline, std::move(got)});
  if (!dialling_) Attempt(backoff_.first);
}

void AgentLink::Attempt(std::chrono::milliseconds wait) {
  dialling_ = true;
  locate_([weak = weak_from_this(), wait](Result<std::string> where) {
    auto self = weak.lock();
    if (!self) return;
    if (self->stopped_) {
      self->dialling_ = false;
      return self->Fail(Stopping());
    }
    Error last(Code::kUnavailable, "not connected");
    if (!where.ok()) {
      if (MeansGone(where.error())) {
        self->dialling_ = false;
        return self->Fail(where.error());
      }
      last = std::move(where).error();
    } else if (auto c = DialNow(self->loop_, *where); !c.ok()) {
      last = std::move(c).error();
    } else {
      if (self->ever_connected_) spdlog::info("shim: reconnected to the pod's agent at {}", *where);
      self->ever_connected_ = true;
      if (self->client_) self->client_->Close();
      self->client_ = std::move(*c);
      self->dialling_ = false;
      auto waiters = std::move(self->waiters_);
      self->waiters_.clear();
      for (auto& w : waiters) w.got(self->client_);
      return;
    }
    // This round failed: callers out of patience get the reason, the others another round.
    const auto now = std::chrono::steady_clock::now();
    std::vector<Waiter> keep;
    std::vector<Waiter> expired;
    for (auto& w : self->waiters_) (now >= w.deadline ? expired : keep).push_back(std::move(w));
    self->waiters_ = std::move(keep);
    for (auto& w : expired) w.got(last.Wrap("the pod's agent is not reachable"));
    if (self->waiters_.empty()) {
      self->dialling_ = false;
      return;
    }
    self->After(wait, [weak, next = std::min(wait * 2, self->backoff_.max)] {
      if (auto s = weak.lock()) s->Attempt(next);
    });
  });
}

void AgentLink::CallOnce(const std::string& method, std::string payload,
                         std::chrono::nanoseconds timeout, Done done) {
  Live(backoff_.once_patience,
       [method, payload = std::move(payload), timeout,
        done = std::move(done)](Result<std::shared_ptr<ttrpc::Client>> c) mutable {
         if (!c.ok()) return done(std::move(c).error());
         ttrpc::CallOptions o;
         o.timeout = timeout;
         (*c)->Call(kAgent, method, std::move(payload), o, std::move(done));
       });
}

void AgentLink::CallRetrying(const std::string& method, std::string payload,
                             std::chrono::nanoseconds timeout, Done done) {
  auto r = std::make_shared<Retry>(
      Retry{method, std::move(payload), timeout, std::move(done), backoff_.first, std::nullopt});
  if (timeout.count() > 0) r->deadline = std::chrono::steady_clock::now() + timeout;
  SendRetry(std::move(r));
}

void AgentLink::SendRetry(std::shared_ptr<Retry> r) {
  if (r->Expired()) {
    return r->done(Error::Make(Code::kDeadlineExceeded,
                               "{}: the pod's agent did not answer in time", r->method));
  }
  // A call with a deadline waits for a connection only until then; a long poll for ever.
  std::chrono::milliseconds patience(0);
  if (r->deadline) {
    patience = std::max(std::chrono::milliseconds(1),
                        std::chrono::duration_cast<std::chrono::milliseconds>(
                            *r->deadline - std::chrono::steady_clock::now()));
  }
  Live(patience, [weak = weak_from_this(), r](Result<std::shared_ptr<ttrpc::Client>> c) {
    if (!c.ok()) return r->done(std::move(c).error());
    ttrpc::CallOptions o;
    o.timeout = r->timeout;
    auto client = *c;
    client->Call(kAgent, r->method, r->payload, o, [weak, r, client](Result<std::string> res) {
      auto self = weak.lock();
      bool lost = !res.ok() && res.error().code() == Code::kUnavailable;
      if (!lost || !self || self->stopped_ || r->Expired()) return r->done(std::move(res));
      // The connection went (the sandboxer restarts), or the mux has no channel to the guest
      // just now (it reattaches, or the VM died): go on while the pod lives.
      const bool closed = client->closed();
      self->locate_([weak, r, closed](Result<std::string> where) {
        auto self = weak.lock();
        if (!self || self->stopped_) return r->done(Stopping());
        if (!where.ok() && MeansGone(where.error())) {
          return r->done(std::move(where).error().Wrap(r->method + " cannot be answered"));
        }
        if (closed) {  // Live redials with its own backoff
          r->wait = self->backoff_.first;
          return self->SendRetry(r);
        }
        self->resting_.push_back(r);
        self->After(r->wait, [weak, r] {
          auto self = weak.lock();
          if (!self) return;
          auto& rest = self->resting_;
          rest.erase(std::remove(rest.begin(), rest.end(), r), rest.end());
          r->wait = std::min(r->wait * 2, self->backoff_.max);
          self->SendRetry(r);
        });
      });
    });
  });
}

}  // namespace peapod::shim
