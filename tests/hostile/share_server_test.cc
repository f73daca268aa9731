// The share's 9p server for confined VMs (sandboxer/share_server.h): only its VM's QEMU can
// reach it, it goes with that QEMU, and it cannot make device nodes, whatever the guest asks.
#include "sandboxer/share_server.h"
#include "sandboxer/vm_identity.h"

#include <fcntl.h>
#include <grp.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
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

// In a child: the filter, then each attempt in turn. Returns 0, or the number of the first
// check that went wrong (see kChecks).
const char* const kChecks[] = {
    "",
    "the filter did not install",
    "a character device was made",
    "a block device was made",
    "a FIFO was refused",
    "a regular file (mknod) was refused",
    "a setuid regular file was made by mknod",
    "chmod 04755 was allowed",
    "chmod 02755 was allowed",
    "chmod 0755 was refused",
    "a setuid file was created by open",
    "a plain create was refused",
    "fchmod 06755 was allowed",
    "kill of another process was allowed",
    "ptrace was allowed",
    "openat2 was not refused with ENOSYS",
};

int TryNodes(const std::string& dir) {
  if (!InstallShareServerFilter().ok()) return 1;
  if (::mknod((dir + "/chr").c_str(), S_IFCHR | 0600, makedev(1, 3)) == 0 || errno != EPERM)
    return 2;
  if (::mknodat(AT_FDCWD, (dir + "/blk").c_str(), S_IFBLK | 0600, makedev(8, 0)) == 0 ||
      errno != EPERM)
    return 3;
  if (::mkfifo((dir + "/fifo").c_str(), 0600) != 0) return 4;
  if (::mknod((dir + "/reg").c_str(), S_IFREG | 0600, 0) != 0) return 5;
  if (::mknod((dir + "/sreg").c_str(), S_IFREG | S_ISUID | 0755, 0) == 0 || errno != EPERM)
    return 6;
  std::string f = dir + "/file";
  if (::chmod(f.c_str(), 04755) == 0 || errno != EPERM) return 7;
  if (::chmod(f.c_str(), 02755) == 0 || errno != EPERM) return 8;
  if (::chmod(f.c_str(), 0755) != 0) return 9;
  int fd = ::open((dir + "/suid").c_str(), O_WRONLY | O_CREAT, 04755);
  if (fd >= 0 || errno != EPERM) return 10;
  fd = ::openat(AT_FDCWD, (dir + "/plain").c_str(), O_WRONLY | O_CREAT, 0644);
  if (fd < 0) return 11;
  if (::fchmod(fd, 06755) == 0 || errno != EPERM) return 12;
  if (::kill(::getppid(), 0) == 0 || errno != EPERM) return 13;
  if (::syscall(SYS_ptrace, 0 /* PTRACE_TRACEME */, 0, 0, 0) == 0 || errno != EPERM) return 14;
  if (::syscall(SYS_openat2, AT_FDCWD, f.c_str(), nullptr, 0) == 0 || errno != ENOSYS) return 15;
  return 0;
}

TEST_F(ShareServerTest, TheFilterRefusesDeviceNodesAndSetIdBitsEvenToRoot) {
  std::ofstream(dir_ + "/share/file") << "x";
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) ::_exit(TryNodes(dir_ + "/share"));
  int status = 0;
  ASSERT_EQ(::waitpid(pid, &status, 0), pid);
  ASSERT_TRUE(WIFEXITED(status));
  int failed = WEXITSTATUS(status);
  ASSERT_LT(failed, static_cast<int>(std::size(kChecks)));
  EXPECT_EQ(failed, 0) << kChecks[failed];
  EXPECT_FALSE(fs::exists(dir_ + "/share/chr"));
  EXPECT_FALSE(fs::exists(dir_ + "/share/blk"));
  EXPECT_TRUE(fs::is_fifo(dir_ + "/share/fifo"));
  EXPECT_FALSE(fs::exists(dir_ + "/share/suid"));
  EXPECT_FALSE(fs::exists(dir_ + "/share/sreg"));
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

