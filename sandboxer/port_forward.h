// CRI PortForward for a VM pod, on the host side.
//
// containerd serves PortForward itself: it enters the pod's netns and dials localhost:<port>.
// A PortForwarder makes that connection land somewhere: one listening socket on 127.0.0.1 in
// the pod netns receives connections for every port (LoopbackSteering), and each accepted
// connection is relayed to 127.0.0.1:<the port dialed> inside the guest through the agent
// (OpenPort, then ReadPort/WritePort, like a process's stdio). Half-closes are carried both
// ways; a port nobody listens on in the guest closes the connection at once.
//
// Everything runs on the sandboxer's loop; the forwarder lives as long as the pod's agent
// channel (it is made when the pod becomes ready or is re-adopted, and dropped when it stops).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>

#include "common/base/result.h"
#include "common/base/unique_fd.h"
#include "common/loop/event_loop.h"
#include "common/ttrpc/client.h"
#include "sandboxer/loopback_steer.h"

namespace peapod::sandboxer {

class PortForwarder {
 public:
  // Listens in the netns at netns_path and relays through agent (the sandboxer's own client of
  // the pod's agent). Tells the agent to drop connections a previous forwarder left open.
  static Result<std::unique_ptr<PortForwarder>> Start(EventLoop* loop, const std::string& pod_id,
                                                      const std::string& netns_path,
                                                      std::shared_ptr<ttrpc::Client> agent);
  ~PortForwarder();
  PortForwarder(const PortForwarder&) = delete;
  PortForwarder& operator=(const PortForwarder&) = delete;

  size_t connections() const { return conns_.size(); }

 private:
  struct Conn;
  PortForwarder(EventLoop* loop, std::string pod_id, std::shared_ptr<ttrpc::Client> agent);

  void OnAccept();
  void Opened(uint64_t n, Result<std::string> id);
  void OnHostEvents(uint64_t n, uint32_t events);
  void ReadGuest(uint64_t n);
  void FlushToHost(Conn& c);
  void UpdateWatch(Conn& c);
  void MaybeFinish(uint64_t n);
  void Abort(uint64_t n, const std::string& why);
  // Tells the agent to drop its end (empty id: every connection), if the channel is up.
  void CloseInGuest(const std::string& id);
  // Drops connection n on both sides.
  void Forget(uint64_t n);
  Conn* Find(uint64_t n);

  EventLoop* loop_;
  std::string pod_id_;
  std::shared_ptr<ttrpc::Client> agent_;
  UniqueFd listener_;
  LoopbackSteering steering_;
  EventLoop::WatchId watch_ = 0;
  uint64_t next_ = 1;
  std::map<uint64_t, std::unique_ptr<Conn>> conns_;
  std::shared_ptr<bool> alive_ = std::make_shared<bool>(true);
};

}  // namespace peapod::sandboxer
