// Connecting a ttrpc client: it must be created on the loop thread that will serve it.
#pragma once

#include <future>
#include <memory>
#include <string>

#include "common/loop/event_loop.h"
#include "common/ttrpc/client.h"

namespace peapod::shim {

// On the loop's own thread: connects without blocking (a full backlog is UNAVAILABLE) and
// creates the client there.
inline Result<std::shared_ptr<ttrpc::Client>> DialNow(EventLoop* loop, const std::string& path) {
  PP_ASSIGN_OR_RETURN(auto fd, ConnectUnixNow(path));
  return ttrpc::Client::Create(loop, std::move(fd));
}

// Connects to the unix socket path and creates the client on loop (call from any other thread).
inline Result<std::shared_ptr<ttrpc::Client>> Dial(EventLoop* loop, const std::string& path) {
  PP_ASSIGN_OR_RETURN(auto fd, ConnectUnix(path));
  auto p = std::make_shared<std::promise<Result<std::shared_ptr<ttrpc::Client>>>>();
  auto f = p->get_future();
  auto shared_fd = std::make_shared<UniqueFd>(std::move(fd));
  loop->Post(
      [loop, p, shared_fd] { p->set_value(ttrpc::Client::Create(loop, std::move(*shared_fd))); });
  return f.get();
}

}  // namespace peapod::shim
