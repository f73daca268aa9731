#include "sandboxer/state.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

#include "common/base/unique_fd.h"

namespace peapod::sandboxer {

namespace fs = std::filesystem;

std::string PhaseName(PodRecord::Phase p) {
  switch (p) {
    case PodRecord::Phase::kCreated:
      return "created";
    case PodRecord::Phase::kStarting:
      return "starting";
    case PodRecord::Phase::kRunning:
      return "running";
    case PodRecord::Phase::kStopped:
      return "stopped";
  }
  return "unknown";
}

namespace {

Result<PodRecord::Phase> ParsePhase(const std::string& s) {
  for (auto p : {PodRecord::Phase::kCreated, PodRecord::Phase::kStarting,
                 PodRecord::Phase::kRunning, PodRecord::Phase::kStopped}) {
    if (PhaseName(p) == s) return p;
  }
  return Error::Invalid("unknown pod phase \"{}\"", s);
}

}  // namespace

Result<void> WriteFileAtomic(const std::string& path, const std::string& data) {
  std::string tmp = path + ".tmp";
  {
    UniqueFd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
    if (!fd) return Error::Errno("create " + tmp);
    PP_TRY(WriteAll(fd.get(), data.data(), data.size()));
    if (::fsync(fd.get()) < 0) return Error::Errno("fsync " + tmp);
  }
  if (::rename(tmp.c_str(), path.c_str()) < 0) return Error::Errno("rename " + tmp);
  UniqueFd dir(::open(fs::path(path).parent_path().c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (dir) ::fsync(dir.get());
  return Ok();
}

Result<void> StateStore::Init() {
  std::error_code ec;
  fs::create_directories(dir_ + "/pods", ec);
  if (ec) return Error::Errno("mkdir " + dir_ + "/pods", ec.value());
  // Root's alone: records, disks and console logs of every pod (docs/security.md).
  for (const auto& d : {dir_, dir_ + "/pods"}) {
    if (::chmod(d.c_str(), 0700) < 0) return Error::Errno("chmod " + d);
  }
  return Ok();
}

Result<void> StateStore::Save(const PodRecord& r) {
  nlohmann::json j = {{"id", r.id},
                      {"netns", r.netns},
                      {"domain", r.domain},
                      {"phase", PhaseName(r.phase)},
                      {"created_at_ns", r.created_at_ns},
                      {"exited_at_ns", r.exited_at_ns},
                      {"exit_status", r.exit_status},
                      {"pid", r.pid},
                      {"hostname", r.hostname},
                      {"memory_limit_bytes", r.memory_limit_bytes},
                      {"cpus", r.cpus},
                      {"vcpus", r.vcpus},
                      {"memory_mib", r.memory_mib},
                      {"scratch", r.scratch},
                      {"dns_servers", r.dns_servers},
                      {"dns_searches", r.dns_searches},
                      {"dns_options", r.dns_options},
                      {"sysctls", r.sysctls},
                      {"cri_files", r.cri_files},
                      {"cgroup_parent", r.cgroup_parent},
                      {"cgroup_leaf", r.cgroup_leaf},
                      {"cgroup_made", r.cgroup_made},
                      {"tap", r.tap},
                      {"volumes", r.volumes},
                      {"rootfs", r.rootfs}};
  j["disks"] = nlohmann::json::array();
  for (const auto& d : r.disks) {
    j["disks"].push_back(
        {{"unit", d.unit}, {"path", d.path}, {"readonly", d.readonly}, {"cached", d.cached}});
  }
  std::error_code ec;
  fs::create_directories(PodDir(r.id), ec);
  if (ec) return Error::Errno("mkdir " + PodDir(r.id), ec.value());
  return WriteFileAtomic(PodDir(r.id) + "/pod.json", j.dump(2) + "\n");
}

Result<void> StateStore::Remove(const std::string& id) {
  std::error_code ec;
  fs::remove_all(PodDir(id), ec);
  if (ec) return Error::Errno("remove " + PodDir(id), ec.value());
  return Ok();
}

Result<std::vector<PodRecord>> StateStore::LoadAll() {
  std::vector<PodRecord> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir_ + "/pods", ec)) {
    std::string file = e.path().string() + "/pod.json";
    std::ifstream f(file);
    if (!f) continue;
    try {
      auto j = nlohmann::json::parse(f);
      PodRecord r;
      r.id = j.at("id").get<std::string>();
      r.netns = j.value("netns", "");
      r.domain = j.at("domain").get<std::string>();
      auto phase = ParsePhase(j.at("phase").get<std::string>());
      if (!phase.ok()) throw std::runtime_error(phase.error().message());
      r.phase = *phase;
      r.created_at_ns = j.value("created_at_ns", int64_t{0});
      r.exited_at_ns = j.value("exited_at_ns", int64_t{0});
      r.exit_status = j.value("exit_status", 0u);
      r.pid = j.value("pid", 0);
      r.hostname = j.value("hostname", "");
      r.memory_limit_bytes = j.value("memory_limit_bytes", int64_t{0});
      r.cpus = j.value("cpus", 0.0);
      r.vcpus = j.value("vcpus", 0u);
      r.memory_mib = j.value("memory_mib", uint64_t{0});
      r.scratch = j.value("scratch", false);
      r.dns_servers = j.value("dns_servers", std::vector<std::string>{});
      r.dns_searches = j.value("dns_searches", std::vector<std::string>{});
      r.dns_options = j.value("dns_options", std::vector<std::string>{});
      r.sysctls = j.value("sysctls", std::map<std::string, std::string>{});
      r.cri_files = j.value("cri_files", false);
      r.cgroup_parent = j.value("cgroup_parent", std::string());
      r.cgroup_leaf = j.value("cgroup_leaf", std::string());
      r.cgroup_made = j.value("cgroup_made", std::string());
      r.tap = j.value("tap", std::string());
      if (j.contains("volumes")) {
        r.volumes = j.at("volumes").get<std::map<std::string, std::vector<std::string>>>();
      }
      if (j.contains("rootfs")) {
        r.rootfs = j.at("rootfs").get<std::map<std::string, std::vector<unsigned>>>();
      }
      for (const auto& d : j.value("disks", nlohmann::json::array())) {
        DiskRecord disk;
        disk.unit = d.at("unit").get<unsigned>();
        disk.path = d.at("path").get<std::string>();
        disk.readonly = d.value("readonly", true);
        disk.cached = d.value("cached", false);
        r.disks.push_back(std::move(disk));
      }
      out.push_back(std::move(r));
    } catch (const std::exception& ex) {
      spdlog::error("state: skipping unreadable record {}: {}", file, ex.what());
    }
  }
  if (ec) return Error::Errno("list " + dir_ + "/pods", ec.value());
  return out;
}

}  // namespace peapod::sandboxer
