#include "sandboxer/vm_identity.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include <spdlog/spdlog.h>

#include "common/base/unique_fd.h"
#include "sandboxer/share_server.h"
#include "sandboxer/state.h"
#include "sandboxer/storage.h"

namespace peapod::sandboxer {

namespace fs = std::filesystem;

namespace {

// A directory of root's that the VM group may pass through and nobody else may.
Result<void> GroupDir(const std::string& path, uint32_t gid, bool create) {
  if (create && ::mkdir(path.c_str(), 0710) < 0 && errno != EEXIST) {
    return Error::Errno("mkdir " + path);
  }
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
  if (!fd) return Error::Errno("open " + path);
  if (::fchown(fd.get(), 0, gid) < 0) return Error::Errno("chown " + path);
  if (::fchmod(fd.get(), 0710) < 0) return Error::Errno("chmod " + path);
  return Ok();
}

// Whether a process of some other uid, in group gid, can pass through every parent of path.
Result<void> CheckReachable(const std::string& path, uint32_t gid) {
  fs::path p = fs::path(path).parent_path();
  for (; !p.empty(); p = p.parent_path()) {
    struct stat st;
    if (::stat(p.c_str(), &st) < 0) return Error::Errno("stat " + p.string());
    bool ok = (st.st_mode & S_IXOTH) || ((st.st_mode & S_IXGRP) && st.st_gid == gid);
    if (!ok) {
      return Error::Make(Code::kFailedPrecondition,
                         "{} (mode {:o}) cannot be passed through by the pod VMs' QEMU (uids of "
                         "their own, group {}): they could not open their disks under {}; make "
                         "it searchable (chmod o+x, or group {} with g+x), or set vm_uid_base 0 "
                         "to run QEMU as root",
                         p.string(), st.st_mode & 07777, gid, path, gid);
    }
    if (p == p.root_path()) break;
  }
  return Ok();
}

// The uids (real, effective, saved or filesystem) of every process now running in [lo, hi].
std::set<uint32_t> UidsOfLiveProcesses(uint64_t lo, uint64_t hi) {
  std::set<uint32_t> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator("/proc", ec)) {
    std::string name = e.path().filename().string();
    if (name.empty() || name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::ifstream f(e.path() / "status");
    for (std::string line; std::getline(f, line);) {
      if (line.rfind("Uid:", 0) != 0) continue;
      std::istringstream ids(line.substr(4));
      for (uint64_t id; ids >> id;) {
        if (id >= lo && id <= hi) out.insert(static_cast<uint32_t>(id));
      }
      break;
    }
  }
  return out;
}

}  // namespace

VmIdentities::VmIdentities(std::string state_dir, std::string run_dir, uint32_t uid_base,
                           uint32_t uid_count, uint32_t gid)
    : state_vm_(state_dir + "/vm"),
      run_vm_(run_dir + "/vm"),
      state_dir_(std::move(state_dir)),
      run_dir_(std::move(run_dir)),
      uid_base_(uid_base),
      uid_count_(uid_count),
      gid_(gid) {}

Result<void> VmIdentities::Init(const std::set<std::string>& group_dirs,
                                const std::set<std::string>& readable) {
  if (!enabled()) return Ok();
  for (const auto& f : readable) {
    struct stat st;
    if (::stat(f.c_str(), &st) < 0) continue;  // a missing image is Start's error to report
    PP_TRY(CheckReachable(f, gid_));
    if (!(st.st_mode & S_IROTH) && !((st.st_mode & S_IRGRP) && st.st_gid == gid_)) {
      return Error::Make(Code::kFailedPrecondition,
                         "{} (mode {:o}) cannot be read by the pod VMs' QEMU (uids of their own, "
                         "group {}): make it readable (chmod o+r), or set vm_uid_base 0",
                         f, st.st_mode & 07777, gid_);
    }
  }
  for (const auto& d : {state_dir_, run_dir_}) {
    PP_TRY(CheckReachable(d, gid_));
    PP_TRY(GroupDir(d, gid_, /*create=*/false));
  }
  PP_TRY(GroupDir(state_vm_, gid_, /*create=*/true));
  PP_TRY(GroupDir(run_vm_, gid_, /*create=*/true));
  for (const auto& d : group_dirs) PP_TRY(GroupDir(d, gid_, /*create=*/false));
  return Ok();
}

std::string VmIdentities::StateDir(const std::string& domain) const {
  return state_vm_ + "/" + domain;
}
std::string VmIdentities::RunDir(const std::string& domain) const { return run_vm_ + "/" + domain; }

uint32_t VmIdentities::UidOf(const std::string& domain) const {
  std::ifstream f(StateDir(domain) + "/uid");
  uint64_t uid = 0;
  if (!(f >> uid) || uid <= uid_base_ || uid > uint64_t{uid_base_} + uid_count_) return 0;
  return static_cast<uint32_t>(uid);
}

Result<uint32_t> VmIdentities::Acquire(const std::string& domain) {
  if (!enabled()) return Error::Internal("QEMU runs as root: there is no VM uid to acquire");
  if (domain.empty() || domain.find('/') != std::string::npos || domain[0] == '.') {
    return Error::Invalid("bad VM name '{}'", domain);
  }
  std::lock_guard<std::mutex> l(mu_);
  PP_TRY(RemoveTreeSafely(StateDir(domain)));
  PP_TRY(RemoveTreeSafely(RunDir(domain)));
  // Taken: recorded for a VM's files, or held by a live process (a QEMU whose files were
  // already removed — say a failed Start's VM that a worker has yet to destroy — must never
  // share a uid with a new VM).
  std::set<uint32_t> used =
      UidsOfLiveProcesses(uint64_t{uid_base_} + 1, uint64_t{uid_base_} + uid_count_);
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(state_vm_, ec)) {
    if (uint32_t u = UidOf(e.path().filename().string())) used.insert(u);
  }
  if (ec) return Error::Errno("list " + state_vm_, ec.value());
  uint32_t uid = 0;
  for (uint64_t u = uint64_t{uid_base_} + 1; u <= uint64_t{uid_base_} + uid_count_; ++u) {
    if (!used.count(static_cast<uint32_t>(u))) {
      uid = static_cast<uint32_t>(u);
      break;
    }
  }
  if (uid == 0) {
    return Error::Make(Code::kResourceExhausted,
                       "all {} VM uids from {} are in use (raise vm_uid_count)", uid_count_,
                       uid_base_ + 1);
  }
  // The run dir opens to the group only once the 9p server's socket is QEMU's alone.
  if (::mkdir(RunDir(domain).c_str(), 0700) < 0) return Error::Errno("mkdir " + RunDir(domain));
  auto made = GroupDir(StateDir(domain), gid_, /*create=*/true);
  if (made.ok()) made = WriteFileAtomic(StateDir(domain) + "/uid", std::to_string(uid) + "\n");
  if (!made.ok()) {
    (void)RemoveTreeSafely(StateDir(domain));
    (void)RemoveTreeSafely(RunDir(domain));
    return std::move(made).error();
  }
  spdlog::debug("vm {}: uid {}", domain, uid);
  return uid;
}

