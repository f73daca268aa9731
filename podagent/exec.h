// Starting an exec process in a running container without crun.
//
// A `crun exec` is a whole crun process for each exec: under TCG its start-up (ten libraries,
// its spec parsed again) was most of an exec's round trip, even at fixed addresses. The agent
// already knows the container (its spec, its init's pid, its cgroup, crun's compiled seccomp
// filter in crun's state), so it starts the common exec itself, doing what crun 1.8's exec does
// and in the same order: join the init's cgroup and namespaces (a second fork for its PID
// namespace) in a session of its own, find the executable on the process's PATH (and HOME in
// the container's passwd), set the persona, the seccomp filter,
// the groups, the bounding set, the ids, the capabilities, no_new_privs, the umask, and exec.
// What it does not do goes to crun: a terminal (crun passes the pty), a container whose
// processes may have CAP_SYS_PTRACE (they could read the agent's memory in the child before its
// exec), a container in a user namespace, a seccomp notify listener, a filter crun did not leave in
// its state, rlimits or seccomp flags it does not know, and the process fields crun 1.8 does not
// know either (scheduler, ioPriority, execCPUAffinity).
#pragma once

#include <sys/resource.h>
#include <sys/types.h>

#include <array>
#include <functional>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "common/base/result.h"
#include "common/base/unique_fd.h"
#include "common/loop/event_loop.h"
#include "common/oci/spec.h"
#include "podagent/process.h"

namespace peapod::agent {

// Everything the child needs, prepared before the fork (after it, only system calls).
struct ExecPlan {
  std::vector<std::string> argv;
  std::vector<std::string> env;         // KEY=VALUE, one per key
  bool home_from_passwd = false;        // no HOME: the child adds the user's from /etc/passwd
  std::vector<std::string> candidates;  // where the executable may be, in order
  std::string cwd = "/";
  uid_t uid = 0;
  gid_t gid = 0;
  std::vector<gid_t> groups;
  mode_t umask = 022;
  // Capability sets as bit masks: bounding, effective, permitted, inheritable, ambient.
  enum { kBounding, kEffective, kPermitted, kInheritable, kAmbient };
  std::array<uint64_t, 5> caps{};
  int last_cap = 40;
  bool no_new_privs = false;
  std::vector<std::pair<int, rlimit>> rlimits;
  unsigned long persona = 0;  // PER_LINUX
  std::string seccomp;        // a BPF program (struct sock_filter[]); empty: none
  unsigned seccomp_flags = 0;
  std::vector<UniqueFd> namespaces;  // the init's that differ from the agent's; mount last
  bool joins_pid_ns = false;         // then the process is forked once more, inside it
  UniqueFd cgroup_procs;             // the container's cgroup.procs; none without cgroups
};

// The plan for `process` (raw: its JSON text, for fields the typed view does not keep) in the
// container described by `spec` (as the agent gave it to crun), whose init is `init_pid`.
// `container_may_ptrace`: a process of the container may have CAP_SYS_PTRACE (an exec crun
// started with it), so crun starts this one too.
// `crun_state` is crun's state directory of the container, `cgroup_dir` its cgroup ("" for
// none). nullopt, with *why set, when crun must start this exec; an error when the request
// cannot be started at all.
Result<std::optional<ExecPlan>> PlanExec(const oci::Spec& spec, const oci::Process& process,
                                         std::string_view process_json, pid_t init_pid,
                                         bool container_may_ptrace, const std::string& crun_state,
                                         const std::string& cgroup_dir, std::string* why);

// Starts the plan's process with `stdio` as its 0, 1, 2 (-1: /dev/null) and calls done, on the
// loop, with its pid once it has exec'd, or with what stopped it (nothing keeps running then).
void StartExec(EventLoop* loop, Reaper* reaper, ExecPlan plan, std::array<int, 3> stdio,
               std::function<void(Result<pid_t>)> done);

}  // namespace peapod::agent
