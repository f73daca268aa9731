// A pod's network on the host side, with libnl-3 (no ip/tc subprocesses).
//
// containerd's CNI has already put an interface (a veth end, usually eth0) with the pod's
// addresses and routes into the pod's netns. peapod moves that identity into the VM:
//   1. PrepareTap: read the CNI interface (MAC, MTU, addresses, routes) inside the netns, and
//      create a persistent TAP in the host netns for the domain to open (libvirt opens TAPs by
//      name in its own netns: managed='no').
//   2. after QEMU has opened it, AttachTap moves the TAP into the pod netns, brings it up and
//      joins it to the CNI interface with tc: an ingress qdisc on both and a match-everything u32
//      filter whose mirred action redirects every frame to the other one. The guest NIC has the CNI
//      interface's MAC, so frames addressed to the pod reach the guest unchanged.
//   3. the agent gets the addresses and routes (ConfigureNetwork) and answers as the pod.
// RemoveTap deletes the TAP wherever it is (containerd deletes the netns itself).
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "common/base/result.h"
#include "peapod/agent/v1/agent.pb.h"

namespace peapod::sandboxer {

struct PodNetwork {
  std::string netns;  // path, e.g. /var/run/netns/cni-...
  std::string cni_ifname;
  std::string mac;
  uint32_t mtu = 0;
  std::string tap;  // name (same in the host netns before the move and in the pod netns after)
  // What the agent gets: the guest interface (eth0, the CNI MAC) and routes.
  peapod::agent::v1::ConfigureNetworkRequest guest;
};

// Runs fn on a thread that has entered the network namespace at path (setns affects only the
// calling thread, so the sandboxer's own threads stay in the host netns). Sockets fn makes stay
// in that netns.
Result<void> InNetns(const std::string& path, const std::function<Result<void>()>& fn);

// The TAP name of a pod: short, stable, unique per pod id.
std::string TapName(const std::string& pod_id);

Result<PodNetwork> PrepareTap(const std::string& pod_id, const std::string& netns);
// The pieces of PrepareTap, for a pool VM whose TAP exists before its pod does: the CNI
// interface read in netns (no TAP), and a persistent TAP in our netns.
Result<PodNetwork> ReadPodNetwork(const std::string& netns);
Result<void> CreateTap(const std::string& tap);
Result<void> AttachTap(const PodNetwork& net);
// Deletes the TAP in the host netns or in the pod netns (if it still exists). Missing is fine.
void RemoveTap(const std::string& tap, const std::string& netns);

}  // namespace peapod::sandboxer
