#include "podagent/template.h"

#include <fcntl.h>
#include <linux/random.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <vector>

#include <spdlog/spdlog.h>

#include "common/base/unique_fd.h"

namespace peapod::agent {

namespace {

constexpr size_t kMinEntropy = 32;   // 256 bits: a full reseed
constexpr size_t kMaxEntropy = 512;  // a bound on what the host may push

}  // namespace

void DropCaches() {
  ::sync();
  UniqueFd fd(::open("/proc/sys/vm/drop_caches", O_WRONLY | O_CLOEXEC));
  if (!fd || ::write(fd.get(), "3", 1) != 1) {
    spdlog::warn("agent: drop_caches: {}", std::strerror(errno));
  }
}

Result<uint64_t> ClearFreeMemory() {
  // MemFree, less a margin that keeps the allocation above the kernel's watermarks: the guest
  // has no swap, and its root is in RAM.
  constexpr uint64_t kMarginKib = 32 * 1024;
  uint64_t free_kib = 0;
  {
    UniqueFd fd(::open("/proc/meminfo", O_RDONLY | O_CLOEXEC));
    if (!fd) return Error::Errno("open /proc/meminfo");
    char buf[4096];
    ssize_t n = ::read(fd.get(), buf, sizeof(buf) - 1);
    if (n <= 0) return Error::Errno("read /proc/meminfo");
    buf[n] = 0;
    const char* at = std::strstr(buf, "MemFree:");
    if (!at) return Error::Internal("/proc/meminfo has no MemFree");
    free_kib = std::strtoull(at + std::strlen("MemFree:"), nullptr, 10);
  }
  if (free_kib <= kMarginKib) return uint64_t{0};
  const size_t len = static_cast<size_t>(free_kib - kMarginKib) * 1024;
  void* p = ::mmap(nullptr, len, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (p == MAP_FAILED) return Error::Errno("mmap the guest's free memory");
  // A write fault hands each page over cleared; the zero written keeps it so.
  const long page = ::sysconf(_SC_PAGESIZE);
  auto* bytes = static_cast<volatile char*>(p);
  for (size_t off = 0; off < len; off += static_cast<size_t>(page)) bytes[off] = 0;
  ::munmap(p, len);
  return static_cast<uint64_t>(len);
}

Result<void> ResumeFromTemplate(const v1::ResumedRequest& req) {
  const std::string& bytes = req.entropy();
  if (bytes.size() < kMinEntropy || bytes.size() > kMaxEntropy) {
    return Error::Invalid("Resumed: entropy must be {} to {} bytes, got {}", kMinEntropy,
                          kMaxEntropy, bytes.size());
  }
  // struct rand_pool_info ends in a flexible array: lay it out in a buffer of its own.
  std::vector<char> buf(sizeof(rand_pool_info) + bytes.size());
  auto* info = reinterpret_cast<rand_pool_info*>(buf.data());
  info->entropy_count = static_cast<int>(bytes.size() * 8);
  info->buf_size = static_cast<int>(bytes.size());
  std::memcpy(info->buf, bytes.data(), bytes.size());
  UniqueFd rnd(::open("/dev/urandom", O_WRONLY | O_CLOEXEC));
  if (!rnd) return Error::Errno("open /dev/urandom");
  if (::ioctl(rnd.get(), RNDADDENTROPY, info) < 0) return Error::Errno("RNDADDENTROPY");
  if (::ioctl(rnd.get(), RNDRESEEDCRNG) < 0) return Error::Errno("RNDRESEEDCRNG");
  std::memset(buf.data(), 0, buf.size());

  if (req.realtime_ns() > 0) {
    timespec ts{static_cast<time_t>(req.realtime_ns() / 1000000000),
                static_cast<long>(req.realtime_ns() % 1000000000)};
    if (::clock_settime(CLOCK_REALTIME, &ts) < 0) return Error::Errno("clock_settime");
  }
  DropCaches();
  spdlog::info("agent: resumed from a template: CRNG reseeded, clock set");
  return Ok();
}

}  // namespace peapod::agent
