// Steers every TCP connection to 127.0.0.1:<any port> inside a network namespace to one
// listening socket, with a BPF sk_lookup program attached to that netns (Linux 5.9+).
//
// Why: containerd implements CRI PortForward by dialing localhost:<port> inside the pod's
// netns. In a VM pod nothing listens there (the containers are in the guest), so the sandboxer
// listens on one socket in the netns and this program hands it connections for every port;
// the accepted socket's local address is the port containerd dialed. No netfilter rules, no
// per-port listeners, and ports the pod opens later work too.
#pragma once

#include <string>

#include "common/base/result.h"
#include "common/base/unique_fd.h"

namespace peapod::sandboxer {

// Holds the program attached: closing it (destroying this) detaches it.
struct LoopbackSteering {
  UniqueFd map;
  UniqueFd prog;
  UniqueFd link;
};

// listener: a listening IPv4 TCP socket made in the netns at netns_path.
Result<LoopbackSteering> SteerLoopback(const std::string& netns_path, int listener);

}  // namespace peapod::sandboxer
