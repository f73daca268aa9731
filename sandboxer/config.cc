#include "sandboxer/config.h"

#include <fcntl.h>
#include <unistd.h>

#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

namespace peapod::sandboxer {

namespace {

template <typename T>
Result<void> Read(const nlohmann::json& j, const char* key, T* out, const std::string& path) {
  if (!j.contains(key)) return Ok();
  try {
    *out = j.at(key).get<T>();
  } catch (const std::exception&) {
    return Error::Invalid("{}: \"{}\" has the wrong type ({})", path, key, j.at(key).type_name());
  }
  return Ok();
}

}  // namespace

Result<Config> Config::Load(const std::string& path, bool required) {
  Config c;
  std::ifstream f(path);
  if (f) {
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(f);
    } catch (const std::exception& e) {
      return Error::Invalid("{}: not valid JSON: {}", path, e.what());
    }
    if (!j.is_object()) return Error::Invalid("{}: expected a JSON object", path);
    static const char* kKeys[] = {"listen",
                                  "state_dir",
                                  "run_dir",
                                  "libvirt_uri",
                                  "libvirt_root",
                                  "image_dir",
                                  "kernel",
                                  "initrd",
                                  "cmdline",
                                  "vcpus",
                                  "memory_mib",
                                  "accel",
                                  "boot_timeout_seconds",
                                  "log_level"};
    for (const auto& [key, value] : j.items()) {
      if (std::find(std::begin(kKeys), std::end(kKeys), key) == std::end(kKeys)) {
        return Error::Invalid("{}: unknown key \"{}\"", path, key);
      }
    }
    PP_TRY(Read(j, "listen", &c.listen, path));
    PP_TRY(Read(j, "state_dir", &c.state_dir, path));
    PP_TRY(Read(j, "run_dir", &c.run_dir, path));
    PP_TRY(Read(j, "libvirt_uri", &c.libvirt_uri, path));
    PP_TRY(Read(j, "libvirt_root", &c.libvirt_root, path));
    PP_TRY(Read(j, "image_dir", &c.image_dir, path));
    PP_TRY(Read(j, "kernel", &c.kernel, path));
    PP_TRY(Read(j, "initrd", &c.initrd, path));
    PP_TRY(Read(j, "cmdline", &c.cmdline, path));
    PP_TRY(Read(j, "vcpus", &c.vcpus, path));
    PP_TRY(Read(j, "memory_mib", &c.memory_mib, path));
    PP_TRY(Read(j, "accel", &c.accel, path));
    PP_TRY(Read(j, "boot_timeout_seconds", &c.boot_timeout_seconds, path));
    PP_TRY(Read(j, "log_level", &c.log_level, path));
  } else if (required) {
    return Error::Errno("read config " + path);
  }
  if (c.accel != "auto" && c.accel != "kvm" && c.accel != "tcg") {
    return Error::Invalid("{}: accel must be auto, kvm or tcg, not \"{}\"", path, c.accel);
  }
  if (c.vcpus == 0 || c.memory_mib < 128) {
    return Error::Invalid("{}: need vcpus >= 1 and memory_mib >= 128", path);
  }
  if (c.libvirt_root.empty()) c.libvirt_root = c.state_dir + "/libvirt";
  if (c.kernel.empty()) c.kernel = c.image_dir + "/vmlinux";
  if (c.initrd.empty()) c.initrd = c.image_dir + "/initrd.img";
  if (c.cmdline.empty()) {
    std::ifstream cf(c.image_dir + "/cmdline");
    std::getline(cf, c.cmdline);
    if (c.cmdline.empty()) c.cmdline = "console=ttyS0 panic=-1 quiet";
  }
  return c;
}

}  // namespace peapod::sandboxer
