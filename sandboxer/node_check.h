// `peapod-sandboxer --check`: can this node run peapod pods? Each check prints one line in
// plain words (ok, note, or FAIL with what to do); the result is 0 when nothing failed.
#pragma once

#include <cstdio>
#include <string>

#include "sandboxer/config.h"

namespace peapod::sandboxer {

int CheckNode(const Config& cfg, std::FILE* out);

// Whether KVM can run a VM here: /dev/kvm opens, speaks the KVM API and makes a VM (a
// /dev/kvm that exists but cannot, as in some nested setups, is not usable). why: the reason
// when not.
bool KvmWorks(std::string* why = nullptr);

}  // namespace peapod::sandboxer
