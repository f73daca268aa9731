#include "sandboxer/pod_cgroup.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <set>
#include <sstream>

#include <spdlog/spdlog.h>

#include "common/base/mountinfo.h"

namespace peapod::sandboxer {

namespace {

std::vector<std::string> Split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::istringstream in(s);
  for (std::string part; std::getline(in, part, sep);) out.push_back(part);
  return out;
}

// "a-b-c.slice" -> "a.slice/a-b.slice/a-b-c.slice", as systemd nests slices.
Result<std::string> ExpandSlice(const std::string& slice) {
  std::string stem = slice.substr(0, slice.size() - 6);
  if (stem == "-") return std::string();
  if (stem.empty() || stem.front() == '-' || stem.back() == '-' ||
      stem.find("--") != std::string::npos) {
    return Error::Invalid("cgroup parent {} is not a valid systemd slice name", slice);
  }
  std::string path, prefix;
  for (const auto& part : Split(stem, '-')) {
    prefix += prefix.empty() ? part : "-" + part;
    path += (path.empty() ? "" : "/") + prefix + ".slice";
  }
  return path;
}

bool IsAccounting(const MountPoint& m) {
  if (m.fstype == "cgroup2") return true;
  if (m.fstype != "cgroup") return false;
  bool counts = false;
  for (const auto& o : Split(m.super_options, ',')) {
    // A cpuset child cannot take a process before its cpus and mems are set: left alone.
    if (o == "cpuset" || o.rfind("name=", 0) == 0) return false;
    counts = counts || o == "cpu" || o == "cpuacct" || o == "memory" || o == "pids" || o == "blkio";
  }
  return counts;
}

Result<void> WriteFile(const std::string& path, const std::string& text) {
  std::ofstream f(path);
  f << text;
  f.flush();
  if (!f) return Error::Errno("write " + path);
  return Ok();
}

}  // namespace

Result<std::string> PodCgroupLeaf(const std::string& cgroup_parent, const std::string& pod_id) {
  if (cgroup_parent.empty()) return std::string();
  std::string rel;
  if (cgroup_parent.find('/') == std::string::npos && cgroup_parent.size() > 6 &&
      cgroup_parent.ends_with(".slice")) {
    PP_ASSIGN_OR_RETURN(rel, ExpandSlice(cgroup_parent));
  } else {
    if (cgroup_parent.find('\0') != std::string::npos) {
      return Error::Invalid("cgroup parent contains a NUL byte");
    }
    std::string p = cgroup_parent;
    while (!p.empty() && p.front() == '/') p.erase(0, 1);
    while (!p.empty() && p.back() == '/') p.pop_back();
    for (const auto& part : Split(p, '/')) {
      if (part.empty() || part == "." || part == "..") {
        return Error::Invalid(
            "cgroup parent {} is not a plain path below the cgroup root (empty, '.' or '..' "
            "components)",
            cgroup_parent);
      }
    }
    rel = p;
  }
  return (rel.empty() ? "" : rel + "/") + "peapod-" + pod_id;
}

std::vector<std::string> AccountingHierarchies(const std::string& mountinfo) {
  std::vector<std::string> out;
  std::set<std::string> seen;  // one mount per hierarchy
  for (const auto& m : ReadMountTable(mountinfo)) {
    if (!IsAccounting(m)) continue;
    if (!seen.insert(m.fstype + ":" + m.super_options).second) continue;
    out.push_back(m.path);
  }
  return out;
}

Result<PodCgroup> PlaceInPodCgroup(const std::string& leaf, int pid,
                                   const std::vector<std::string>& hierarchies) {
  PodCgroup cg{leaf, ""};
  if (leaf.empty() || pid <= 0) return cg;
  auto parts = Split(leaf, '/');
  // Make the directories everywhere first; a failure takes back what was made.
  std::vector<std::string> made_dirs;
  for (const auto& root : hierarchies) {
    std::string rel;
    for (const auto& part : parts) {
      rel += (rel.empty() ? "" : "/") + part;
      std::string dir = root + "/" + rel;
      if (::mkdir(dir.c_str(), 0755) == 0) {
        made_dirs.push_back(dir);
        if (cg.made.empty() || rel.size() < cg.made.size()) cg.made = rel;
      } else if (errno != EEXIST) {
        auto err = Error::Errno("make the pod's cgroup " + dir);
        for (auto it = made_dirs.rbegin(); it != made_dirs.rend(); ++it) ::rmdir(it->c_str());
        return err;
      }
    }
  }
  for (const auto& root : hierarchies) {
    std::string dir = root + "/" + leaf;
    if (::access((root + "/cgroup.subtree_control").c_str(), F_OK) == 0) {
      // v2: what the leaf accounts must be enabled in every directory above it (kubelet's own
      // are; the ones made here are not). Controllers the root lacks are skipped.
      std::string at = root;  // the root, then each directory above the leaf
      for (size_t i = 0; i < parts.size(); ++i) {
        for (const char* c : {"+cpu", "+memory", "+pids", "+io"}) {
          (void)WriteFile(at + "/cgroup.subtree_control", c);
        }
        at += "/" + parts[i];
      }
    }
    if (::access((dir + "/memory.move_charge_at_immigrate").c_str(), F_OK) == 0) {
      (void)WriteFile(dir + "/memory.move_charge_at_immigrate", "3");
    }
    if (auto w = WriteFile(dir + "/cgroup.procs", std::to_string(pid)); !w.ok()) {
      // The VM runs on, counted where it was: stats for this pod are missing, nothing else.
      spdlog::warn("pod cgroup: moving QEMU (pid {}) into {}: {}", pid, dir, w.error().ToString());
    }
  }
  return cg;
}

Result<void> RemovePodCgroup(const PodCgroup& cg, const std::vector<std::string>& hierarchies) {
  if (cg.leaf.empty()) return Ok();
  std::string stays;
  for (const auto& root : hierarchies) {
    std::string rel = cg.leaf;
    if (::rmdir((root + "/" + rel).c_str()) != 0 && errno != ENOENT) {
      stays += (stays.empty() ? "" : ", ") + root + "/" + rel + " (" + std::strerror(errno) + ")";
      continue;
    }
    // Up to what the sandboxer made, while empty.
    while (!cg.made.empty() && rel.size() > cg.made.size()) {
      rel = rel.substr(0, rel.rfind('/'));
      if (rel.size() < cg.made.size()) break;
      if (::rmdir((root + "/" + rel).c_str()) != 0 && errno != ENOENT) break;
    }
  }
  if (!stays.empty()) return Error::Make(Code::kFailedPrecondition, "pod cgroup stays: {}", stays);
  return Ok();
}

}  // namespace peapod::sandboxer
