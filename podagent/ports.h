// The guest end of port forwarding (CRI PortForward). The host relays each connection that
// containerd makes to localhost:<port> in the pod's netns; here each becomes a TCP connection
// to 127.0.0.1:<port> in the VM, where the pod's containers listen (they share the VM's
// network). Data moves like a process's stdio: an OutputStream the host pulls from and an
// InputStream it pushes to, with the same back-pressure.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>

#include "common/base/result.h"
#include "common/loop/event_loop.h"
#include "podagent/stream.h"

namespace peapod::agent {

class PortRelay {
 public:
  // More open connections than this is a host that forgets to close them.
  static constexpr size_t kMaxConnections = 1024;
  static constexpr auto kConnectTimeout = std::chrono::seconds(10);

  explicit PortRelay(EventLoop* loop) : loop_(loop) {}
  ~PortRelay();
  PortRelay(const PortRelay&) = delete;
  PortRelay& operator=(const PortRelay&) = delete;

  // Connects to 127.0.0.1:port; answers the connection's id once connected.
  void Open(uint32_t port, std::function<void(Result<std::string>)> done);
  Result<OutputStream*> Output(const std::string& id);
  Result<InputStream*> Input(const std::string& id);
  // Drops a connection (empty id: all of them). Pending reads get EOF. Unknown ids are fine.
  void Close(const std::string& id);
  size_t size() const { return conns_.size(); }

 private:
  struct Conn {
    uint32_t port = 0;
    UniqueFd connecting;  // until connected
    EventLoop::WatchId watch = 0;
    EventLoop::TimerId timer = 0;
    std::function<void(Result<std::string>)> done;
    std::unique_ptr<OutputStream> out;
    std::unique_ptr<InputStream> in;
  };
  void Connected(const std::string& id, int err);
  void Drop(Conn& c);

  EventLoop* loop_;
  uint64_t next_id_ = 1;
  std::map<std::string, Conn> conns_;
};

}  // namespace peapod::agent
