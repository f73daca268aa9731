// Bind-mount volumes as the guest must see them.
#pragma once

#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "peapod/sandboxer/v1/sandboxer.pb.h"

namespace peapod::shim {

// A bind mount of the OCI spec whose source now lies in the pod share, and the host mounts
// below its source, each shared on its own.
struct SharedBind {
  size_t index;  // in the spec's "mounts"
  peapod::sandboxer::v1::SharedSubmounts submounts;
};

// The sandboxer shares a volume without the mounts below it (see ShareVolumes), as runc's
// container sees them: a tmpfs on a subdirectory of a read-only volume stays writable. So each
// such mount becomes a bind of its own, right after its volume (parents first), at the same
// path relative to the volume's destination and with its own ro/rw flag.
nlohmann::json WithSubmounts(const nlohmann::json& mounts, const std::vector<SharedBind>& binds);

}  // namespace peapod::shim
