// Task events to containerd: each wrapped in an Envelope (timestamp, namespace, topic, Any) and
// sent with containerd.services.events.ttrpc.v1.Events/Forward on TTRPC_ADDRESS. One thread
// sends them in order (create before start before exit before delete); a containerd that is
// not there costs a logged warning, never a stuck task.
#pragma once

#include <condition_variable>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

#include <google/protobuf/message.h>

#include "common/loop/event_loop.h"
#include "common/ttrpc/client.h"

namespace peapod::shim {

class EventPublisher {
 public:
  // address: containerd's ttrpc socket (empty: events are only logged).
  EventPublisher(EventLoop* loop, std::string address, std::string ns);
  ~EventPublisher();
  // topic e.g. "/tasks/exit"; the event is one of containerd.events' Task* messages.
  void Publish(const std::string& topic, const google::protobuf::Message& event);
  // Blocks until every queued event was sent (or failed).
  void Flush();

 private:
  void Run();

  EventLoop* loop_;
  std::string address_;
  std::string ns_;
  std::shared_ptr<ttrpc::Client> client_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::string> queue_;  // serialized ForwardRequests
  bool sending_ = false;
  bool quit_ = false;
  std::thread thread_;
};

}  // namespace peapod::shim
