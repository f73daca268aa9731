// containerd.task.v2.Task for one container, served by containerd-shim-peapod-v2 over ttrpc.
//
// The shim holds no VM: it finds (or, for a pause container or a plain `ctr run`, creates) the
// container's pod through peapod-sandboxer's shim API, asks the sandboxer to attach the rootfs
// and volumes, and drives the container in the guest through the pod's agent socket (the
// sandboxer's mux). Everything runs on the shim's one event loop: each task method has a short
// handler that answers at once or when its calls to the sandboxer or the agent (asynchronous,
// typed: common/agentapi) answer; stdio is pumped between containerd's FIFOs and the agent on
// the loop too (shim/stdio_pumps.h), with no thread per request or stream. A process's exit is
// reported (Wait, /tasks/exit) only after its output has been copied.
#pragma once

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "common/loop/event_loop.h"
#include "common/oci/spec.h"
#include "common/ttrpc/client.h"
#include "common/ttrpc/server.h"
#include "shim/events.h"

namespace peapod::shim {

struct ShimOptions {
  std::string id;         // the container id (-id)
  std::string ns;         // containerd namespace (-namespace)
  std::string bundle;     // cwd at start: config.json, rootfs, address, log
  std::string sandboxer;  // peapod-sandboxer's shim API socket
};

class TaskService {
 public:
  TaskService(EventLoop* loop, ShimOptions opts, EventPublisher* events);
  ~TaskService();
  void Register(ttrpc::Server& server);
  // Set when containerd asked us to exit (Shutdown): main stops the loop.
  void SetOnShutdown(std::function<void()> cb) { on_shutdown_ = std::move(cb); }

  // Defined in task_service.cc.
  struct Process;
  struct Impl;

 private:
  std::unique_ptr<Impl> impl_;
  std::function<void()> on_shutdown_;
};

// What `containerd-shim-peapod-v2 delete` does after a shim died: removes the container from
// its pod (and the pod itself if the container owned it), best effort. Never fails.
void CleanupAfterDeadShim(const ShimOptions& opts);

// How a container relates to its pod, from its OCI spec annotations.
struct PodRole {
  enum Kind { kPlain, kPause, kMember } kind = kPlain;
  std::string pod_id;
  std::string netns;     // the spec's network namespace path (pause/plain)
  std::string hostname;  // the spec's hostname
};
PodRole RoleOf(const std::string& id, const oci::Spec& spec);
// The same from config.json's text, parsed (and validated) with common/oci.
Result<PodRole> RoleFromSpec(const std::string& id, const std::string& config_json);

}  // namespace peapod::shim
