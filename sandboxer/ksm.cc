#include "sandboxer/ksm.h"

#include <fstream>

namespace peapod::sandboxer {

Result<bool> StartKsm(const std::string& run_file) {
  int run = -1;
  {
    std::ifstream in(run_file);
    if (!(in >> run)) {
      return Error::Make(Code::kFailedPrecondition,
                         "cannot read {}: this kernel has no KSM (CONFIG_KSM); set \"ksm\": false",
                         run_file);
    }
  }
  if (run == 1) return false;
  std::ofstream out(run_file);
  out << 1;
  out.flush();
  if (!out) {
    return Error::Make(Code::kPermissionDenied,
                       "cannot write 1 to {} (read-only /sys, or not root?); set \"ksm\": false "
                       "or start KSM on the host yourself",
                       run_file);
  }
  return true;
}

}  // namespace peapod::sandboxer
