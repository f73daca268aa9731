#include "sandboxer/config.h"

#include <fcntl.h>
#include <unistd.h>

#include <fstream>
#include <set>
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

// Every key of the file, with the field it sets.
template <typename F>
void ForEachKey(Config& c, F f) {
  f("listen", &c.listen);
  f("shim_listen", &c.shim_listen);
  f("state_dir", &c.state_dir);
  f("run_dir", &c.run_dir);
  f("libvirt_uri", &c.libvirt_uri);
  f("libvirt_root", &c.libvirt_root);
  f("image_dir", &c.image_dir);
  f("kernel", &c.kernel);
  f("initrd", &c.initrd);
  f("cmdline", &c.cmdline);
  f("vcpus", &c.vcpus);
  f("memory_mib", &c.memory_mib);
  f("max_vcpus", &c.max_vcpus);
  f("memory_overhead_mib", &c.memory_overhead_mib);
  f("scratch_size_mib", &c.scratch_size_mib);
  f("layer_cache_keep_seconds", &c.layer_cache_keep_seconds);
  f("cri_root", &c.cri_root);
  f("pool_size", &c.pool_size);
  f("start_from", &c.start_from);
  f("ksm", &c.ksm);
  f("tcg_tb_cache_mib", &c.tcg_tb_cache_mib);
  f("guest_huge_pages", &c.guest_huge_pages);
  f("mkfs_erofs", &c.mkfs_erofs);
  f("mkfs_ext4", &c.mkfs_ext4);
  f("vm_uid_base", &c.vm_uid_base);
  f("vm_uid_count", &c.vm_uid_count);
  f("vm_gid", &c.vm_gid);
  f("share_server", &c.share_server);
  f("accel", &c.accel);
  f("boot_timeout_seconds", &c.boot_timeout_seconds);
  f("log_level", &c.log_level);
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
    std::set<std::string> known;
    Result<void> bad = Ok();
    ForEachKey(c, [&](const char* key, auto* field) {
      known.insert(key);
      if (bad.ok()) bad = Read(j, key, field, path);
    });
    for (const auto& [key, value] : j.items()) {
      if (!known.count(key)) return Error::Invalid("{}: unknown key \"{}\"", path, key);
    }
    PP_TRY(bad);
  } else if (required) {
    return Error::Errno("read config " + path);
  }
  if (c.accel != "auto" && c.accel != "kvm" && c.accel != "tcg") {
    return Error::Invalid("{}: accel must be auto, kvm or tcg, not \"{}\"", path, c.accel);
  }
  if (c.guest_huge_pages != "auto" && c.guest_huge_pages != "on" && c.guest_huge_pages != "off") {
    return Error::Invalid("{}: guest_huge_pages must be auto, on or off, not \"{}\"", path,
                          c.guest_huge_pages);
  }
  if (c.start_from != "template" && c.start_from != "boot") {
    return Error::Invalid("{}: start_from must be template or boot, not \"{}\"", path,
                          c.start_from);
  }
  if (c.vcpus == 0 || c.memory_mib < 128 || c.max_vcpus < c.vcpus) {
    return Error::Invalid("{}: need vcpus >= 1, max_vcpus >= vcpus and memory_mib >= 128", path);
  }
  if (c.scratch_size_mib < 64) return Error::Invalid("{}: need scratch_size_mib >= 64", path);
  // Unix socket paths hold 107 bytes: <run_dir>/pods/<64-character CRI id>/vm-agent.sock.
  constexpr size_t kMaxRunDir = 107 - (6 + 64 + 14);
  if (c.run_dir.size() > kMaxRunDir) {
    return Error::Invalid(
        "{}: run_dir \"{}\" is too long ({} characters, at most {}): pod sockets under it would "
        "not fit a unix socket path for 64-character pod ids",
        path, c.run_dir, c.run_dir.size(), kMaxRunDir);
  }
  if (c.vm_uid_base != 0) {
    if (c.vm_uid_count == 0 || uint64_t{c.vm_uid_base} + c.vm_uid_count > 0xfffffffeULL) {
      return Error::Invalid("{}: vm_uid_base + vm_uid_count must stay below 4294967295", path);
    }
    if (c.vm_gid == 0) c.vm_gid = c.vm_uid_base;
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
