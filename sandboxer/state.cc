#include "sandboxer/state.h"

#include <fcntl.h>
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
                      {"pid", r.pid}};
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
      out.push_back(std::move(r));
    } catch (const std::exception& ex) {
      spdlog::error("state: skipping unreadable record {}: {}", file, ex.what());
    }
  }
  if (ec) return Error::Errno("list " + dir_ + "/pods", ec.value());
  return out;
}

}  // namespace peapod::sandboxer
