#include "sandboxer/template.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <unistd.h>

#include <fstream>
#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "common/base/unique_fd.h"
#include "sandboxer/state.h"

namespace peapod::sandboxer {

namespace {

// Bumped when what a template holds changes meaning (the agent's template calls, the devices).
constexpr int kTemplateFormat = 2;  // 2: the NIC is saved up, on standby

std::string Hex(const unsigned char* p, unsigned n) {
  static const char* d = "0123456789abcdef";
  std::string out;
  for (unsigned i = 0; i < n; ++i) {
    out += d[p[i] >> 4];
    out += d[p[i] & 15];
  }
  return out;
}

// Hex SHA-256 of what feed gives the digest.
Result<std::string> Sha256Of(const std::function<Result<void>(EVP_MD_CTX*)>& feed) {
  std::unique_ptr<EVP_MD_CTX, void (*)(EVP_MD_CTX*)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1) {
    return Error::Internal("SHA-256 is not available");
  }
  PP_TRY(feed(ctx.get()));
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned n = 0;
  EVP_DigestFinal_ex(ctx.get(), md, &n);
  return Hex(md, n);
}

// follow: the operator's kernel and initrd may be links; our own files are never followed.
Result<UniqueFd> OpenRegular(const std::string& path, struct stat* st, bool follow = false) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC | (follow ? 0 : O_NOFOLLOW)));
  if (!fd) return Error::Errno("open " + path);
  if (::fstat(fd.get(), st) < 0) return Error::Errno("stat " + path);
  if (!S_ISREG(st->st_mode)) return Error::Invalid("{} is not a regular file", path);
  return fd;
}

Result<void> HashFdInto(EVP_MD_CTX* ctx, int fd, const std::string& path) {
  std::vector<char> buf(1 << 20);
  for (;;) {
    ssize_t n = ::read(fd, buf.data(), buf.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Error::Errno("read " + path);
    if (n == 0) return Ok();
    EVP_DigestUpdate(ctx, buf.data(), static_cast<size_t>(n));
  }
}

Result<void> HashFileInto(EVP_MD_CTX* ctx, const std::string& path) {
  struct stat st {};
  PP_ASSIGN_OR_RETURN(auto fd, OpenRegular(path, &st, /*follow=*/true));
  return HashFdInto(ctx, fd.get(), path);
}

// A template's state file hashed through one descriptor opened without following links, and
// the identity it had while hashed (a file changed meanwhile is an error). want_size: the size
// it must have, checked before it is read.
struct HashedState {
  uint64_t size = 0;
  std::string sha256, identity;
};
Result<HashedState> HashState(const std::string& path, std::optional<uint64_t> want_size = {}) {
  struct stat st {};
  PP_ASSIGN_OR_RETURN(auto fd, OpenRegular(path, &st));
  if (want_size && static_cast<uint64_t>(st.st_size) != *want_size) {
    return Error::Invalid("template state {} has {} bytes, its manifest says {}", path, st.st_size,
                          *want_size);
  }
  HashedState h;
  h.size = static_cast<uint64_t>(st.st_size);
  PP_ASSIGN_OR_RETURN(h.sha256,
                      Sha256Of([&](EVP_MD_CTX* ctx) { return HashFdInto(ctx, fd.get(), path); }));
  struct stat after {};
  if (::fstat(fd.get(), &after) < 0) return Error::Errno("stat " + path);
  h.identity = FileIdentity(after);
  if (h.identity != FileIdentity(st)) {
    return Error::Invalid("template state {} changed while it was checked", path);
  }
  return h;
}

// The host CPU's feature flags and kernel: a guest saved under KVM with host-passthrough may use
// any of them.
std::string HostCpu() {
  std::ifstream f("/proc/cpuinfo");
  std::string line, flags;
  while (std::getline(f, line)) {
    if (line.rfind("flags", 0) == 0) {
      flags = line;
      break;
    }
  }
  utsname u{};
  ::uname(&u);
  return flags + "|" + u.release;
}

}  // namespace

std::string FileIdentity(const struct stat& st) {
  return fmt::format("{}:{}:{}:{}.{:09}", static_cast<uint64_t>(st.st_dev),
                     static_cast<uint64_t>(st.st_ino), static_cast<int64_t>(st.st_size),
                     static_cast<int64_t>(st.st_ctim.tv_sec), st.st_ctim.tv_nsec);
}

