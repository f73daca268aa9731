// Runs a program to completion from a worker thread (mkfs.erofs, mkfs.ext4): argv as given, no
// shell, stdin from /dev/null, stdout and stderr collected. Waits for that one pid only, so it
// never steals another child's exit status (libvirt's, or a reaper's).
#pragma once

#include <string>
#include <vector>

#include "common/base/result.h"

namespace peapod {

struct CommandOutput {
  int exit_code = 0;   // 128+signal when killed
  std::string output;  // stdout and stderr interleaved, at most 64 KiB (the tail)
};

// Errors only when the program cannot be run at all; a non-zero exit is in the result.
Result<CommandOutput> RunProgram(const std::vector<std::string>& argv);

}  // namespace peapod
