// Child processes of the agent: starting them, and routing their exit statuses.
//
// The agent is the guest's PID 1 (a child subreaper in local mode), so every container process
// ends up its child once crun has exited: crun create/exec --detach fork the container's
// process and leave. One Reaper collects every exit on SIGCHLD and hands each status to whoever
// asked for that pid. A status that arrives before anyone asked (a container that exits before
// crun's pid file has been read) is kept until asked for.
#pragma once

#include <sys/types.h>

#include <deque>
#include <functional>
#include <string>
#include <unordered_map>
#include <vector>

#include "common/base/result.h"
#include "common/base/unique_fd.h"
#include "common/loop/event_loop.h"

namespace peapod::agent {

class Reaper {
 public:
  using ExitFn = std::function<void(int wait_status)>;

  // Calls fn with pid's wait status once it exits; right away if it already has.
  void OnExit(pid_t pid, ExitFn fn);
  // Collects every exited child without blocking. Call on SIGCHLD.
  void Reap();

 private:
  static constexpr size_t kMaxUnclaimed = 4096;
  std::unordered_map<pid_t, ExitFn> waiters_;
  // Exits nobody has asked for yet, oldest first; bounded, since most orphans nobody asks for.
  std::unordered_map<pid_t, int> unclaimed_;
  std::deque<pid_t> unclaimed_order_;
};

// The exit code a shell would report: the exit status, or 128+signal.
uint32_t ExitCodeFromWaitStatus(int wait_status);

struct SpawnOptions {
  std::vector<std::string> argv;  // argv[0] is an absolute path
  // Become the child's 0, 1, 2; -1 means /dev/null.
  int stdin_fd = -1;
  int stdout_fd = -1;
  int stderr_fd = -1;
  // Run the program without address space randomization (ADDR_NO_RANDOMIZE). Under TCG (QEMU
  // 7.2) a translated block is found again only at the same virtual address, so a helper that
  // maps its libraries where the last run had them reuses that run's translated code instead of
  // translating it all again: crun exec 230-730 -> 65-170 ms in a guest. For the agent's own
  // helpers only; whatever they exec in turn must reset the personality.
  bool fixed_addresses = false;
};

// True when the CPU is QEMU's TCG, the emulator (its hypervisor CPUID leaf says "TCGTCGTCGTCG").
bool UnderTcg();

// fork+exec. The child starts with every signal unblocked and default dispositions, and only
// fds 0-2 open (everything else is close-on-exec or closed).
Result<pid_t> Spawn(const SpawnOptions& opts);

// Runs a short-lived helper (crun create/exec/kill/...) without blocking the loop and calls
// done with what it printed on stdout when it exits 0, or with an error that carries what it
// printed on stderr. stdout/stderr fds set in opts are used as given instead of captured.
void RunCommand(EventLoop* loop, Reaper* reaper, SpawnOptions opts,
                std::function<void(Result<std::string>)> done);

}  // namespace peapod::agent
