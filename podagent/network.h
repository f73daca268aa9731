// The pod's network inside the guest, set with rtnetlink directly (the guest has no ip(8) and the
// agent links no libnl): NICs found by MAC, renamed, addressed and brought up; routes added.
#pragma once

#include "common/base/result.h"
#include "peapod/agent/v1/agent.pb.h"

namespace peapod::agent {

// Applies the whole request; stops at the first failure with an error naming the interface or
// route. Interfaces first (routes need their devices up).
Result<void> ConfigureNetwork(const peapod::agent::v1::ConfigureNetworkRequest& req);

}  // namespace peapod::agent
