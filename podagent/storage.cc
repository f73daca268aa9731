#include "podagent/storage.h"

#include <dirent.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <thread>
#include <unordered_map>

#include <spdlog/spdlog.h>

#include "podagent/pid1.h"

namespace peapod::agent {

namespace v1 = peapod::agent::v1;
namespace fs = std::filesystem;
using namespace std::chrono_literals;

Result<void> MakeDirs(const std::string& path) {
  std::error_code ec;
  fs::create_directories(path, ec);
  if (ec) return Error::Errno(fmt::format("mkdir -p {}", path), ec.value());
  return Ok();
}

void Unmount(const std::string& target) {
  if (::umount2(target.c_str(), MNT_DETACH) < 0 && errno != EINVAL && errno != ENOENT) {
    spdlog::warn("agent: umount {}: {}", target, std::strerror(errno));
  }
}

Result<std::string> FindScsiDisk(const std::string& address, std::chrono::milliseconds timeout) {
  auto colon = address.find(':');
  if (colon == std::string::npos || address.find_first_not_of("0123456789:") != std::string::npos ||
      address.find(':', colon + 1) != std::string::npos) {
    return Error::Invalid("SCSI address '{}': expected TARGET:LUN, e.g. 0:1", address);
  }
  // Every virtio-scsi host has channel 0; there is one controller per pod, so the host number
  // does not matter: match "H:0:TARGET:LUN".
  const std::string suffix = ":0:" + address;
  auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    std::error_code ec;
    for (const auto& dev : fs::directory_iterator("/sys/bus/scsi/devices", ec)) {
      std::string name = dev.path().filename();
      if (name.size() <= suffix.size() ||
          name.compare(name.size() - suffix.size(), suffix.size(), suffix) != 0) {
        continue;
      }
      std::error_code ec2;
      for (const auto& blk : fs::directory_iterator(dev.path() / "block", ec2)) {
        // The node appears before the disk has read its capacity (under TCG, visibly so): a
        // disk of size 0 is not ready to mount yet.
        std::string disk = blk.path().filename().string();
        std::string node = "/dev/" + disk;
        std::ifstream size_file("/sys/block/" + disk + "/size");
        unsigned long long sectors = 0;
        if ((size_file >> sectors) && sectors > 0 && ::access(node.c_str(), F_OK) == 0) {
          return node;
        }
      }
    }
    if (std::chrono::steady_clock::now() >= deadline) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  return Error::NotFound(
      "no disk at SCSI address {} after {} ms (is it attached to the pod's "
      "virtio-scsi controller?)",
      address, timeout.count());
}

MountOptions ParseMountOptions(const std::vector<std::string>& options) {
  static const std::unordered_map<std::string, std::pair<unsigned long, bool>> kFlags = {
      {"ro", {MS_RDONLY, true}},           {"rw", {MS_RDONLY, false}},
      {"nosuid", {MS_NOSUID, true}},       {"suid", {MS_NOSUID, false}},
      {"nodev", {MS_NODEV, true}},         {"dev", {MS_NODEV, false}},
      {"noexec", {MS_NOEXEC, true}},       {"exec", {MS_NOEXEC, false}},
      {"noatime", {MS_NOATIME, true}},     {"relatime", {MS_RELATIME, true}},
      {"sync", {MS_SYNCHRONOUS, true}},    {"bind", {MS_BIND, true}},
      {"rbind", {MS_BIND | MS_REC, true}},
  };
  MountOptions out;
  for (const auto& o : options) {
    if (auto it = kFlags.find(o); it != kFlags.end()) {
      if (it->second.second) {
        out.flags |= it->second.first;
      } else {
        out.flags &= ~it->second.first;
      }
      continue;
    }
    if (o == "defaults") continue;
    if (!out.data.empty()) out.data += ',';
    out.data += o;
  }
  return out;
}

namespace {

std::chrono::milliseconds TimeLeft(std::chrono::steady_clock::time_point deadline) {
  return std::max(std::chrono::duration_cast<std::chrono::milliseconds>(
                      deadline - std::chrono::steady_clock::now()),
                  0ms);
}

}  // namespace

Result<void> StorageManager::LoadFilesystemModules(const std::string& fstype) {
  // The guest image keeps modules that only some pods need (ext4 for the scratch disk) out of
  // the boot-time list: /etc/peapod/modules.<fstype> lists them, dependencies first.
  if (loaded_fs_.count(fstype)) return Ok();
  PP_ASSIGN_OR_RETURN(auto n, LoadModulesFor(fstype));
  if (n) spdlog::info("agent: loaded {} module(s) for {}", *n, fstype);
  loaded_fs_.insert(fstype);
  return Ok();
}

Result<void> StorageManager::Acquire(const v1::Storage& s) {
  const std::string& target = s.mount_point();
  if (target.empty() || target[0] != '/') {
    return Error::Invalid("storage {}: mount_point must be an absolute guest path", s.source());
  }
  if (auto it = refs_.find(target); it != refs_.end()) {
    ++it->second;
    return Ok();
  }
  auto opts = ParseMountOptions({s.options().begin(), s.options().end()});
  // How long a hot-added SCSI disk may take to show up and then to open.
  const auto scsi_deadline = std::chrono::steady_clock::now() + 5s;
  std::string source = s.source();
  std::string fstype = s.fstype();
  switch (s.driver()) {
    case v1::Storage::SCSI: {
      if (fstype.empty()) return Error::Invalid("storage {}: fstype is required", s.source());
      PP_TRY(LoadFilesystemModules(fstype));
      PP_ASSIGN_OR_RETURN(source, FindScsiDisk(s.source(), TimeLeft(scsi_deadline)));
      break;
    }
    case v1::Storage::VIRTIO_9P:
      fstype = "9p";
      if (opts.data.find("trans=") == std::string::npos) {
        opts.data += std::string(opts.data.empty() ? "" : ",") + "trans=virtio,version=9p2000.L";
      }
      break;
    case v1::Storage::TMPFS:
      source = "tmpfs";
      fstype = "tmpfs";
      break;
    case v1::Storage::BIND:
      opts.flags |= MS_BIND;
      fstype.clear();
      break;
    default:
      return Error::Invalid("storage {}: unknown driver {}", s.source(),
                            static_cast<int>(s.driver()));
  }
  PP_TRY(MakeDirs(target));
  unsigned long flags = opts.flags;
  // A read-only bind needs a remount to take effect.
  bool bind_ro = (flags & MS_BIND) && (flags & MS_RDONLY);
  while (::mount(source.c_str(), target.c_str(), fstype.empty() ? nullptr : fstype.c_str(),
                 bind_ro ? flags & ~MS_RDONLY : flags,
                 opts.data.empty() ? nullptr : opts.data.c_str()) < 0) {
    // A disk hot-added moments ago can still refuse to open (ENXIO) while the SCSI layer
    // finishes probing it, or go by another node name once it has: find it again and retry.
    if (s.driver() == v1::Storage::SCSI && (errno == ENXIO || errno == ENOENT) &&
        std::chrono::steady_clock::now() < scsi_deadline) {
      std::this_thread::sleep_for(20ms);
      PP_ASSIGN_OR_RETURN(source, FindScsiDisk(s.source(), TimeLeft(scsi_deadline)));
      continue;
    }
    return Error::Errno(fmt::format("mount {} ({}) on {} with '{}'", source,
                                    fstype.empty() ? "bind" : fstype, target, opts.data));
  }
  if (bind_ro &&
      ::mount(nullptr, target.c_str(), nullptr, MS_BIND | MS_REMOUNT | MS_RDONLY, nullptr) < 0) {
    int err = errno;
    Unmount(target);
    return Error::Errno(fmt::format("remount {} read-only", target), err);
  }
  refs_[target] = 1;
  return Ok();
}

void StorageManager::Release(const std::string& mount_point) {
  auto it = refs_.find(mount_point);
  if (it == refs_.end()) return;
  if (--it->second > 0) return;
  refs_.erase(it);
  Unmount(mount_point);
}

void StorageManager::ReleaseAll() {
  for (auto it = refs_.rbegin(); it != refs_.rend(); ++it) Unmount(it->first);
  refs_.clear();
}

Result<void> MountOverlay(const std::vector<std::string>& lower_dirs, const std::string& upper_dir,
                          const std::string& work_dir, const std::string& target) {
  if (lower_dirs.empty()) return Error::Invalid("overlay rootfs: no layers");
  PP_TRY(MakeDirs(upper_dir));
  PP_TRY(MakeDirs(work_dir));
  PP_TRY(MakeDirs(target));
  std::string lower;
  for (const auto& l : lower_dirs) {
    if (l.find_first_of(":,") != std::string::npos) {
      return Error::Invalid("overlay rootfs: layer path '{}' contains ':' or ','", l);
    }
    lower += (lower.empty() ? "" : ":") + l;
  }
  std::string data = fmt::format("lowerdir={},upperdir={},workdir={}", lower, upper_dir, work_dir);
  if (::mount("overlay", target.c_str(), "overlay", 0, data.c_str()) < 0) {
    return Error::Errno(fmt::format("mount overlay on {} ({})", target, data));
  }
  return Ok();
}

}  // namespace peapod::agent
