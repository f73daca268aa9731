#include "sandboxer/storage.h"

#include <fcntl.h>
#include <linux/fs.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <random>
#include <sstream>

#include <fmt/ranges.h>
#include <spdlog/spdlog.h>

#include "common/base/beneath.h"
#include "common/base/subprocess.h"
#include "common/base/unique_fd.h"
#include "sandboxer/worker_pool.h"

namespace peapod::sandboxer {

namespace fs = std::filesystem;

namespace {

bool IsRegularFile(const std::string& path) {
  struct stat st {};
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

std::vector<std::string> Split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::string cur;
  std::istringstream in(s);
  while (std::getline(in, cur, sep)) {
    if (!cur.empty()) out.push_back(cur);
  }
  return out;
}

// A layer directory of the erofs snapshotter has its blob beside it: snapshots/<id>/fs and
// snapshots/<id>/layer.erofs.
LayerSource LayerForDir(const std::string& dir) {
  std::string blob = fs::path(dir).parent_path().string() + "/layer.erofs";
  if (IsRegularFile(blob)) return {blob, true};
  return {dir, false};
}

uint64_t Fnv1a(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

// The mkfs.erofs lines that say what went wrong ("<E> erofs: ..."), else its last line.
std::string MkfsError(const std::string& output) {
  std::string errors, last, line;
  std::istringstream in(output);
  while (std::getline(in, line)) {
    if (line.empty()) continue;
    last = line;
    if (line.rfind("<E>", 0) == 0) errors += (errors.empty() ? "" : "; ") + line.substr(4);
  }
  return errors.empty() ? last : errors;
}

}  // namespace

Result<std::vector<LayerSource>> LayersFromMounts(
    const google::protobuf::RepeatedPtrField<containerd::types::Mount>& mounts) {
  if (mounts.empty()) {
    return Error::Invalid(
        "no rootfs mounts: peapod needs containerd's snapshot mounts (overlayfs or erofs "
        "snapshotter) to build the container's root filesystem");
  }
  std::vector<LayerSource> erofs_blobs;  // erofs mounts, in containerd's order (bottom first)
  std::vector<LayerSource> out;
  for (const auto& m : mounts) {
    const std::string& type = m.type();
    if (type == "erofs") {
      for (const auto& o : m.options()) {
        if (o.rfind("device=", 0) == 0) {
          return Error::Invalid(
              "erofs mount of {} uses extra devices ({}): peapod attaches single-file layers "
              "only; turn off the erofs snapshotter's merged/multi-device layers",
              m.source(), o);
        }
      }
      if (!IsRegularFile(m.source())) {
        return Error::Invalid("erofs layer {} is not a file on this host", m.source());
      }
      erofs_blobs.push_back({m.source(), true});
    } else if (type == "overlay") {
      bool found = false;
      for (const auto& o : m.options()) {
        if (o.rfind("lowerdir=", 0) != 0) continue;
        found = true;
        for (const auto& dir : Split(o.substr(9), ':')) {
          if (dir.find("{{") != std::string::npos) {
            // A mount-manager template pointing at the erofs mounts before it: those are the
            // layers, already collected.
            continue;
          }
          out.push_back(LayerForDir(dir));  // lowerdir lists the topmost layer first
        }
      }
      if (!found) {
        return Error::Invalid("overlay rootfs mount without lowerdir= (options: {})",
                              fmt::join(m.options(), ","));
      }
    } else if (type == "bind" || type == "rbind") {
      out.push_back(LayerForDir(m.source()));
    } else {
      return Error::Invalid(
          "rootfs mount type \"{}\" is not supported by peapod: use containerd's overlayfs "
          "(default) or erofs snapshotter",
          type);
    }
  }
  // erofs mounts come bottom layer first; stack them under whatever the overlay listed.
  for (auto it = erofs_blobs.rbegin(); it != erofs_blobs.rend(); ++it) out.push_back(*it);
  if (out.empty()) return Error::Invalid("the rootfs mounts name no layer");
  return out;
}

namespace {

// Copies file `from` to a new file `to` (0644): a reflink where the filesystem can, else
// copy_file_range. Neither follows a symlink at `from`.
Result<void> CopyFileTo(const std::string& from, const std::string& to) {
  UniqueFd in(::open(from.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC));
  if (!in) return Error::Errno("open layer blob " + from);
  struct stat st;
  if (::fstat(in.get(), &st) < 0 || !S_ISREG(st.st_mode)) {
    return Error::Invalid("layer blob {} is not a regular file", from);
  }
  UniqueFd out(::open(to.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0644));
  if (!out) return Error::Errno("create " + to);
  if (::ioctl(out.get(), FICLONE, in.get()) == 0) return Ok();
  for (off_t left = st.st_size; left > 0;) {
    ssize_t n = ::copy_file_range(in.get(), nullptr, out.get(), nullptr,
                                  static_cast<size_t>(std::min<off_t>(left, 1 << 30)), 0);
    if (n < 0) return Error::Errno("copy layer blob " + from);
    if (n == 0) return Error::Internal("layer blob {} shrank while copied", from);
    left -= n;
  }
  return Ok();
}

}  // namespace

LayerCache::LayerCache(std::string dir, std::string mkfs, std::chrono::seconds keep_for,
                       WorkerPool* workers, Post post)
    : dir_(std::move(dir)),
      mkfs_(std::move(mkfs)),
      keep_for_(keep_for),
      workers_(workers),
      post_(std::move(post)) {}

Result<void> LayerCache::Init() {
  std::error_code ec;
  fs::create_directories(dir_, ec);
  if (ec) return Error::Errno("mkdir " + dir_, ec.value());
  auto now = std::chrono::steady_clock::now();
  for (const auto& e : fs::directory_iterator(dir_, ec)) {
    std::string name = e.path().filename().string();
    if (name.find(".tmp-") != std::string::npos) {
      fs::remove(e.path(), ec);  // an interrupted build
    } else if (e.path().extension() == ".erofs") {
      images_[e.path().string()] = Entry{0, now};
    }
  }
  return Ok();
}

Result<std::string> LayerCache::KeyOf(const std::string& dir) const {
  struct statx stx {};
  if (::statx(AT_FDCWD, dir.c_str(), 0, STATX_INO | STATX_BTIME | STATX_TYPE, &stx) < 0) {
    return Error::Errno("layer " + dir);
  }
  std::string id = fmt::format("{}\n{}:{}\n{}\n{}.{}", dir, stx.stx_dev_major, stx.stx_dev_minor,
                               stx.stx_ino, stx.stx_btime.tv_sec, stx.stx_btime.tv_nsec);
  if (!(stx.stx_mask & STATX_BTIME)) {
    id += fmt::format("\nctime {}.{}", stx.stx_ctime.tv_sec, stx.stx_ctime.tv_nsec);
  }
  return fmt::format("{:016x}", Fnv1a(id));
}

bool LayerCache::IsCached(const std::string& image) const { return images_.count(image) > 0; }

void LayerCache::Acquire(const std::string& dir, Done done) {
  AcquireWith(
      dir,
      [mkfs = mkfs_](const std::string& src, const std::string& tmp) -> Result<void> {
        auto run = RunProgram({mkfs, "--quiet", tmp, src});
        if (!run.ok()) {
          return std::move(run).error().Wrap("make the layer image (is erofs-utils installed?)");
        }
        if (run->exit_code != 0) {
          return Error::Invalid("mkfs.erofs rejected layer {}: {}", src, MkfsError(run->output));
        }
        return Ok();
      },
      std::move(done));
}

void LayerCache::AcquireCopy(const std::string& blob, Done done) {
  AcquireWith(blob, CopyFileTo, std::move(done));
}

void LayerCache::AcquireWith(
    const std::string& dir,
    std::function<Result<void>(const std::string&, const std::string&)> make, Done done) {
  auto key = KeyOf(dir);
  if (!key.ok()) return done(std::move(key).error());
  std::string image = dir_ + "/" + *key + ".erofs";
  if (auto it = images_.find(image); it != images_.end()) {
    ++it->second.refs;
    return done(image);
  }
  if (auto it = building_.find(image); it != building_.end()) {
    it->second.push_back(std::move(done));
    return;
  }
  building_[image].push_back(std::move(done));
  std::string tmp = fmt::format("{}.tmp-{:08x}", image, std::random_device{}());
  spdlog::info("layers: building {} from {}", image, dir);
  workers_->Run([this, dir, image, tmp, make = std::move(make), post = post_] {
    Result<void> built = make(dir, tmp);
    if (built.ok() && ::rename(tmp.c_str(), image.c_str()) < 0) {
      built = Error::Errno("rename " + tmp);
    }
    if (!built.ok()) ::unlink(tmp.c_str());
    post([this, image, built] {
      auto waiters = std::move(building_[image]);
      building_.erase(image);
      if (built.ok()) {
        images_[image].refs += static_cast<int>(waiters.size());
        spdlog::info("layers: built {}", image);
      } else {
        spdlog::warn("layers: {}", built.error().ToString());
      }
      for (auto& w : waiters) {
        if (built.ok()) {
          w(image);
        } else {
          w(built.error());
        }
      }
    });
  });
}

bool LayerCache::Adopt(const std::string& image) {
  if (auto it = images_.find(image); it != images_.end()) {
    ++it->second.refs;
    return true;
  }
  if (!IsRegularFile(image)) return false;
  images_[image] = Entry{1, {}};
  return true;
}

void LayerCache::Release(const std::string& image) {
  auto it = images_.find(image);
  if (it == images_.end() || it->second.refs == 0) return;
  if (--it->second.refs == 0) it->second.unused_since = std::chrono::steady_clock::now();
}

void LayerCache::Collect() {
  auto now = std::chrono::steady_clock::now();
  for (auto it = images_.begin(); it != images_.end();) {
    if (it->second.refs == 0 && now - it->second.unused_since >= keep_for_) {
      spdlog::info("layers: removing unused image {}", it->first);
      ::unlink(it->first.c_str());
      it = images_.erase(it);
    } else {
      ++it;
    }
  }
}

std::string ShortHash(const std::string& s) {
  return fmt::format("{:08x}", Fnv1a(s) & 0xffffffffu);
}

Result<void> MakeScratchDisk(const std::string& mkfs_ext4, const std::string& path,
                             uint64_t size_mib) {
  {
    UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600));
    if (!fd) return Error::Errno("create scratch disk " + path);
    if (::ftruncate(fd.get(), static_cast<off_t>(size_mib) << 20) < 0) {
      return Error::Errno("size scratch disk " + path);
    }
  }
  auto run = RunProgram({mkfs_ext4, "-q", "-F", "-O", "^has_journal", "-m", "0", "-E",
                         "lazy_itable_init=1,nodiscard", path});
  if (!run.ok())
    return std::move(run).error().Wrap("format scratch disk (is e2fsprogs installed?)");
  if (run->exit_code != 0) {
    ::unlink(path.c_str());
    return Error::Internal("mkfs.ext4 {} failed ({}): {}", path, run->exit_code, run->output);
  }
  return Ok();
}

Result<void> RemoveTreeSafely(const std::string& path) {
  std::string p = path;
  while (p.size() > 1 && p.back() == '/') p.pop_back();
  auto slash = p.find_last_of('/');
  if (slash == std::string::npos || slash + 1 == p.size()) {
    return Error::Invalid("{} is not an absolute path to a directory", path);
  }
  std::string parent = slash == 0 ? "/" : p.substr(0, slash), name = p.substr(slash + 1);
  auto pfd = OpenHostDir(parent);
  if (!pfd.ok()) {
    return pfd.error().sys_errno() == ENOENT ? Result<void>(Ok()) : Result<void>(pfd.error());
  }
  PP_TRY_CTX(UnmountAllBeneath(pfd->get(), name), "unmount below " + path);
  PP_TRY_CTX(RemoveTreeBeneath(pfd->get(), name), "remove " + parent);
  return Ok();
}

}  // namespace peapod::sandboxer
