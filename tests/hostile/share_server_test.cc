// The share's 9p server for confined VMs (sandboxer/share_server.h): only its VM's QEMU can
// reach it, it goes with that QEMU, and it cannot make device nodes, whatever the guest asks.
#include "sandboxer/share_server.h"

#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>

#include <gtest/gtest.h>

namespace peapod::sandboxer {
namespace {

namespace fs = std::filesystem;

constexpr uint32_t kUid = 0x78000001, kGid = 0x78000000;

class ShareServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (::geteuid() != 0) GTEST_SKIP() << "needs root (seccomp as root, chown, the helper)";
    dir_ = fs::temp_directory_path() / ("peapod-share-server-" + std::to_string(::getpid()));
    fs::create_directories(dir_ + "/share");
    fs::create_directories(dir_ + "/vm");
    ::chmod((dir_ + "/vm").c_str(), 0700);
  }
  void TearDown() override {
    if (!dir_.empty()) fs::remove_all(dir_);
  }
  std::string dir_;
};

// In a child: the filter, then each kind of node and mode. Exit bits say what went wrong.
int TryNodes(const std::string& dir) {
  if (!InstallShareServerFilter().ok()) return 1;
  int bad = 0;
  if (::mknod((dir + "/chr").c_str(), S_IFCHR | 0600, makedev(1, 3)) == 0 || errno != EPERM)
    bad |= 2;
  if (::mknodat(AT_FDCWD, (dir + "/blk").c_str(), S_IFBLK | 0600, makedev(8, 0)) == 0 ||
      errno != EPERM)
    bad |= 4;
  if (::mkfifo((dir + "/fifo").c_str(), 0600) != 0) bad |= 8;
  if (::mknod((dir + "/reg").c_str(), S_IFREG | 0600, 0) != 0) bad |= 16;
  std::string f = dir + "/file";
  if (::chmod(f.c_str(), 04755) == 0 || errno != EPERM) bad |= 32;
  if (::chmod(f.c_str(), 02755) == 0 || errno != EPERM) bad |= 32;
  if (::chmod(f.c_str(), 0755) != 0) bad |= 64;
  int fd = ::open((dir + "/suid").c_str(), O_WRONLY | O_CREAT, 04755);
  if (fd >= 0 || errno != EPERM) bad |= 128;
  fd = ::openat(AT_FDCWD, (dir + "/plain").c_str(), O_WRONLY | O_CREAT, 0644);
  if (fd < 0) bad |= 64;
  if (fd >= 0 && (::fchmod(fd, 06755) == 0 || errno != EPERM)) bad |= 32;
  return bad;
}

TEST_F(ShareServerTest, TheFilterRefusesDeviceNodesAndSetIdBitsEvenToRoot) {
  std::ofstream(dir_ + "/share/file") << "x";
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) ::_exit(TryNodes(dir_ + "/share"));
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 0)
      << "bits: 2 char device made, 4 block device made, 8 fifo refused, 16 regular file "
         "refused, 32 setuid/setgid chmod allowed, 64 a plain mode refused, 128 setuid create";
  EXPECT_FALSE(fs::exists(dir_ + "/share/chr"));
  EXPECT_FALSE(fs::exists(dir_ + "/share/blk"));
  EXPECT_TRUE(fs::is_fifo(dir_ + "/share/fifo"));
  EXPECT_FALSE(fs::exists(dir_ + "/share/suid"));
  EXPECT_EQ(fs::status(dir_ + "/share/file").permissions(), fs::perms(0755));
}

TEST_F(ShareServerTest, OnlyItsVmsUidReachesItAndItGoesWithThatConnection) {
  ShareServerSpec spec;
  if (::access(spec.helper.c_str(), X_OK) != 0) GTEST_SKIP() << spec.helper << " is missing";
  spec.export_dir = dir_ + "/share";
  spec.socket = dir_ + "/vm/9p";
  spec.uid = kUid;
  spec.gid = kGid;
  std::ofstream(spec.socket) << "stale";  // replaced, not a reason to fail
  auto pid = StartShareServer(spec);
  ASSERT_TRUE(pid.ok()) << pid.error().ToString();
  struct stat st {};
  ASSERT_EQ(::stat(spec.socket.c_str(), &st), 0);
  EXPECT_TRUE(S_ISSOCK(st.st_mode));
  EXPECT_EQ(st.st_uid, kUid);
  EXPECT_EQ(st.st_mode & 0777, 0700u) << "another pod VM (same group) could connect";
  ASSERT_EQ(::stat((dir_ + "/vm").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0710u);
  EXPECT_EQ(st.st_gid, kGid);

  // Another uid of the group is refused; the VM's own uid connects.
  auto connect_as = [&](uint32_t uid) {
    pid_t c = ::fork();
    if (c == 0) {
      if (::setgroups(0, nullptr) < 0 || ::setgid(kGid) < 0 || ::setuid(uid) < 0) ::_exit(3);
      int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
      sockaddr_un addr{};
      addr.sun_family = AF_UNIX;
      std::snprintf(addr.sun_path, sizeof(addr.sun_path), "%s", spec.socket.c_str());
      if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) < 0) ::_exit(1);
      ::usleep(200 * 1000);
      ::_exit(0);  // closes the connection, as a QEMU that exits does
    }
    int status = 0;
    ::waitpid(c, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  };
  EXPECT_EQ(connect_as(kUid + 1), 1) << "another VM's uid reached the share server";
  EXPECT_EQ(connect_as(kUid), 0);
  // Its QEMU gone, it goes too.
  bool gone = false;
  for (int i = 0; i < 300 && !gone; ++i) {
    gone = ::waitpid(*pid, nullptr, WNOHANG) == *pid;
    if (!gone) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_TRUE(gone) << "the share server outlived its only connection";
  if (!gone) {
    ::kill(*pid, SIGKILL);
    ::waitpid(*pid, nullptr, 0);
  }
}

}  // namespace
}  // namespace peapod::sandboxer
