// Small file helpers shared by the programs.
#pragma once

#include <string>

#include "common/base/result.h"

namespace peapod {

// The whole content of a (small) file.
Result<std::string> ReadFile(const std::string& path);

}  // namespace peapod
