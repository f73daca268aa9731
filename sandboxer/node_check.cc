#include "sandboxer/node_check.h"

#include <fcntl.h>
#include <linux/kvm.h>
#include <linux/magic.h>
#include <sys/ioctl.h>
#include <sys/statfs.h>
#include <unistd.h>

#include <libvirt/libvirt.h>

#include <cerrno>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "common/base/subprocess.h"
#include "common/base/unique_fd.h"

namespace peapod::sandboxer {
namespace {

enum class Level { kOk, kNote, kFail };

struct Report {
  std::FILE* out;
  int failures = 0;
  void Line(Level l, const std::string& what, const std::string& text) {
    const char* tag = l == Level::kOk ? "ok  " : l == Level::kNote ? "note" : "FAIL";
    if (l == Level::kFail) ++failures;
    std::fprintf(out, "%s  %-11s %s\n", tag, what.c_str(), text.c_str());
  }
};

// The first line a program prints for args, or empty if it cannot run.
std::string FirstLine(const std::vector<std::string>& args) {
  auto r = RunProgram(args);
  if (!r.ok() || r->exit_code != 0) return "";
  std::istringstream in(r->output);
  std::string line;
  std::getline(in, line);
  return line;
}

// A program by name in PATH, or by path.
std::string Which(const std::string& name) {
  if (name.find('/') != std::string::npos) return ::access(name.c_str(), X_OK) == 0 ? name : "";
  const char* path = std::getenv("PATH");
  std::istringstream dirs(path ? path : "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin");
  for (std::string d; std::getline(dirs, d, ':');) {
    std::string p = d + "/" + name;
    if (::access(p.c_str(), X_OK) == 0) return p;
  }
  return "";
}

void CheckAccel(const Config& cfg, Report& r) {
  std::string why;
  if (KvmWorks(&why)) {
    return r.Line(Level::kOk, "accel", "KVM works: pods boot with hardware virtualization");
  }
  if (cfg.accel == "kvm") {
    return r.Line(Level::kFail, "accel",
                  why +
                      ", and the config asks for kvm: load kvm_intel or kvm_amd, enable "
                      "virtualization in the firmware, or set \"accel\": \"auto\"");
  }
  r.Line(Level::kNote, "accel",
         why + ": pods run under TCG (software emulation), several times slower to boot");
}

void CheckLibvirtAndQemu(Report& r) {
  unsigned long lib = 0, qemu = 0;
  if (virGetVersion(&lib, "QEMU", &qemu) < 0) {
    r.Line(Level::kFail, "libvirt",
           "libvirt has no QEMU driver: apt install libvirt-daemon-driver-qemu");
  } else {
    r.Line(Level::kOk, "libvirt",
           fmt::format("{}.{}.{} with its QEMU driver (embedded: no daemon needed)", lib / 1000000,
                       lib / 1000 % 1000, lib % 1000));
  }
  std::string q = Which("qemu-system-x86_64");
  std::string v = q.empty() ? "" : FirstLine({q, "--version"});
  if (v.empty()) {
    r.Line(Level::kFail, "qemu", "qemu-system-x86_64 does not run: apt install qemu-system-x86");
  } else {
    r.Line(Level::kOk, "qemu", v);
  }
}

void CheckImages(const Config& cfg, Report& r) {
  for (const auto& [what, path] : {std::pair{"kernel", cfg.kernel}, {"initrd", cfg.initrd}}) {
    if (::access(path.c_str(), R_OK) == 0) {
      r.Line(Level::kOk, what, path);
    } else {
      r.Line(Level::kFail, what,
             path + " is missing: `make install` puts the guest there, or set image_dir");
    }
  }
}

void CheckDevices(Report& r) {
  if (::access("/dev/net/tun", R_OK | W_OK) == 0) {
    r.Line(Level::kOk, "tun", "/dev/net/tun: pod NICs can be made");
  } else {
    r.Line(Level::kFail, "tun",
           "/dev/net/tun is missing: modprobe tun (pods need it for their NIC)");
  }
  if (::access("/dev/vhost-net", R_OK | W_OK) == 0) {
    r.Line(Level::kOk, "vhost-net", "/dev/vhost-net: the pod NIC's data path stays in the kernel");
  } else {
    r.Line(Level::kNote, "vhost-net",
           "no /dev/vhost-net (modprobe vhost_net): pod networking is slower");
  }
  if (::access("/dev/vhost-vsock", R_OK | W_OK) == 0) {
    r.Line(Level::kOk, "vsock", "/dev/vhost-vsock is there");
  } else {
    r.Line(Level::kNote, "vsock",
           "no /dev/vhost-vsock (modprobe vhost_vsock): the agent channel uses virtio-serial");
  }
}

void CheckCgroups(Report& r) {
  struct statfs fs {};
  if (::statfs("/sys/fs/cgroup", &fs) == 0 && fs.f_type == CGROUP2_SUPER_MAGIC) {
    return r.Line(Level::kOk, "cgroup", "v2 (unified)");
  }
  struct statfs u {};
  bool hybrid = ::statfs("/sys/fs/cgroup/unified", &u) == 0 && u.f_type == CGROUP2_SUPER_MAGIC;
  r.Line(Level::kNote, "cgroup",
         hybrid ? "v1 with a v2 hierarchy (hybrid): works; kubelet prefers v2"
                : "v1: works; kubelet prefers v2");
}

void CheckTools(const Config& cfg, Report& r) {
  for (const auto& [name, pkg] : {std::pair{cfg.mkfs_erofs, "erofs-utils"},
                                  {cfg.mkfs_ext4, "e2fsprogs"},
                                  {cfg.share_server, "qemu-system-common"}}) {
    std::string p = Which(name);
    if (p.empty()) {
      r.Line(Level::kFail, "tools", fmt::format("{} is missing: apt install {}", name, pkg));
    } else {
      r.Line(Level::kOk, "tools", p);
    }
  }
}

void CheckContainerd(const Config& cfg, Report& r) {
  std::string bin = Which("containerd");
  std::string v = bin.empty() ? "" : FirstLine({bin, "--version"});
  if (v.empty()) {
    return r.Line(Level::kNote, "containerd", "not found in PATH: install containerd 2.x (or 1.6)");
  }
  r.Line(Level::kOk, "containerd", v);
  auto dump = RunProgram({bin, "config", "dump"});
  if (!dump.ok() || dump->exit_code != 0) {
    return r.Line(Level::kNote, "containerd",
                  "its config could not be read (`containerd config dump`)");
  }
  const std::string& c = dump->output;
  bool runtime = c.find("io.containerd.peapod.v2") != std::string::npos;
  bool proxy = c.find("proxy_plugins.peapod") != std::string::npos &&
               c.find(cfg.listen) != std::string::npos;
  bool v2 = c.find("version = 3") != std::string::npos;
  if (!runtime) {
    r.Line(Level::kFail, "containerd",
           v2 ? "its config has no peapod runtime: its config.toml must import "
                "/etc/containerd/conf.d/*.toml (where `make install` put peapod.toml)"
              : "its config has no peapod runtime: add share/peapod/containerd-1.6-peapod.toml");
  } else if (v2 && !proxy) {
    r.Line(
        Level::kFail, "containerd",
        "the peapod runtime is there but [proxy_plugins.peapod] does not point at " + cfg.listen);
  } else {
    r.Line(Level::kOk, "containerd",
           v2 ? "runs peapod pods through the sandbox API at " + cfg.listen
              : "runs peapod pods (classic CRI)");
  }
}

}  // namespace

// KVM_GET_SUPPORTED_CPUID as the kernel defines it (the header's macro, compiled as C++, sizes
// kvm_cpuid2's flexible array in and gets another number).
constexpr unsigned long kGetSupportedCpuid = _IOWR(KVMIO, 0x05, uint64_t);

bool KvmWorks(std::string* why) {
  auto say = [why](std::string w) {
    if (why) *why = std::move(w);
    return false;
  };
  UniqueFd kvm(::open("/dev/kvm", O_RDWR | O_CLOEXEC));
  if (!kvm) return say("/dev/kvm cannot be opened");
  if (::ioctl(kvm.get(), KVM_GET_API_VERSION, 0) != KVM_API_VERSION) {
    return say("/dev/kvm answers no KVM API");
  }
  UniqueFd vm(::ioctl(kvm.get(), KVM_CREATE_VM, 0));
  if (!vm) return say(fmt::format("/dev/kvm cannot make a VM ({})", std::strerror(errno)));
  // The CPU KVM offers guests. One without SSE3 (leaf 1, ECX bit 0), which every x86-64 CPU
  // since 2005 has, is a broken nested setup: QEMU starts, the guest kernel hangs (measured
  // on this project's CI machine).
  std::vector<char> buf;
  kvm_cpuid2* cpuid = nullptr;
  int got = -1;
  for (uint32_t n : {128u, 255u}) {  // KVM refuses 256 or more; E2BIG: too few
    buf.assign(sizeof(kvm_cpuid2) + n * sizeof(kvm_cpuid_entry2), 0);
    cpuid = reinterpret_cast<kvm_cpuid2*>(buf.data());
    cpuid->nent = n;
    if ((got = ::ioctl(kvm.get(), kGetSupportedCpuid, cpuid)) == 0 || errno != E2BIG) break;
  }
  if (got < 0) {
    return say(fmt::format("/dev/kvm cannot say what CPU it offers ({})", std::strerror(errno)));
  }
  for (uint32_t i = 0; i < cpuid->nent; ++i) {
    const auto& e = cpuid->entries[i];
    if (e.function == 1 && !(e.ecx & 1u)) {
      return say("KVM offers guests a CPU without SSE3 (a broken nested setup; guests hang)");
    }
  }
  return true;
}

int CheckNode(const Config& cfg, std::FILE* out) {
  Report r{out};
  if (::geteuid() != 0) r.Line(Level::kFail, "user", "peapod-sandboxer runs as root");
  CheckAccel(cfg, r);
  CheckLibvirtAndQemu(r);
  CheckImages(cfg, r);
  CheckDevices(r);
  CheckCgroups(r);
  CheckTools(cfg, r);
  CheckContainerd(cfg, r);
  std::fprintf(out, "%s\n",
               r.failures ? fmt::format("{} check(s) failed: this node cannot run peapod pods yet",
                                        r.failures)
                                .c_str()
                          : "this node can run peapod pods");
  return r.failures ? 1 : 0;
}

}  // namespace peapod::sandboxer
