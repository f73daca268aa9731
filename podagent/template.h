// The guest's side of VM templates (docs/sandboxer.md, "Templates"): a VM restored from a
// template's saved memory wakes up with the template's RNG state, clock and caches.
#pragma once

#include <string>

#include "common/base/result.h"
#include "peapod/agent/v1/agent.pb.h"

namespace peapod::agent {

// Mixes the host's bytes into the kernel's input pool, credited, and reseeds the CRNG from it
// at once (RNDADDENTROPY, RNDRESEEDCRNG); sets CLOCK_REALTIME to the host's time; drops clean
// page cache (the template's own scratch disk was probed at its boot: a restored VM has
// another disk at that address).
Result<void> ResumeFromTemplate(const v1::ResumedRequest& req);

// Drops clean caches before the template is saved: less memory in every restored VM.
void DropCaches();

}  // namespace peapod::agent
