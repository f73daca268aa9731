#include "shim/events.h"

#include <utility>

#include <google/protobuf/util/time_util.h>
#include <spdlog/spdlog.h>

#include "containerd/services/ttrpc/events/v1/events.pb.h"
#include "shim/dial.h"

namespace peapod::shim {

using google::protobuf::util::TimeUtil;
using namespace std::chrono_literals;

EventPublisher::EventPublisher(EventLoop* loop, std::string address, std::string ns)
    : loop_(loop), address_(std::move(address)), ns_(std::move(ns)) {}

EventPublisher::~EventPublisher() {
  *alive_ = false;
  if (client_) client_->Close();
}

void EventPublisher::Publish(const std::string& topic, const google::protobuf::Message& event) {
  containerd::services::events::ttrpc::v1::ForwardRequest req;
  auto* env = req.mutable_envelope();
  *env->mutable_timestamp() = TimeUtil::GetCurrentTime();
  env->set_namespace_(ns_);
  env->set_topic(topic);
  // containerd's typeurl names protobuf events by their full name, with no URL prefix.
  env->mutable_event()->set_type_url(std::string(event.GetDescriptor()->full_name()));
  env->mutable_event()->set_value(event.SerializeAsString());
  spdlog::info("shim: event {} {}", topic, event.ShortDebugString());
  queue_.push_back(req.SerializeAsString());
  if (!sending_) SendNext();
}

void EventPublisher::Flush(std::function<void()> done) {
  if (queue_.empty() && !sending_) return done();
  flushed_.push_back(done);
  // containerd away: the shim still exits.
  if (flush_timer_) return;
  flush_timer_ = loop_->AddTimer(10s, [alive = alive_, this] {
    if (!*alive) return;
    flush_timer_ = 0;
    auto waiting = std::move(flushed_);
    flushed_.clear();
    for (auto& f : waiting) f();
  });
}

void EventPublisher::SendNext() {
  if (queue_.empty()) {
    sending_ = false;
    if (flush_timer_) loop_->CancelTimer(std::exchange(flush_timer_, 0));
    auto waiting = std::move(flushed_);
    flushed_.clear();
    for (auto& f : waiting) f();
    return;
  }
  sending_ = true;
  Send(0);
}

void EventPublisher::Sent() {
  queue_.pop_front();
  SendNext();
}

void EventPublisher::Send(int attempt) {
  if (address_.empty()) return Sent();
  if (!client_ || client_->closed()) {
    client_.reset();
    if (auto c = DialNow(loop_, address_); c.ok()) client_ = std::move(*c);
  }
  if (!client_) {
    spdlog::warn("shim: cannot reach containerd's event service at {}", address_);
    return Sent();
  }
  ttrpc::CallOptions opts;
  opts.timeout = 5s;
  client_->Call("containerd.services.events.ttrpc.v1.Events", "Forward", queue_.front(), opts,
                [alive = alive_, this, attempt](Result<std::string> r) {
                  if (!*alive) return;
                  if (r.ok()) return Sent();
                  spdlog::warn("shim: forwarding an event: {}", r.error().ToString());
                  if (attempt > 0) return Sent();
                  // Reconnect once: the call's own callback is no place to close the client.
                  auto c = std::move(client_);
                  loop_->Post([c] { c->Close(); });
                  Send(attempt + 1);
                });
}

}  // namespace peapod::shim
