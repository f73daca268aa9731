#include "sandboxer/seams.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>

#include "sandboxer/storage.h"

namespace peapod::sandboxer {

namespace fs = std::filesystem;

bool HostNetwork::NetnsExists(const std::string& netns) {
  std::error_code ec;
  return fs::exists(netns, ec);
}

Result<PodNetwork> HostNetwork::PrepareTap(const std::string& pod_id, const std::string& netns) {
  return sandboxer::PrepareTap(pod_id, netns);
}

Result<PodNetwork> HostNetwork::ReadPodNetwork(const std::string& netns) {
  return sandboxer::ReadPodNetwork(netns);
}

Result<void> HostNetwork::CreateTap(const std::string& tap) { return sandboxer::CreateTap(tap); }

Result<void> HostNetwork::AttachTap(const PodNetwork& net) { return sandboxer::AttachTap(net); }

void HostNetwork::RemoveTap(const std::string& tap, const std::string& netns) {
  sandboxer::RemoveTap(tap, netns);
}

HostStorage::HostStorage(std::string state_dir, std::string mkfs_ext4)
    : store_(std::move(state_dir)), mkfs_ext4_(std::move(mkfs_ext4)) {}

Result<void> HostStorage::InitRecords() { return store_.Init(); }

Result<void> HostStorage::SaveRecord(const PodRecord& rec) { return store_.Save(rec); }

Result<void> HostStorage::RemoveRecord(const std::string& id) { return store_.Remove(id); }

Result<std::vector<PodRecord>> HostStorage::LoadRecords() { return store_.LoadAll(); }

std::string HostStorage::RecordDir(const std::string& id) const { return store_.PodDir(id); }

Result<void> HostStorage::PrepareRunRoot(const std::string& run_dir) {
  std::string pods = run_dir + "/pods";
  std::error_code ec;
  fs::create_directories(pods, ec);
  if (ec) return Error::Errno("mkdir " + pods, ec.value());
  for (const auto& d : {run_dir, pods}) {
    if (::chmod(d.c_str(), 0700) < 0) return Error::Errno("chmod " + d);
  }
  return MakePrivateMount(pods);
}

Result<void> HostStorage::PrepareShare(const std::string& run_dir) {
  return sandboxer::PrepareShare(run_dir);
}

Result<void> HostStorage::WriteShareFile(const std::string& run_dir, const std::string& name,
                                         const std::string& content) {
  return sandboxer::WriteShareFile(run_dir, name, content);
}

Result<SharedVolumes> HostStorage::ShareVolumes(const std::string& run_dir,
                                                const std::string& container, size_t first,
                                                const std::vector<VolumeRequest>& volumes,
                                                const std::string& skip_below) {
  return ShareVolumesNow(run_dir, container, first, volumes, skip_below);
}

Result<void> HostStorage::RemoveFromShare(const std::string& run_dir, const std::string& rel) {
  return sandboxer::RemoveFromShare(run_dir, rel);
}

Result<void> HostStorage::WriteFile(const std::string& path, const std::string& content) {
  std::error_code ec;
  fs::create_directories(fs::path(path).parent_path(), ec);
  if (ec) return Error::Errno("mkdir " + fs::path(path).parent_path().string(), ec.value());
  PP_TRY(WriteFileAtomic(path, content));
  if (::chmod(path.c_str(), 0644) < 0) return Error::Errno("chmod " + path);
  return Ok();
}

void HostStorage::RemoveFile(const std::string& path) { ::unlink(path.c_str()); }

Result<void> HostStorage::MakeDirs(const std::string& path) {
  std::error_code ec;
  fs::create_directories(path, ec);
  if (ec) return Error::Errno("mkdir " + path, ec.value());
  return Ok();
}

Result<void> HostStorage::RemoveTree(const std::string& path) {
  struct stat st {};
  if (::lstat(path.c_str(), &st) < 0 && errno == ENOENT) return Ok();
  return RemoveTreeSafely(path);
}

Result<void> HostStorage::Rename(const std::string& from, const std::string& to, bool missing_ok) {
  if (::rename(from.c_str(), to.c_str()) == 0) return Ok();
  if (missing_ok && errno == ENOENT && ::access(from.c_str(), F_OK) != 0) return Ok();
  return Error::Errno("rename " + from + " to " + to);
}

std::vector<std::string> HostStorage::List(const std::string& dir) {
  std::vector<std::string> names;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) names.push_back(e.path().filename());
  return names;
}

Result<void> HostStorage::MakeScratchDisk(const std::string& path, uint64_t size_mib) {
  return sandboxer::MakeScratchDisk(mkfs_ext4_, path, size_mib);
}

int64_t LoopClock::WallNs() const {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

void LoopClock::After(std::chrono::milliseconds after, std::function<void()> fn) {
  loop_->AddTimer(after, std::move(fn));
}

}  // namespace peapod::sandboxer
