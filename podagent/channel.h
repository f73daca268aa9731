// The agent's end of the host channel. In a VM it is the virtio-serial port named
// io.peapod.agent.0; in local mode (tests, no VM) a unix socket.
//
// A virtio-serial port can be open only once, so the agent opens it once and keeps it for its
// whole life. Each host session (the sandboxer connecting to QEMU's end) is served on a dup of
// it; when the host goes away the port reports HUP, the session ends, and the agent polls until
// the host is back, then serves a new session. Nothing the host sent in an old session is
// carried into the next.
#pragma once

#include <string>

#include "common/base/result.h"
#include "common/base/unique_fd.h"
#include "common/loop/event_loop.h"
#include "common/ttrpc/server.h"

namespace peapod::agent {

inline constexpr char kPortName[] = "io.peapod.agent.0";
// The vsock port the agent listens on when the VM has a vsock device (KVM hosts with
// vhost-vsock); any number of host connections, no mux needed.
inline constexpr unsigned kVsockPort = 1024;

// True when the guest has a virtio vsock device (its driver is bound to one).
bool HasVsockDevice();
// A listening AF_VSOCK stream socket on port, for any CID.
Result<UniqueFd> ListenVsock(unsigned port);

// Finds /dev/vportNpM whose /sys/class/virtio-ports/<dev>/name is `name` (there is no udev in
// the guest, so no /dev/virtio-ports/ links), waiting up to timeout for it to appear.
Result<std::string> FindVirtioPort(const std::string& name, std::chrono::milliseconds timeout,
                                   const std::string& sysfs_root = "/sys/class/virtio-ports");

class PortChannel {
 public:
  PortChannel(EventLoop* loop, ttrpc::Server* server, UniqueFd port)
      : loop_(loop), server_(server), port_(std::move(port)) {}
  // Starts serving sessions as the host connects.
  void Start();
  int sessions() const { return sessions_; }

 private:
  void CheckHost();
  EventLoop* loop_;
  ttrpc::Server* server_;
  UniqueFd port_;
  int sessions_ = 0;
};

}  // namespace peapod::agent
