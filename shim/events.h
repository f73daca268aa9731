// Task events to containerd: each wrapped in an Envelope (timestamp, namespace, topic, Any) and
// sent with containerd.services.events.ttrpc.v1.Events/Forward on TTRPC_ADDRESS. Sent one at a
// time, in order (create before start before exit before delete), from the loop; a containerd
// that is not there costs a logged warning, never a stuck task.
#pragma once

#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <google/protobuf/message.h>

#include "common/loop/event_loop.h"
#include "common/ttrpc/client.h"

namespace peapod::shim {

class EventPublisher {
 public:
  // address: containerd's ttrpc socket (empty: events are only logged).
  EventPublisher(EventLoop* loop, std::string address, std::string ns);
  ~EventPublisher();
  // topic e.g. "/tasks/exit"; the event is one of containerd.events' Task* messages. Loop
  // thread.
  void Publish(const std::string& topic, const google::protobuf::Message& event);
  // Calls done once every event queued so far was sent (or failed), or after 10 s. Loop thread.
  void Flush(std::function<void()> done);

 private:
  void SendNext();
  void Send(int attempt);
  void Sent();

  EventLoop* loop_;
  std::string address_;
  std::string ns_;
  std::shared_ptr<ttrpc::Client> client_;
  std::deque<std::string> queue_;  // serialized ForwardRequests; the front one is being sent
  bool sending_ = false;
  std::vector<std::function<void()>> flushed_;
  EventLoop::TimerId flush_timer_ = 0;  // the 10 s bound of the Flush waiting
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);  // for callbacks after we go
};

}  // namespace peapod::shim
