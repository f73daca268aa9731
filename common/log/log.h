// Logging setup for every peapod program: spdlog, one line per event, structured as
// `msg key=value ...` with pod=/container= on every line that concerns one.
#pragma once

#include <chrono>
#include <string>

#include "common/base/result.h"

namespace peapod::log {

struct Options {
  std::string program;         // shown on every line
  std::string level = "info";  // trace, debug, info, warn, error, off
  std::string file;            // empty: stderr
};

// Installs the default logger. Bad level names or an unwritable file are errors, so a typo in
// a config file is reported instead of silently logging at the wrong level.
Result<void> Init(const Options& opts);

// Whole milliseconds from `from` to `to` (default: now), for the "took N ms" parts of log lines.
inline long long MsSince(
    std::chrono::steady_clock::time_point from,
    std::chrono::steady_clock::time_point to = std::chrono::steady_clock::now()) {
  return std::chrono::duration_cast<std::chrono::milliseconds>(to - from).count();
}

}  // namespace peapod::log
