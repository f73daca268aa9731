// peapod.sandboxer.v1.Sandboxer over ttrpc, for containerd-shim-peapod-v2: pods for the
// classic-CRI and plain-ctr paths, and each container's rootfs and volumes. Served on the
// PodManager's loop, so handlers call it directly.
#pragma once

#include "common/ttrpc/server.h"
#include "sandboxer/pods.h"

namespace peapod::sandboxer {

void RegisterShimService(ttrpc::Server& server, PodManager* pods);

}  // namespace peapod::sandboxer
