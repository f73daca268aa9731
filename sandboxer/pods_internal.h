// What pods.cc and pool.cc share about a pod: PodManager's private per-pod state.
#pragma once

#include <chrono>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "sandboxer/network.h"
#include "sandboxer/pods.h"
#include "sandboxer/port_forward.h"

namespace peapod::sandboxer {

// The outcome of an agent call sent before the code that needs it runs: whichever comes
// first, the answer or Then, waits for the other. Loop thread.
class PendingAnswer {
 public:
  void Set(std::optional<Error> e) {
    if (then_) return std::exchange(then_, nullptr)(std::move(e));
    answered_ = true;
    error_ = std::move(e);
  }
  void Then(std::function<void(std::optional<Error>)> fn) {
    if (answered_) return fn(std::move(error_));
    then_ = std::move(fn);
  }

 private:
  bool answered_ = false;
  std::optional<Error> error_;
  std::function<void(std::optional<Error>)> then_;
};

struct PodManager::Pod {
  PodRecord rec;
  bool busy = false;      // Create, Start or Shutdown in progress
  bool stopping = false;  // we asked for the stop (clean exit status)
  bool removing = false;  // Shutdown is removing its record: none is written any more
  std::unique_ptr<AgentMux> mux;
  std::shared_ptr<ttrpc::Client> agent;      // the sandboxer's own client, through the mux
  std::unique_ptr<PortForwarder> forwarder;  // CRI PortForward into the guest; needs agent
  std::vector<Reply<PodExit>> waiters;
  std::vector<Reply<void>> stop_replies;                  // the Stops the stop in flight answers
  std::map<uint64_t, Reply<std::string>> metric_replies;  // Metrics calls in flight
  uint64_t metric_calls = 0;
  std::optional<PodNetwork> net;            // set while starting, for the agent's ConfigureNetwork
  std::shared_ptr<PendingAnswer> net_call;  // or that call, already sent (a pool VM's adoption)
  bool resume_pending = false;              // restored from the template: Resumed goes first
  std::deque<std::function<void(std::function<void()>)>> ops;  // storage ops, in order
  bool op_running = false;
  // Where a Start's time went (milliseconds per step, in order), logged when the pod is ready.
  std::vector<std::pair<std::string, double>> start_steps;
  std::chrono::steady_clock::time_point step_at;
  void Step(const char* name) {
    auto now = std::chrono::steady_clock::now();
    start_steps.emplace_back(name,
                             std::chrono::duration<double, std::milli>(now - step_at).count());
    step_at = now;
  }
};

// Names the sandboxer gives its own VMs' run dirs, TAPs and domains ("pool-<hex>",
// "template-build"): no pod may have one.
bool IsReservedPodId(const std::string& id);

// n random bytes as hex, sep between them (names and MACs; not secrets).
std::string RandomBytesHex(size_t n, const char* sep = "");

// The share and (if the VM has one) the scratch disk, as CreateSandbox mounts them.
void AddPodStorages(peapod::agent::v1::CreateSandboxRequest& sb, bool scratch);

// A NIC brought up ahead of its pod (Interface.standby): the template's and a pool VM's.
peapod::agent::v1::ConfigureNetworkRequest StandbyNetwork(const std::string& mac);

// Sends a pod's network to its guest; the answer ("configure guest network: …" if refused)
// lands in the PendingAnswer returned, which SetUpGuest awaits.
std::shared_ptr<PendingAnswer> SendPodNetwork(
    const std::shared_ptr<ttrpc::Client>& agent,
    const peapod::agent::v1::ConfigureNetworkRequest& req);

// The pod's TAP: a pool VM's own name, else the one named for the pod (if it has a netns).
inline std::string TapOf(const PodRecord& r) { return r.tap.empty() ? TapName(r.id) : r.tap; }
inline bool HasTap(const PodRecord& r) { return !r.tap.empty() || !r.netns.empty(); }

inline Error UnknownPod(const std::string& id) {
  return Error::NotFound("sandbox {} not found (never created here, or already shut down)", id);
}

}  // namespace peapod::sandboxer
