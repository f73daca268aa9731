#include "common/log/log.h"

#include <spdlog/sinks/basic_file_sink.h>
#include <spdlog/sinks/stdout_sinks.h>
#include <spdlog/spdlog.h>

namespace peapod::log {

Result<void> Init(const Options& opts) {
  spdlog::level::level_enum level = spdlog::level::from_str(opts.level);
  // from_str maps unknown names to "off"; only accept "off" when it was asked for.
  if (level == spdlog::level::off && opts.level != "off") {
    return Error::Invalid("log level '{}' is not one of trace, debug, info, warn, error, off",
                          opts.level);
  }
  std::shared_ptr<spdlog::logger> logger;
  try {
    if (opts.file.empty()) {
      logger = std::make_shared<spdlog::logger>(opts.program,
                                                std::make_shared<spdlog::sinks::stderr_sink_mt>());
    } else {
      logger = std::make_shared<spdlog::logger>(
          opts.program, std::make_shared<spdlog::sinks::basic_file_sink_mt>(opts.file));
    }
  } catch (const spdlog::spdlog_ex& e) {
    return Error(Code::kInvalidArgument,
                 fmt::format("cannot open log file '{}': {}", opts.file, e.what()));
  }
  logger->set_pattern("%Y-%m-%dT%H:%M:%S.%fZ %n[%P] %l %v", spdlog::pattern_time_type::utc);
  logger->set_level(level);
  logger->flush_on(spdlog::level::info);
  spdlog::set_default_logger(logger);
  return Ok();
}

}  // namespace peapod::log
