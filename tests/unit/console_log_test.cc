// The cap on the guests' console logs: cut past the cap, the newest half kept, and a writer
// that appends (QEMU, through libvirt's append='on') goes on at the new end.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <sstream>

#include "common/base/unique_fd.h"
#include "sandboxer/console_log.h"

namespace peapod::sandboxer {
namespace {

namespace fs = std::filesystem;

std::string Slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// Distinct bytes at every offset, so a wrong slice shows.
std::string Pattern(size_t n) {
  std::string s(n, '\0');
  for (size_t i = 0; i < n; ++i) s[i] = static_cast<char>('a' + (i * 7 + i / 26) % 26);
  return s;
}

class ConsoleLogTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/ppconsole-XXXXXX";
    root_ = ::mkdtemp(tmpl);
    pod_ = root_ + "/pods/p1";
    fs::create_directories(pod_);
  }
  void TearDown() override { fs::remove_all(root_); }
  UniqueFd Dir(const std::string& path) {
    return UniqueFd(::open(path.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  }
  std::string root_, pod_;
};

TEST_F(ConsoleLogTest, AnAppendedLogPastTheCapIsCutAndTheWriterGoesOn) {
  constexpr uint64_t kCap = 64 * 1024;
  std::string log = pod_ + "/console.log";
  // Opened as libvirt opens it for QEMU with append='on'.
  UniqueFd qemu(::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600));
  ASSERT_TRUE(qemu);
  std::string first = Pattern(3 * kCap + 123);
  ASSERT_TRUE(WriteAll(qemu.get(), first.data(), first.size()).ok());

  auto dir = Dir(pod_);
  auto cut = CapConsoleLog(dir.get(), "console.log", kCap);
  ASSERT_TRUE(cut.ok()) << cut.error().ToString();
  EXPECT_TRUE(*cut);
  EXPECT_EQ(fs::file_size(log), 0u);
  EXPECT_EQ(Slurp(log + ".1"), first.substr(first.size() - kCap / 2));
  EXPECT_FALSE(fs::exists(log + ".1.tmp"));

  // QEMU's next write lands at the start of the cut file, not at its old offset.
  ASSERT_TRUE(WriteAll(qemu.get(), "after", 5).ok());
  EXPECT_EQ(Slurp(log), "after");

  // Under the cap, nothing happens.
  cut = CapConsoleLog(dir.get(), "console.log", kCap);
  ASSERT_TRUE(cut.ok());
  EXPECT_FALSE(*cut);
  EXPECT_EQ(Slurp(log), "after");
}

TEST_F(ConsoleLogTest, ASymlinkOrAFifoIsNotFollowedOrTouched) {
  std::string target = root_ + "/host-file";
  std::string big = Pattern(8192);
  std::ofstream(target, std::ios::binary) << big;
  fs::create_symlink(target, pod_ + "/console.log");
  auto dir = Dir(pod_);
  auto cut = CapConsoleLog(dir.get(), "console.log", 1024);
  EXPECT_FALSE(cut.ok());
  EXPECT_EQ(Slurp(target), big);
  EXPECT_FALSE(fs::exists(pod_ + "/console.log.1"));

  fs::remove(pod_ + "/console.log");
  ASSERT_EQ(::mkfifo((pod_ + "/console.log").c_str(), 0600), 0);
  cut = CapConsoleLog(dir.get(), "console.log", 1024);  // must not block
  EXPECT_FALSE(cut.ok());
  // A missing log is no error: the VM has not started yet.
  fs::remove(pod_ + "/console.log");
  cut = CapConsoleLog(dir.get(), "console.log", 1024);
  ASSERT_TRUE(cut.ok());
  EXPECT_FALSE(*cut);
}

TEST_F(ConsoleLogTest, TheSweepCutsEveryPodAndPoolLog) {
  std::string pool = root_ + "/pool/pool-abc";
  fs::create_directories(pool);
  fs::create_directories(root_ + "/pods/p2");  // no log yet
  std::ofstream(pod_ + "/console.log", std::ios::binary) << Pattern(5000);
  std::ofstream(pool + "/console.log", std::ios::binary) << Pattern(5000);
  std::ofstream(root_ + "/pods/p3-small.log") << "a file, not a pod dir";
  EXPECT_EQ(CapConsoleLogs({root_ + "/pods", root_ + "/pool", root_ + "/none"}, 1000), 2u);
  EXPECT_EQ(fs::file_size(pod_ + "/console.log"), 0u);
  EXPECT_EQ(fs::file_size(pool + "/console.log.1"), 500u);
  // Stateless: a second sweep (or a restarted sandboxer) finds nothing to do.
  EXPECT_EQ(CapConsoleLogs({root_ + "/pods", root_ + "/pool"}, 1000), 0u);
}

}  // namespace
}  // namespace peapod::sandboxer
