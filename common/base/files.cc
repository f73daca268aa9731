#include "common/base/files.h"

#include <fstream>
#include <sstream>

namespace peapod {

Result<std::string> ReadFile(const std::string& path) {
  std::ifstream f(path);
  if (!f) return Error::Errno("open " + path);
  std::stringstream ss;
  ss << f.rdbuf();
  if (f.bad()) return Error::Errno("read " + path);
  return ss.str();
}

}  // namespace peapod
