#include "shim/volumes.h"

namespace peapod::shim {

nlohmann::json WithSubmounts(const nlohmann::json& mounts, const std::vector<SharedBind>& binds) {
  nlohmann::json out = nlohmann::json::array();
  for (size_t i = 0; i < mounts.size(); ++i) {
    out.push_back(mounts[i]);
    for (const auto& b : binds) {
      if (b.index != i) continue;
      const std::string dest = mounts[i].value("destination", "");
      for (const auto& m : b.submounts.submounts()) {
        out.push_back({{"destination", dest + m.path()},
                       {"type", "bind"},
                       {"source", m.guest_path()},
                       {"options", {"rbind", m.readonly() ? "ro" : "rw"}}});
      }
    }
  }
  return out;
}

}  // namespace peapod::shim
