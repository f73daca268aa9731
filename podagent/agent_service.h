// The peapod.agent.v1.Agent ttrpc service: the guest side of every pod and container request.
#pragma once

#include <functional>

#include "common/ttrpc/server.h"
#include "podagent/containers.h"
#include "podagent/ports.h"

namespace peapod::agent {

inline constexpr char kAgentService[] = "peapod.agent.v1.Agent";

struct ServiceOptions {
  // Called after DestroySandbox has been answered: powers off in a VM, exits in local mode.
  std::function<void()> shutdown;
  // Local mode: the agent is not the guest's init, so it must not set the host's hostname.
  bool local = false;
};

void RegisterAgentService(ttrpc::Server& server, EventLoop* loop, ContainerManager* containers,
                          PortRelay* ports, ServiceOptions opts);

}  // namespace peapod::agent
