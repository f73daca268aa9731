#include "common/base/mountinfo.h"

#include <fstream>
#include <sstream>

namespace peapod {

namespace {

// mountinfo escapes blanks, tabs, newlines and backslashes as \ooo.
std::string Unescape(const std::string& s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '\\' && i + 3 < s.size() && s[i + 1] >= '0' && s[i + 1] <= '3') {
      out += static_cast<char>((s[i + 1] - '0') * 64 + (s[i + 2] - '0') * 8 + (s[i + 3] - '0'));
      i += 3;
    } else {
      out += s[i];
    }
  }
  return out;
}

}  // namespace

std::vector<MountPoint> ReadMountTable(const std::string& table) {
  std::vector<MountPoint> out;
  std::ifstream mi(table);
  std::string line;
  while (std::getline(mi, line)) {
    // id parent major:minor root mount-point mount-options ...
    std::istringstream in(line);
    std::string id, parent, devno, root, point, options;
    if (!(in >> id >> parent >> devno >> root >> point >> options)) continue;
    MountPoint m{Unescape(point), false, "", ""};
    std::istringstream opts(options);
    for (std::string o; std::getline(opts, o, ',');) m.readonly = m.readonly || o == "ro";
    // optional fields, then "-", fstype, source, super options
    for (std::string f; in >> f;) {
      if (f != "-") continue;
      std::string source;
      in >> m.fstype >> source >> m.super_options;
      break;
    }
    out.push_back(std::move(m));
  }
  return out;
}

std::vector<MountPoint> MountsUnder(const std::string& dir, bool below_only,
                                    const std::string& table) {
  std::string prefix = dir;
  while (prefix.size() > 1 && prefix.back() == '/') prefix.pop_back();
  std::vector<MountPoint> out;
  for (auto& m : ReadMountTable(table)) {
    bool below = prefix == "/" ? m.path.size() > 1 : m.path.rfind(prefix + "/", 0) == 0;
    if (below || (!below_only && m.path == prefix)) out.push_back(std::move(m));
  }
  return out;
}

}  // namespace peapod