Result<std::string> TemplateKey(const VmSpec& spec, uint64_t scratch_size_mib,
                                const std::string& qemu_binary) {
  struct stat st {};
  if (::stat(qemu_binary.c_str(), &st) < 0) return Error::Errno("stat " + qemu_binary);
  bool scratch = false;
  for (const auto& d : spec.disks) scratch |= !d.readonly;
  nlohmann::json shape = {
      {"format", kTemplateFormat},
      {"cmdline", spec.cmdline},
      {"vcpus", spec.vcpus},
      {"memory_mib", spec.memory_mib},
      {"kvm", spec.kvm},
      {"tcg_tb_cache_mib", spec.tcg_tb_cache_mib},
      {"nic", !spec.tap.empty()},
      {"scratch_mib", scratch ? scratch_size_mib : 0},
      // A confined VM's share comes through the 9p proxy (a device of its own).
      {"share", spec.share_dir.empty()      ? "none"
                : spec.share_socket.empty() ? "qemu"
                                            : "proxy"},
      {"qemu", {qemu_binary, static_cast<int64_t>(st.st_size), static_cast<int64_t>(st.st_mtime)}},
      {"host_cpu", spec.kvm ? HostCpu() : std::string()},
  };
  std::string text = shape.dump();
  return Sha256Of([&](EVP_MD_CTX* ctx) -> Result<void> {
    PP_TRY(HashFileInto(ctx, spec.kernel));
    PP_TRY(HashFileInto(ctx, spec.initrd));
    EVP_DigestUpdate(ctx, text.data(), text.size());
    return Ok();
  });
}

Result<TemplateInfo> LoadTemplate(const std::string& dir, const std::string& key) {
  std::ifstream f(dir + "/manifest.json");
  if (!f) return Error::NotFound("no template in {}", dir);
  auto m = nlohmann::json::parse(f, nullptr, /*allow_exceptions=*/false);
  if (m.is_discarded() || !m.is_object())
    return Error::Invalid("{}/manifest.json is not JSON", dir);
  if (JsonString(m, "key") != key) {
    return Error::Invalid(
        "template {} was made for other inputs (kernel, initrd, VM size or QEMU changed)", dir);
  }
  TemplateInfo t{key, dir + "/state", JsonString(m, "mac"), "", 0};
  if (t.mac.empty()) return Error::Invalid("{}/manifest.json names no MAC", dir);
  auto bytes = m.find("state_bytes");
  if (bytes == m.end() || !bytes->is_number_unsigned()) {
    return Error::Invalid("{}/manifest.json has no state_bytes", dir);
  }
  PP_ASSIGN_OR_RETURN(auto h, HashState(t.state, bytes->get<uint64_t>()));
  if (h.sha256 != JsonString(m, "state_sha256")) {
    return Error::Invalid("template state {} is corrupt (SHA-256 {} is not the manifest's)",
                          t.state, h.sha256);
  }
  // What was hashed is what restores must find: the same file, unchanged since.
  t.identity = h.identity;
  return t;
}

Result<TemplateInfo> WriteTemplateManifest(const std::string& dir, const std::string& key,
                                           const std::string& mac) {
  TemplateInfo t{key, dir + "/state", mac, "", 0};
  PP_ASSIGN_OR_RETURN(auto h, HashState(t.state));
  nlohmann::json m = {{"format", kTemplateFormat},
                      {"key", key},
                      {"state_bytes", h.size},
                      {"state_sha256", h.sha256},
                      {"mac", mac}};
  PP_TRY(WriteFileAtomic(dir + "/manifest.json", m.dump(2) + "\n"));
  t.identity = h.identity;
  return t;
}

std::string JsonString(const nlohmann::json& j, const char* key) {
  auto it = j.find(key);
  return it != j.end() && it->is_string() ? it->get<std::string>() : std::string();
}

Result<std::string> HostRandomBytes(size_t n) {
  std::string out(n, '\0');
  size_t got = 0;
  while (got < n) {
    ssize_t r = ::getrandom(out.data() + got, n - got, 0);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) return Error::Errno("getrandom");
    got += static_cast<size_t>(r);
  }
  return out;
}

}  // namespace peapod::sandboxer
