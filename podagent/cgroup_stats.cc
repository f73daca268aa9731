#include "podagent/cgroup_stats.h"

#include <unistd.h>

#include <fstream>
#include <limits>
#include <map>
#include <sstream>

namespace peapod::agent {

namespace v2 = io::containerd::cgroups::v2;
using google::protobuf::Message;

namespace {

// A single-value file: a number, or "max" (no limit, reported as the largest value).
std::optional<uint64_t> ReadValue(const std::string& path) {
  std::ifstream f(path);
  std::string word;
  if (!(f >> word)) return std::nullopt;
  if (word == "max") return std::numeric_limits<uint64_t>::max();
  try {
    return std::stoull(word);
  } catch (const std::exception&) {
    return std::nullopt;
  }
}

// A flat keyed file ("key value" per line): each key sets the uint64 field of the same name,
// which is how containerd's Metrics names them (memory.stat's anon -> MemoryStat.anon...).
// Keys without a field are skipped.
bool ReadKeyed(const std::string& path, Message* msg,
               const std::map<std::string, std::string>& renames = {}) {
  std::ifstream f(path);
  if (!f) return false;
  const auto* desc = msg->GetDescriptor();
  const auto* refl = msg->GetReflection();
  std::string key;
  uint64_t value;
  while (f >> key >> value) {
    if (auto it = renames.find(key); it != renames.end()) key = it->second;
    const auto* field = desc->FindFieldByName(key);
    if (field && field->cpp_type() == google::protobuf::FieldDescriptor::CPPTYPE_UINT64 &&
        !field->is_repeated()) {
      refl->SetUInt64(msg, field, value);
    }
  }
  return true;
}

void SetField(Message* msg, const char* name, std::optional<uint64_t> value) {
  if (!value) return;
  const auto* field = msg->GetDescriptor()->FindFieldByName(name);
  if (field && field->cpp_type() == google::protobuf::FieldDescriptor::CPPTYPE_UINT64) {
    msg->GetReflection()->SetUInt64(msg, field, *value);
  }
}

}  // namespace

Result<void> ReadCgroupMetrics(const std::string& dir, v2::Metrics* m) {
  if (::access(dir.c_str(), F_OK) < 0) return Error::Errno("cgroup " + dir);
  if (auto cur = ReadValue(dir + "/pids.current")) {
    m->mutable_pids()->set_current(*cur);
    if (auto max = ReadValue(dir + "/pids.max"); max && *max != UINT64_MAX) {
      m->mutable_pids()->set_limit(*max);
    }
  }
  v2::CPUStat cpu;
  if (ReadKeyed(dir + "/cpu.stat", &cpu)) *m->mutable_cpu() = cpu;
  v2::MemoryStat mem;
  if (ReadKeyed(dir + "/memory.stat", &mem)) {
    SetField(&mem, "usage", ReadValue(dir + "/memory.current"));
    SetField(&mem, "usage_limit", ReadValue(dir + "/memory.max"));
    SetField(&mem, "max_usage", ReadValue(dir + "/memory.peak"));
    SetField(&mem, "swap_usage", ReadValue(dir + "/memory.swap.current"));
    SetField(&mem, "swap_limit", ReadValue(dir + "/memory.swap.max"));
    *m->mutable_memory() = mem;
  }
  v2::MemoryEvents events;
  if (ReadKeyed(dir + "/memory.events", &events)) *m->mutable_memory_events() = events;
  return Ok();
}

std::optional<uint64_t> ReadOOMKills(const std::string& memory_events) {
  std::ifstream f(memory_events);
  std::string key;
  uint64_t value;
  while (f >> key >> value) {
    if (key == "oom_kill") return value;
  }
  return std::nullopt;
}

}  // namespace peapod::agent
