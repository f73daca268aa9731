// stdio between containerd and a process in the guest, on the shim's loop: no thread per
// stream. Each pump owns itself while it runs (its callbacks hold it) and goes when it ends.
//
// Output: a long-poll read from the agent at an offset (ReadStdout/ReadStderr), written to
// containerd's FIFO without blocking; the next read goes out only once the last answer is
// written, so a FIFO nobody drains holds the process back (back-pressure) and never fills the
// shim. Input: containerd's FIFO, read when it is readable, each chunk sent (WriteStdin at an
// offset) before the next is read; at EOF the process's stdin is closed (CloseStdin).
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "common/agentapi/agent_client.h"
#include "common/base/unique_fd.h"
#include "common/loop/event_loop.h"

namespace peapod::shim {

struct StreamOf {
  std::string container_id;
  std::string exec_id;  // empty: the container's init process
};

// Stops a pump at once: no more reads or writes, its fds closed (an output pump then calls its
// done). Harmless once the pump has ended. Loop thread.
using StopPump = std::function<void()>;

// Copies the process's stdout (or stderr) to out until EOF, then calls done once. An invalid
// out drops the output (it is still read, so the process is never held). Loop thread.
StopPump PumpOutput(EventLoop* loop, agentapi::AgentClient agent, StreamOf stream,
                    bool stderr_stream, UniqueFd out, std::function<void()> done);

// Sends what arrives on `in` (containerd's stdin FIFO, opened non-blocking) to the process's
// stdin until EOF, then closes it in the guest. Loop thread.
StopPump PumpInput(EventLoop* loop, agentapi::AgentClient agent, StreamOf stream, UniqueFd in);

}  // namespace peapod::shim
