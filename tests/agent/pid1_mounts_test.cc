// PID 1's crun binary setup (podagent/pid1.h), run for real as root in a private mount
// namespace: on tmpfs (what the guest's initramfs is) crun would copy itself, after
// ServeFromReadOnlyRamfs it would not, and a failure leaves nothing mounted.
#include <fcntl.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>
#include <string>

#include <gtest/gtest.h>

#include "common/base/mountinfo.h"
#include "common/base/unique_fd.h"
#include "podagent/pid1.h"

namespace peapod::agent {
namespace {

// Runs body in a child in its own mount namespace, with a fresh tmpfs at `root`; returns what
// the body recorded ("key=value" lines), or a "child=..." line if the child failed to report.
std::map<std::string, std::string> InPrivateMounts(
    const std::function<void(const std::string& root, std::map<std::string, std::string>&)>& body) {
  int fds[2];
  if (::pipe(fds) < 0) return {{"child", "pipe failed"}};
  pid_t pid = ::fork();
  if (pid == 0) {
    ::close(fds[0]);
    std::map<std::string, std::string> out;
    std::string root = "/tmp/pp-pid1-test-" + std::to_string(::getpid());
    if (::unshare(CLONE_NEWNS) < 0 ||
        ::mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) < 0) {
      out["child"] = std::string("unshare: ") + std::strerror(errno);
    } else if (::mkdir(root.c_str(), 0755) < 0 ||
               ::mount("tmpfs", root.c_str(), "tmpfs", 0, "mode=0755") < 0) {
      out["child"] = std::string("tmpfs: ") + std::strerror(errno);
    } else {
      body(root, out);
    }
    std::string text;
    for (auto& [k, v] : out) text += k + "=" + v + "\n";
    (void)!::write(fds[1], text.data(), text.size());
    ::umount2(root.c_str(), MNT_DETACH);
    ::rmdir(root.c_str());
    ::_exit(0);
  }
  ::close(fds[1]);
  std::string text;
  char buf[4096];
  ssize_t n;
  while ((n = ::read(fds[0], buf, sizeof buf)) > 0) text.append(buf, static_cast<size_t>(n));
  ::close(fds[0]);
  int status = 0;
  ::waitpid(pid, &status, 0);
  std::map<std::string, std::string> out;
  std::istringstream lines(text);
  for (std::string line; std::getline(lines, line);) {
    auto eq = line.find('=');
    if (eq != std::string::npos) out[line.substr(0, eq)] = line.substr(eq + 1);
  }
  if (out.empty()) out["child"] = "reported nothing (status " + std::to_string(status) + ")";
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
    out["child"] = "ended with status " + std::to_string(status);
  }
  return out;
}

std::string Skips(const std::string& path) {
  auto r = CrunSkipsItsCopy(path);
  return r.ok() ? (*r ? "yes" : "no") : "error: " + r.error().ToString();
}

bool IsMountPoint(const std::string& path) {
  for (const auto& m : ReadMountTable()) {
    if (m.path == path) return true;
  }
  return false;
}

class Pid1MountsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (::geteuid() != 0) GTEST_SKIP() << "needs root (mounts in a private mount namespace)";
  }
};

TEST_F(Pid1MountsTest, CrunOnARamfsSkipsItsCopyWhereATmpfsBindDoesNot) {
  auto out = InPrivateMounts([](const std::string& root, auto& out) {
    const std::string bin = root + "/crun";
    std::ofstream(bin) << "#!/bin/sh\necho the binary\n";
    ::chmod(bin.c_str(), 0755);
    out["tmpfs"] = Skips(bin);
    // A read-only bind on tmpfs: crun asks F_GET_SEALS first, tmpfs answers, no skip.
    bool bound =
        ::mount(bin.c_str(), bin.c_str(), nullptr, MS_BIND, nullptr) == 0 &&
        ::mount(nullptr, bin.c_str(), nullptr, MS_REMOUNT | MS_BIND | MS_RDONLY, nullptr) == 0;
    out["ro_bind_made"] = bound ? "yes" : std::strerror(errno);
    out["tmpfs_ro_bind"] = Skips(bin);
    ::umount2(bin.c_str(), MNT_DETACH);

    UniqueFd original(::open(bin.c_str(), O_RDONLY | O_CLOEXEC));
    if (!original) out["child"] = std::string("open the original: ") + std::strerror(errno);
    auto r = ServeFromReadOnlyRamfs(bin, root + "/ramfs");
    out["serve"] = r.ok() ? "ok" : r.error().ToString();
    out["ramfs"] = Skips(bin);
    out["bin_mounted"] = IsMountPoint(bin) ? "yes" : "no";
    std::ifstream in(bin);
    std::stringstream content;
    content << in.rdbuf();
    out["content"] = content.str() == "#!/bin/sh\necho the binary\n" ? "same" : content.str();
    int w = ::open(bin.c_str(), O_WRONLY | O_CLOEXEC);
    out["write"] = w < 0 ? std::strerror(errno) : "opened";
    int w2 = ::open((root + "/ramfs/crun").c_str(), O_WRONLY | O_CLOEXEC);
    out["write_ramfs"] = w2 < 0 ? std::strerror(errno) : "opened";
    struct stat st {};
    out["original_size"] =
        ::fstat(original.get(), &st) == 0 ? std::to_string(st.st_size) : "fstat failed";
    std::string ran;
    if (FILE* p = ::popen(bin.c_str(), "r")) {
      char line[128];
      while (std::fgets(line, sizeof line, p)) ran += line;
      ::pclose(p);
    }
    out["ran"] = ran == "the binary\n" ? "same" : ran;
  });
  ASSERT_EQ(out.count("child"), 0u) << out["child"];
  EXPECT_EQ(out["ro_bind_made"], "yes");
  EXPECT_EQ(out["tmpfs"], "no");
  EXPECT_EQ(out["tmpfs_ro_bind"], "no");
  EXPECT_EQ(out["serve"], "ok");
  EXPECT_EQ(out["ramfs"], "yes");
  EXPECT_EQ(out["bin_mounted"], "yes");
  EXPECT_EQ(out["content"], "same");
  EXPECT_EQ(out["write"], std::strerror(EROFS));
  EXPECT_EQ(out["write_ramfs"], std::strerror(EROFS));
  EXPECT_EQ(out["original_size"], "0") << "the initramfs copy is emptied";
  EXPECT_EQ(out["ran"], "same");
}