Result<void> VmIdentities::GiveFile(const std::string& path, uint32_t uid) const {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC));
  if (!fd) return Error::Errno("open " + path);
  if (::fchown(fd.get(), uid, gid_) < 0) return Error::Errno("chown " + path);
  if (::fchmod(fd.get(), 0600) < 0) return Error::Errno("chmod " + path);
  return Ok();
}

void VmIdentities::Release(const std::string& domain, uint32_t only_uid) {
  if (!enabled() || domain.empty()) return;
  std::lock_guard<std::mutex> l(mu_);
  if (only_uid != 0 && UidOf(domain) != only_uid) return;  // a newer VM of that name has it
  // The record goes last: until then the uid stays taken.
  for (const auto& d : {RunDir(domain), StateDir(domain)}) {
    if (auto r = RemoveTreeSafely(d); !r.ok())
      spdlog::warn("vm {}: {}", domain, r.error().ToString());
  }
}

void VmIdentities::Sweep(const std::set<std::string>& keep) {
  if (!enabled()) return;
  std::set<std::string> names;
  std::error_code ec;
  for (const auto& dir : {state_vm_, run_vm_}) {
    for (const auto& e : fs::directory_iterator(dir, ec))
      names.insert(e.path().filename().string());
  }
  for (const auto& name : names) {
    if (keep.count(name)) continue;
    spdlog::info("recover: removing the files of VM {} (gone)", name);
    // Its share server, if a crash left one waiting for a QEMU that never came.
    KillShareServers(SocketPath(name));
    Release(name);
  }
}

}  // namespace peapod::sandboxer
