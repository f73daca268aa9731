#include "common/base/unique_fd.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <csignal>

namespace peapod {
namespace {

bool IsOpen(int fd) { return ::fcntl(fd, F_GETFD) >= 0; }

TEST(UniqueFd, ClosesOnceOnDestructionAndMove) {
  int raw;
  {
    UniqueFd a(::open("/dev/null", O_RDONLY | O_CLOEXEC));
    raw = a.get();
    ASSERT_TRUE(IsOpen(raw));
    UniqueFd b = std::move(a);
    EXPECT_FALSE(a.valid());
    EXPECT_EQ(b.get(), raw);
  }
  EXPECT_FALSE(IsOpen(raw));
}

TEST(UniqueFd, ReleaseGivesUpOwnership) {
  UniqueFd a(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  int raw = a.Release();
  a.Reset();
  EXPECT_TRUE(IsOpen(raw));
  ::close(raw);
}

TEST(UnixSockets, ErrorsSayWhatFailed) {
  auto r = ConnectUnix("/nonexistent/dir/x.sock");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Code::kNotFound);
  EXPECT_NE(r.error().ToString().find("/nonexistent/dir/x.sock"), std::string::npos);
  auto too_long = ListenUnix(std::string(200, 'a'));
  ASSERT_FALSE(too_long.ok());
  EXPECT_EQ(too_long.error().code(), Code::kInvalidArgument);
}

TEST(Pidfd, SignalAndWaitChild) {
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    ::pause();
    ::_exit(0);
  }
  auto p = Pidfd::Open(pid);
  ASSERT_TRUE(p.ok()) << p.error().ToString();
  auto not_yet = p->Wait(/*nohang=*/true);
  ASSERT_TRUE(not_yet.ok());
  EXPECT_FALSE(not_yet->has_value());
  ASSERT_TRUE(p->Signal(SIGKILL).ok());
  auto st = p->Wait();
  ASSERT_TRUE(st.ok());
  ASSERT_TRUE(st->has_value());
  EXPECT_TRUE(WIFSIGNALED(**st));
  EXPECT_EQ(WTERMSIG(**st), SIGKILL);
}

TEST(Pidfd, ExitStatus) {
  pid_t pid = ::fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) ::_exit(3);
  auto p = Pidfd::Open(pid);
  ASSERT_TRUE(p.ok());
  auto st = p->Wait();
  ASSERT_TRUE(st.ok() && st->has_value());
  EXPECT_TRUE(WIFEXITED(**st));
  EXPECT_EQ(WEXITSTATUS(**st), 3);
}

}  // namespace
}  // namespace peapod
