#include "shim/events.h"

#include <google/protobuf/util/time_util.h>
#include <spdlog/spdlog.h>

#include "containerd/services/ttrpc/events/v1/events.pb.h"
#include "shim/dial.h"

namespace peapod::shim {

using google::protobuf::util::TimeUtil;
using namespace std::chrono_literals;

EventPublisher::EventPublisher(EventLoop* loop, std::string address, std::string ns)
    : loop_(loop), address_(std::move(address)), ns_(std::move(ns)) {
  thread_ = std::thread([this] { Run(); });
}

EventPublisher::~EventPublisher() {
  {
    std::lock_guard<std::mutex> l(mu_);
    quit_ = true;
  }
  cv_.notify_all();
  thread_.join();
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
  {
    std::lock_guard<std::mutex> l(mu_);
    queue_.push_back(req.SerializeAsString());
  }
  cv_.notify_all();
}

void EventPublisher::Flush() {
  std::unique_lock<std::mutex> l(mu_);
  cv_.wait_for(l, 10s, [&] { return queue_.empty() && !sending_; });
}

void EventPublisher::Run() {
  for (;;) {
    std::string req;
    {
      std::unique_lock<std::mutex> l(mu_);
      cv_.wait(l, [&] { return quit_ || !queue_.empty(); });
      if (queue_.empty()) return;
      req = std::move(queue_.front());
      queue_.pop_front();
      sending_ = true;
    }
    if (!address_.empty()) {
      for (int attempt = 0; attempt < 2; ++attempt) {
        if (!client_) {
          auto c = Dial(loop_, address_);
          if (c.ok()) client_ = *c;
        }
        if (!client_) {
          spdlog::warn("shim: cannot reach containerd's event service at {}", address_);
          break;
        }
        ttrpc::CallOptions opts;
        opts.timeout = 5s;
        auto r =
            client_->CallSync("containerd.services.events.ttrpc.v1.Events", "Forward", req, opts);
        if (r.ok()) break;
        spdlog::warn("shim: forwarding an event: {}", r.error().ToString());
        client_.reset();  // reconnect once
      }
    }
    {
      std::lock_guard<std::mutex> l(mu_);
      sending_ = false;
    }
    cv_.notify_all();
  }
}

}  // namespace peapod::shim
