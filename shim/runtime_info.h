// The shim's answer to `containerd-shim-peapod-v2 -info`: containerd 2.x's CRI runs it once per
// runtime handler at start and reads the OCI "features" document in it to decide what the
// handler supports (recursive read-only mounts; user namespaces with idmap mounts).
#pragma once

#include <string>

namespace peapod::shim {

// The OCI runtime-spec features document (JSON) for containers in a peapod pod VM: what the
// guest's crun and kernel do, less what the VM boundary takes away (no idmapped mounts through
// the 9p share, so containerd keeps CRI user namespaces off for this handler).
std::string FeaturesJson();

// A serialized containerd.types.RuntimeInfo holding FeaturesJson().
std::string RuntimeInfoBytes(const std::string& version);

}  // namespace peapod::shim
