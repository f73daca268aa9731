// The cap on a pod VM's console log.
//
// QEMU writes the guest's serial console into <state dir>/console.log: guest output, so
// hostile, and QEMU 7.2 has no size limit for a file chardev. libvirt opens the file for QEMU
// and, with <source append='on'>, opens it O_APPEND (qemuProcessPrepareHostBackendChardevOne in
// libvirt 9.0, without virtlogd): QEMU's writes always land at the current end, so the file can
// be cut from outside at any moment. The sandboxer checks every console log once per period;
// one past the cap has its newest half copied to console.log.1 and is truncated to nothing.
// Nothing is remembered between checks, so a restarted sandboxer goes on where the last one
// stopped, for the pods it recovers and for pool VMs alike.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/base/result.h"

namespace peapod::sandboxer {

constexpr uint64_t kConsoleLogCap = 1u << 20;
constexpr std::chrono::seconds kConsoleLogCheckPeriod{1};

// Cuts name in dir_fd if it is a regular file (not followed if a symlink) of more than cap
// bytes: its last cap/2 bytes replace name.1, then it is truncated. Bytes QEMU writes during the
// cut (microseconds) may be lost. Returns whether it was cut; a missing file is not an error.
Result<bool> CapConsoleLog(int dir_fd, const std::string& name, uint64_t cap);

// Caps <root>/<dir>/console.log for every directory under each root. Failures are logged.
// Returns how many logs were cut.
size_t CapConsoleLogs(const std::vector<std::string>& roots, uint64_t cap);

// Runs CapConsoleLogs every period on a thread of its own (the files are the guest's to grow;
// the control loop never waits on them) until destroyed.
class ConsoleLogCapper {
 public:
  ConsoleLogCapper(std::vector<std::string> roots, uint64_t cap = kConsoleLogCap,
                   std::chrono::milliseconds period = kConsoleLogCheckPeriod);
  ~ConsoleLogCapper();
  ConsoleLogCapper(const ConsoleLogCapper&) = delete;
  ConsoleLogCapper& operator=(const ConsoleLogCapper&) = delete;

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool quit_ = false;
  std::thread thread_;
};

}  // namespace peapod::sandboxer