// VM uids: one per VM, never shared with a live process, freed with the VM's files only.
TEST_F(ShareServerTest, AVmUidIsNeverHandedOutWhileAProcessStillRunsAsIt) {
  // A range no other test runs processes in: ctest runs this file's tests in parallel, and
  // a share server another test starts as kUid would (rightly) hold that uid.
  constexpr uint32_t kBase = 0x78100000;
  fs::create_directories(dir_ + "/state");
  fs::create_directories(dir_ + "/run");
  ::chmod(dir_.c_str(), 0711);
  VmIdentities ids(dir_ + "/state", dir_ + "/run", kBase, 4, kBase);
  ASSERT_TRUE(ids.Init({}, {}).ok());
  auto a = ids.Acquire("peapod-a");
  auto b = ids.Acquire("peapod-b");
  ASSERT_TRUE(a.ok() && b.ok()) << (a.ok() ? b.error().ToString() : a.error().ToString());
  EXPECT_EQ(*a, kBase + 1);
  EXPECT_EQ(*b, kBase + 2);
  struct stat st {};
  ASSERT_EQ(::stat(ids.StateDir("peapod-a").c_str(), &st), 0);
  EXPECT_EQ(st.st_uid, 0u) << "QEMU must not own (and so fill) its directory";
  EXPECT_EQ(st.st_mode & 07777, 0710u);
  ASSERT_EQ(::stat(ids.RunDir("peapod-a").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0700u) << "open to the group before the socket is the VM's";

  // A late cleanup names the uid it knew: a newer VM of the same name keeps its files.
  ids.Release("peapod-b", *a);
  EXPECT_EQ(ids.UidOf("peapod-b"), kBase + 2);

  // Released, the uid is free again, unless a process still runs as it (a QEMU being
  // destroyed after its files went).
  ids.Release("peapod-a");
  EXPECT_EQ(ids.UidOf("peapod-a"), 0u);
  pid_t lingering = ::fork();
  if (lingering == 0) {
    if (::setgid(kBase) < 0 || ::setuid(kBase + 1) < 0) ::_exit(1);
    ::pause();
    ::_exit(0);
  }
  for (int i = 0; i < 100; ++i) {  // until the child has become kBase + 1
    std::ifstream f("/proc/" + std::to_string(lingering) + "/status");
    std::string text((std::istreambuf_iterator<char>(f)), {});
    if (text.find(std::to_string(kBase + 1)) != std::string::npos) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  auto c = ids.Acquire("peapod-c");
  ::kill(lingering, SIGKILL);
  ::waitpid(lingering, nullptr, 0);
  ASSERT_TRUE(c.ok()) << c.error().ToString();
  EXPECT_EQ(*c, kBase + 3) << "a uid a live process holds was handed out";
  auto d = ids.Acquire("peapod-d");
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(*d, kBase + 1) << "the uid is free once its process is gone";
  EXPECT_TRUE(ids.Acquire("peapod-e").ok());
  auto f = ids.Acquire("peapod-f");
  EXPECT_FALSE(f.ok()) << "4 uids, 4 VMs: the fifth must be refused";
  if (!f.ok()) {
    EXPECT_EQ(f.error().code(), Code::kResourceExhausted);
  }

  // Recovery keeps the files of VMs that run and removes the others'.
  ids.Sweep({"peapod-c"});
  EXPECT_EQ(ids.UidOf("peapod-c"), kBase + 3);
  EXPECT_EQ(ids.UidOf("peapod-b"), 0u);
  EXPECT_FALSE(fs::exists(ids.StateDir("peapod-d")));
  EXPECT_FALSE(fs::exists(ids.StateDir("peapod-e")));
  EXPECT_FALSE(fs::exists(ids.RunDir("peapod-d")));
}

}  // namespace
}  // namespace peapod::sandboxer
