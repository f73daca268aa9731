// PID 1's crun binary setup (podagent/pid1.h), run for real as root in a private mount
// namespace: on tmpfs (what the guest's initramfs is) crun would copy itself, after
// ServeFromReadOnlyRamfs it would not, and a failure leaves nothing mounted.
#include <fcntl.h>
#include <sched.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>
#include <string>

#include <gtest/gtest.h>

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
  return out;
}

std::string Skips(const std::string& path) {
  auto r = CrunSkipsItsCopy(path);
  return r.ok() ? (*r ? "yes" : "no") : "error: " + r.error().ToString();
}

bool IsMountPoint(const std::string& path) {
  std::ifstream in("/proc/self/mountinfo");
  for (std::string line; std::getline(in, line);) {
    std::istringstream f(line);
    std::string id, parent, dev, root, mnt;
    f >> id >> parent >> dev >> root >> mnt;
    if (mnt == path) return true;
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
    ::mount(bin.c_str(), bin.c_str(), nullptr, MS_BIND, nullptr);
    ::mount(nullptr, bin.c_str(), nullptr, MS_REMOUNT | MS_BIND | MS_RDONLY, nullptr);
    out["tmpfs_ro_bind"] = Skips(bin);
    ::umount2(bin.c_str(), MNT_DETACH);

    UniqueFd original(::open(bin.c_str(), O_RDONLY | O_CLOEXEC));
    auto r = ServeFromReadOnlyRamfs(bin, root + "/ramfs");
    out["serve"] = r.ok() ? "ok" : r.error().ToString();
    out["ramfs"] = Skips(bin);
    std::ifstream in(bin);
    std::stringstream content;
    content << in.rdbuf();
    out["content"] = content.str() == "#!/bin/sh\necho the binary\n" ? "same" : content.str();
    int w = ::open(bin.c_str(), O_WRONLY | O_CLOEXEC);
    out["write"] = w < 0 ? std::strerror(errno) : "opened";
    struct stat st {};
    ::fstat(original.get(), &st);
    out["original_size"] = std::to_string(st.st_size);
    out["executable"] = ::access(bin.c_str(), X_OK) == 0 ? "yes" : "no";
  });
  ASSERT_EQ(out.count("child"), 0u) << out["child"];
  EXPECT_EQ(out["tmpfs"], "no");
  EXPECT_EQ(out["tmpfs_ro_bind"], "no");
  EXPECT_EQ(out["serve"], "ok");
  EXPECT_EQ(out["ramfs"], "yes");
  EXPECT_EQ(out["content"], "same");
  EXPECT_EQ(out["write"], std::strerror(EROFS));
  EXPECT_EQ(out["original_size"], "0") << "the initramfs copy is emptied";
  EXPECT_EQ(out["executable"], "yes");
}

TEST_F(Pid1MountsTest, BadPathsAreClearErrorsAndMountNothing) {
  auto out = InPrivateMounts([](const std::string& root, auto& out) {
    const std::string dir = root + "/not-a-file";
    ::mkdir(dir.c_str(), 0755);
    auto r = ServeFromReadOnlyRamfs(dir, root + "/ramfs");
    out["serve"] = r.ok() ? "ok" : r.error().ToString();
    out["ramfs_mounted"] = IsMountPoint(root + "/ramfs") ? "yes" : "no";
    auto missing = ServeFromReadOnlyRamfs(root + "/missing", root + "/ramfs2");
    out["missing"] = missing.ok() ? "ok" : missing.error().ToString();
  });
  ASSERT_EQ(out.count("child"), 0u) << out["child"];
  EXPECT_NE(out["serve"].find("Is a directory"), std::string::npos) << out["serve"];
  EXPECT_EQ(out["ramfs_mounted"], "no");
  EXPECT_NE(out["missing"].find("open"), std::string::npos) << out["missing"];
}

}  // namespace
}  // namespace peapod::agent