TEST_F(Pid1MountsTest, FailuresAreClearErrorsAndLeaveNothingMounted) {
  auto out = InPrivateMounts([](const std::string& root, auto& out) {
    const std::string dir = root + "/not-a-file";
    ::mkdir(dir.c_str(), 0755);
    auto r = ServeFromReadOnlyRamfs(dir, root + "/ramfs");
    out["dir"] = r.ok() ? "ok" : r.error().ToString();
    const std::string fifo = root + "/fifo";
    ::mkfifo(fifo.c_str(), 0600);
    auto f = ServeFromReadOnlyRamfs(fifo, root + "/ramfs");
    out["fifo"] = f.ok() ? "ok" : f.error().ToString();
    auto missing = ServeFromReadOnlyRamfs(root + "/missing", root + "/ramfs");
    out["missing"] = missing.ok() ? "ok" : missing.error().ToString();
    // A copy that fails half way (the file size limit), after the ramfs is mounted.
    const std::string bin = root + "/crun";
    std::ofstream(bin) << std::string(8192, 'x');
    ::signal(SIGXFSZ, SIG_IGN);
    struct rlimit small {
      1024, RLIM_INFINITY
    };
    ::setrlimit(RLIMIT_FSIZE, &small);
    auto c = ServeFromReadOnlyRamfs(bin, root + "/ramfs");
    out["copy"] = c.ok() ? "ok" : c.error().ToString();
    out["ramfs_mounted"] = IsMountPoint(root + "/ramfs") ? "yes" : "no";
    out["bin_mounted"] = IsMountPoint(bin) ? "yes" : "no";
    std::error_code ec;
    out["original_size"] = std::to_string(std::filesystem::file_size(bin, ec));
  });
  ASSERT_EQ(out.count("child"), 0u) << out["child"];
  EXPECT_NE(out["dir"].find("Is a directory"), std::string::npos) << out["dir"];
  EXPECT_NE(out["fifo"].find("is not a file"), std::string::npos) << out["fifo"];
  EXPECT_NE(out["missing"].find("open"), std::string::npos) << out["missing"];
  EXPECT_NE(out["copy"].find("File too large"), std::string::npos) << out["copy"];
  EXPECT_EQ(out["ramfs_mounted"], "no");
  EXPECT_EQ(out["bin_mounted"], "no");
  EXPECT_EQ(out["original_size"], "8192") << "a failed serve leaves the original as it was";
}

// A sealed memfd: crun skips its copy only with all four seals.
TEST_F(Pid1MountsTest, OnlyAFullySealedMemfdCountsAsCrunsCopy) {
  UniqueFd sealed(::memfd_create("crun-test", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  ASSERT_TRUE(sealed);
  ASSERT_EQ(
      ::fcntl(sealed.get(), F_ADD_SEALS, F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE),
      0);
  UniqueFd unsealed(::memfd_create("crun-test", MFD_CLOEXEC));  // F_SEAL_SEAL only
  ASSERT_TRUE(unsealed);
  EXPECT_EQ(Skips("/proc/self/fd/" + std::to_string(sealed.get())), "yes");
  EXPECT_EQ(Skips("/proc/self/fd/" + std::to_string(unsealed.get())), "no");
}

// Loaded boot modules' files are emptied (on tmpfs, as the initramfs is); a file an on-demand
// list also names is kept.
TEST_F(Pid1MountsTest, LoadedModuleFilesInRamAreEmptiedButOnDemandOnesKept) {
  auto out = InPrivateMounts([](const std::string& root, auto& out) {
    namespace fs = std::filesystem;
    fs::path dir(root);
    fs::create_directories(dir / "etc");
    auto write = [](const fs::path& p, const std::string& text) { std::ofstream(p) << text; };
    write(dir / "boot.ko", std::string(3000, 'b'));
    write(dir / "shared.ko", std::string(500, 's'));
    write(dir / "etc/modules",
          (dir / "boot.ko").string() + "\n" + (dir / "shared.ko").string() + "\n");
    write(dir / "etc/modules.ext4", (dir / "shared.ko").string() + "\n");
    out["freed"] = std::to_string(
        FreeLoadedModuleFiles((dir / "etc/modules").string(), (dir / "etc").string()));
    out["boot"] = std::to_string(fs::file_size(dir / "boot.ko"));
    out["shared"] = std::to_string(fs::file_size(dir / "shared.ko"));
  });
  ASSERT_EQ(out.count("child"), 0u) << out["child"];
  EXPECT_EQ(out["freed"], "3000");
  EXPECT_EQ(out["boot"], "0");
  EXPECT_EQ(out["shared"], "500");
}

}  // namespace
}  // namespace peapod::agent
