#include "sandboxer/template.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <fstream>
#include <memory>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/base/unique_fd.h"
#include "sandboxer/state.h"

namespace peapod::sandboxer {

namespace {

// Bumped when what a template holds changes meaning (the agent's template calls, the devices).
constexpr int kTemplateFormat = 1;

struct MdCtx {
  EVP_MD_CTX* ctx = EVP_MD_CTX_new();
  ~MdCtx() { EVP_MD_CTX_free(ctx); }
};

std::string Hex(const unsigned char* p, unsigned n) {
  static const char* d = "0123456789abcdef";
  std::string out;
  for (unsigned i = 0; i < n; ++i) {
    out += d[p[i] >> 4];
    out += d[p[i] & 15];
  }
  return out;
}

Result<void> HashFileInto(EVP_MD_CTX* ctx, const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!fd) return Error::Errno("open " + path);
  std::vector<char> buf(1 << 20);
  for (;;) {
    ssize_t n = ::read(fd.get(), buf.data(), buf.size());
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Error::Errno("read " + path);
    if (n == 0) return Ok();
    EVP_DigestUpdate(ctx, buf.data(), static_cast<size_t>(n));
  }
}

std::string Finish(EVP_MD_CTX* ctx) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned n = 0;
  EVP_DigestFinal_ex(ctx, md, &n);
  return Hex(md, n);
}

}  // namespace

Result<std::string> Sha256OfFile(const std::string& path) {
  MdCtx c;
  if (!c.ctx || EVP_DigestInit_ex(c.ctx, EVP_sha256(), nullptr) != 1) {
    return Error::Internal("SHA-256 is not available");
  }
  PP_TRY(HashFileInto(c.ctx, path));
  return Finish(c.ctx);
}

Result<std::string> TemplateKey(const VmSpec& spec, uint64_t scratch_size_mib,
                                const std::string& qemu_binary) {
  MdCtx c;
  if (!c.ctx || EVP_DigestInit_ex(c.ctx, EVP_sha256(), nullptr) != 1) {
    return Error::Internal("SHA-256 is not available");
  }
  PP_TRY(HashFileInto(c.ctx, spec.kernel));
  PP_TRY(HashFileInto(c.ctx, spec.initrd));
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
      {"share", spec.share_dir.empty() ? "none"
                : spec.uid != 0        ? "proxy"
                                       : "qemu"},
      {"qemu", {qemu_binary, static_cast<int64_t>(st.st_size), static_cast<int64_t>(st.st_mtime)}},
  };
  std::string text = shape.dump();
  EVP_DigestUpdate(c.ctx, text.data(), text.size());
  return Finish(c.ctx);
}

Result<TemplateInfo> LoadTemplate(const std::string& dir, const std::string& key) {
  std::ifstream f(dir + "/manifest.json");
  if (!f) return Error::NotFound("no template in {}", dir);
  auto m = nlohmann::json::parse(f, nullptr, /*allow_exceptions=*/false);
  if (m.is_discarded() || !m.is_object())
    return Error::Invalid("{}/manifest.json is not JSON", dir);
  if (m.value("key", "") != key) {
    return Error::Invalid(
        "template {} was made for other inputs (kernel, initrd, VM size or "
        "QEMU changed)",
        dir);
  }
  TemplateInfo t{key, dir + "/state", m.value("mac", "")};
  struct stat st {};
  if (::stat(t.state.c_str(), &st) < 0) return Error::Errno("template state " + t.state);
  uint64_t want = m.value("state_bytes", uint64_t{0});
  if (static_cast<uint64_t>(st.st_size) != want) {
    return Error::Invalid("template state {} has {} bytes, its manifest says {}", t.state,
                          st.st_size, want);
  }
  PP_ASSIGN_OR_RETURN(auto sum, Sha256OfFile(t.state));
  if (sum != m.value("state_sha256", "")) {
    return Error::Invalid("template state {} is corrupt (SHA-256 {} is not the manifest's)",
                          t.state, sum);
  }
  if (t.mac.empty()) return Error::Invalid("{}/manifest.json names no MAC", dir);
  return t;
}

Result<void> WriteTemplateManifest(const std::string& dir, const std::string& key,
                                   const std::string& mac) {
  const std::string state = dir + "/state";
  struct stat st {};
  if (::stat(state.c_str(), &st) < 0) return Error::Errno("template state " + state);
  PP_ASSIGN_OR_RETURN(auto sum, Sha256OfFile(state));
  nlohmann::json m = {{"format", kTemplateFormat},
                      {"key", key},
                      {"state_bytes", static_cast<uint64_t>(st.st_size)},
                      {"state_sha256", sum},
                      {"mac", mac}};
  return WriteFileAtomic(dir + "/manifest.json", m.dump(2) + "\n");
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
