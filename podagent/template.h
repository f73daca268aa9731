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

// Clears the guest's free memory before the template is saved. What the boot freed (the
// initramfs image the kernel unpacked, its decompression buffers, module loading) still holds
// its bytes, and the migration stream carries every page that is not zero: taken once and
// given back, those pages are cleared by the kernel, and each costs the stream a flag instead
// of 4 KiB, and every restored VM a page it does not load. Returns the bytes cleared.
Result<uint64_t> ClearFreeMemory();

}  // namespace peapod::agent
