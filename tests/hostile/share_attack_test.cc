// A hostile guest against the pod share, played on the host: what the guest can do to the
// share (write inside writable volumes, through QEMU's 9p server acting for it) done directly,
// then the host's own operations — binding volumes, releasing a container, removing the pod —
// checked against a canary tree outside the pod and the host mount table. Needs root (mounts),
// so it is labelled root and hostile and skips without it. The same attacks from inside a real
// VM are in tests/vm/sandboxer_test.cc (Hostile*).
#include <fcntl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>

#include <gtest/gtest.h>

#include "common/base/beneath.h"
#include "common/base/mountinfo.h"
#include "sandboxer/pod_share.h"
#include "sandboxer/storage.h"

namespace peapod::sandboxer {
namespace {

namespace fs = std::filesystem;

std::string Slurp(const std::string& path) {
  std::ifstream f(path);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

class ShareAttackTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (::geteuid() != 0) GTEST_SKIP() << "needs root (mounts)";
    dir_ = "/tmp/peapod-share-attack-" + std::to_string(::getpid());
    fs::remove_all(dir_);
    fs::create_directories(dir_ + "/pods");
    run_ = dir_ + "/pods/pod1";
    canary_ = dir_ + "/canary";
    fs::create_directories(canary_ + "/c1");  // a name the host would use below volumes/
    std::ofstream(canary_ + "/precious") << "host data\n";
    std::ofstream(canary_ + "/c1/0") << "host data\n";
    volume_ = dir_ + "/volume";
    fs::create_directories(volume_);
    ASSERT_TRUE(PrepareShare(run_).ok());
  }

  void TearDown() override {
    if (dir_.empty()) return;
    (void)RemoveTreeSafely(run_);
    for (int i = 0; i < 4; ++i) {
      for (const auto& m : MountsUnder(dir_, false)) ::umount2(m.path.c_str(), MNT_DETACH);
    }
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  // The canary is as SetUp made it, and nothing outside the pod's run dir is mounted.
  void ExpectCanaryIntact() {
    EXPECT_EQ(Slurp(canary_ + "/precious"), "host data\n");
    EXPECT_EQ(Slurp(canary_ + "/c1/0"), "host data\n");
    size_t entries = 0;
    for (auto it = fs::recursive_directory_iterator(canary_); it != fs::end(it); ++it) ++entries;
    EXPECT_EQ(entries, 3u) << "something was created in or removed from the canary";
    for (const auto& m : MountsUnder(dir_, false)) {
      EXPECT_EQ(m.path.rfind(run_ + "/", 0), 0u) << "mount outside the pod: " << m.path;
    }
  }

  Result<SharedVolumes> Share(const std::string& container, std::vector<VolumeRequest> v,
                              size_t first = 0) {
    return ShareVolumesNow(run_, container, first, v, dir_ + "/pods");
  }

  std::string dir_, run_, canary_, volume_;
};

TEST_F(ShareAttackTest, TheShareIsReadOnlyNosuidNodevAndOnlyRootCanEnterTheRunDir) {
  struct stat st {};
  ASSERT_EQ(::stat(run_.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0700u);
  ASSERT_EQ(::stat((run_ + "/host").c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 07777, 0700u);
  struct statvfs vfs {};
  ASSERT_EQ(::statvfs((run_ + "/share").c_str(), &vfs), 0);
  EXPECT_TRUE(vfs.f_flag & ST_RDONLY);
  EXPECT_TRUE(vfs.f_flag & ST_NOSUID);
  EXPECT_TRUE(vfs.f_flag & ST_NODEV);
  // What a guest would try through 9p (QEMU acts as root on the host): every change is refused.
  std::string share = run_ + "/share";
  ASSERT_TRUE(WriteShareFile(run_, "hosts", "127.0.0.1 localhost\n").ok());
  EXPECT_EQ(Slurp(share + "/hosts"), "127.0.0.1 localhost\n");
  EXPECT_NE(::symlink(canary_.c_str(), (share + "/planted").c_str()), 0);
  EXPECT_EQ(errno, EROFS);
  EXPECT_NE(::mkdir((share + "/volumes").c_str(), 0755), 0);
  EXPECT_EQ(errno, EROFS);
  EXPECT_NE(::rename((share + "/hosts").c_str(), (share + "/h2").c_str()), 0);
  EXPECT_NE(::chmod((share + "/hosts").c_str(), 04755), 0);
  EXPECT_FALSE(std::ofstream(share + "/hosts", std::ios::app).good());
  ASSERT_TRUE(PrepareShare(run_).ok()) << "idempotent";
  EXPECT_EQ(MountsUnder(run_, false).size(), 1u) << "the share was mounted twice";
  ExpectCanaryIntact();
}

TEST_F(ShareAttackTest, AGuestCannotRedirectBindsOrRemovalThroughSymlinks) {
  auto shared = Share("c1", {{volume_, false, false}});
  ASSERT_TRUE(shared.ok()) << shared.error().ToString();
  std::string share = run_ + "/share";
  std::string in_share = share + "/volumes/c1/0";
  // The guest writes inside its writable volume (that is what a volume is for) ...
  std::ofstream(in_share + "/data") << "guest data\n";
  EXPECT_EQ(Slurp(volume_ + "/data"), "guest data\n");
  // ... and plants symlinks to host paths there, and tries to rename the directories the host
  // walks (the attack of Kata's CVE-2020-2026): the share refuses.
  ASSERT_EQ(::symlink(canary_.c_str(), (in_share + "/evil").c_str()), 0);
  ASSERT_EQ(::symlink(canary_.c_str(), (in_share + "/1").c_str()), 0);
  EXPECT_NE(::rename((share + "/volumes").c_str(), (share + "/v2").c_str()), 0);
  EXPECT_NE(::rename((share + "/volumes/c1").c_str(), (share + "/volumes/c2").c_str()), 0);
  EXPECT_NE(::symlink(canary_.c_str(), (share + "/volumes/c2").c_str()), 0);
  EXPECT_NE(::symlink(canary_.c_str(), (share + "/volumes/c1/1").c_str()), 0);
  // A device node and a setuid file the guest makes in a volume are inert through the share.
  ASSERT_EQ(::mknod((in_share + "/null").c_str(), S_IFCHR | 0666, makedev(1, 3)), 0);
  EXPECT_LT(::open((in_share + "/null").c_str(), O_RDWR), 0) << "device usable via the share";
  EXPECT_EQ(errno, EACCES);
  struct statvfs vfs {};
  ASSERT_EQ(::statvfs(in_share.c_str(), &vfs), 0);
  EXPECT_TRUE(vfs.f_flag & ST_NOSUID);
  EXPECT_TRUE(vfs.f_flag & ST_NODEV);

  // A second batch of volumes for the same container, then release and pod removal.
  auto more = Share("c1", {{volume_, true, false}}, shared->rels.size());
  ASSERT_TRUE(more.ok()) << more.error().ToString();
  EXPECT_EQ(more->guest[0].guest_path, std::string(kGuestShareDir) + "/volumes/c1/1");
  EXPECT_FALSE(std::ofstream(share + "/volumes/c1/1/x").good()) << "read-only volume writable";
  ASSERT_TRUE(RemoveFromShare(run_, "volumes/c1").ok());
  EXPECT_FALSE(fs::exists(run_ + "/host/volumes/c1"));
  EXPECT_EQ(MountsUnder(run_, false).size(), 1u) << "only the share itself stays mounted";
  EXPECT_EQ(Slurp(volume_ + "/data"), "guest data\n") << "release deleted volume data";
  EXPECT_TRUE(fs::is_symlink(volume_ + "/evil")) << "release touched the volume's content";
  ASSERT_TRUE(RemoveTreeSafely(run_).ok());
  EXPECT_FALSE(fs::exists(run_));
  EXPECT_EQ(Slurp(volume_ + "/data"), "guest data\n");
  ExpectCanaryIntact();
}

// Propagation. A volume on a shared host mount (kubelet's directories, and / under systemd):
// - asked rslave/rshared, mounts the host makes below it later reach the guest (critest's rslave
//   case), and releasing the volume never unmounts the host's own mounts (a peer's unmount
//   would: the bind is a slave, never a peer);
// - by default (Kubernetes' None, rprivate), later host mounts never reach the guest: they would
//   come in with their own flags, writable under a read-only volume.
TEST_F(ShareAttackTest, LaterHostMountsReachTheGuestOnlyWhenAskedAndReleaseNeverUnmountsThem) {
  ASSERT_EQ(::mount(volume_.c_str(), volume_.c_str(), nullptr, MS_BIND, nullptr), 0);
  ASSERT_EQ(::mount(nullptr, volume_.c_str(), nullptr, MS_SHARED, nullptr), 0);
  VolumeRequest slave{volume_, /*readonly=*/true, false, /*propagate_from_host=*/true};
  VolumeRequest priv{volume_, /*readonly=*/true, false, false};
  auto shared = Share("c1", {slave, priv});
  ASSERT_TRUE(shared.ok()) << shared.error().ToString();
  fs::create_directories(volume_ + "/later");
  ASSERT_EQ(::mount("none", (volume_ + "/later").c_str(), "tmpfs", 0, "size=1m"), 0);
  std::ofstream(volume_ + "/later/marker") << "later\n";
  EXPECT_EQ(Slurp(run_ + "/share/volumes/c1/0/later/marker"), "later\n");
  EXPECT_FALSE(fs::exists(run_ + "/share/volumes/c1/1/later/marker"))
      << "a later host mount reached a private volume";
  EXPECT_FALSE(std::ofstream(run_ + "/share/volumes/c1/1/later/x").good());
  ASSERT_TRUE(RemoveFromShare(run_, "volumes/c1").ok());
  EXPECT_EQ(Slurp(volume_ + "/later/marker"), "later\n")
      << "releasing the volume unmounted the host's own mount below it";
  ASSERT_TRUE(RemoveTreeSafely(run_).ok());
  EXPECT_EQ(Slurp(volume_ + "/later/marker"), "later\n");
  ::umount2((volume_ + "/later").c_str(), MNT_DETACH);
  ::umount2(volume_.c_str(), MNT_DETACH);
  ExpectCanaryIntact();
}

// A name already mounted (a pod record that fell behind its mounts) is skipped, never unmounted:
// it may be a running container's volume.
TEST_F(ShareAttackTest, ANameInUseIsSkippedNotUnmounted) {
  std::ofstream(volume_ + "/data") << "first\n";
  auto first = Share("c1", {{volume_, false, false}});
  ASSERT_TRUE(first.ok()) << first.error().ToString();
  auto again = Share("c1", {{canary_, true, false}}, /*first=*/0);
  ASSERT_TRUE(again.ok()) << again.error().ToString();
  EXPECT_EQ(again->rels[0], "volumes/c1/1");
  EXPECT_EQ(Slurp(run_ + "/share/volumes/c1/0/data"), "first\n");
  ASSERT_TRUE(RemoveFromShare(run_, "volumes/c1").ok());
  ExpectCanaryIntact();
}

// The host's own tree, were something to put a symlink in it anyway (a bug, an older layout):
// binds and removal refuse it rather than follow it out of the pod.
TEST_F(ShareAttackTest, SymlinksInTheHostTreeAreNeverFollowed) {
  ASSERT_EQ(::mkdir((run_ + "/host/volumes").c_str(), 0700), 0);
  ASSERT_EQ(::symlink(canary_.c_str(), (run_ + "/host/volumes/c1").c_str()), 0);
  auto shared = Share("c1", {{volume_, false, false}});
  ASSERT_FALSE(shared.ok());
  EXPECT_EQ(shared.error().code(), Code::kPermissionDenied) << shared.error().ToString();
  ExpectCanaryIntact();
  ASSERT_TRUE(RemoveFromShare(run_, "volumes/c1").ok());
  EXPECT_FALSE(fs::is_symlink(run_ + "/host/volumes/c1")) << "the symlink itself is removed";
  ASSERT_EQ(::symlink(canary_.c_str(), (run_ + "/host/volumes/c9").c_str()), 0);
  ASSERT_TRUE(RemoveTreeSafely(run_).ok());
  ExpectCanaryIntact();
}

// A mount below a volume, whose parent directory the guest (who can write the volume) keeps
// swapping for a symlink to the canary while the host shares the volume again and again: every
// share either binds the real mount or fails; none binds the canary.
TEST_F(ShareAttackTest, ARacedSymlinkAboveASubmountNeverBindsTheHostPath) {
  fs::create_directories(volume_ + "/a/b");
  ASSERT_EQ(::mount("none", (volume_ + "/a/b").c_str(), "tmpfs", 0, "size=1m"), 0);
  std::ofstream(volume_ + "/a/b/marker") << "the real submount\n";
  fs::create_directories(canary_ + "/b");  // what a/b would be through the symlink
  std::ofstream(canary_ + "/b/marker") << "host data\n";
  std::atomic<bool> stop{false};
  std::thread attacker([&] {
    std::string a = volume_ + "/a", moved = volume_ + "/a-moved";
    while (!stop) {
      if (::rename(a.c_str(), moved.c_str()) == 0) {
        (void)::symlink(canary_.c_str(), a.c_str());
        std::this_thread::yield();
        (void)::unlink(a.c_str());
        (void)::rename(moved.c_str(), a.c_str());
      }
    }
  });
  int bound_real = 0, refused = 0;
  for (int i = 0; i < 200; ++i) {
    auto r = Share("c" + std::to_string(i), {{volume_, false, false}});
    if (!r.ok()) {
      ++refused;
      continue;
    }
    for (const auto& sub : r->guest[0].submounts) {
      std::string host =
          run_ + "/share" + sub.guest_path.substr(std::string(kGuestShareDir).size());
      std::string marker = Slurp(host + "/marker");
      EXPECT_EQ(marker, "the real submount\n") << "bound " << sub.path << " from elsewhere";
      ++bound_real;
    }
    ASSERT_TRUE(RemoveFromShare(run_, "volumes/c" + std::to_string(i)).ok());
  }
  stop = true;
  attacker.join();
  std::printf("race: %d submounts bound (all the real one), %d shares refused\n", bound_real,
              refused);
  EXPECT_EQ(Slurp(canary_ + "/b/marker"), "host data\n");
  ::umount2((volume_ + "/a/b").c_str(), MNT_DETACH);
  fs::remove_all(canary_ + "/b");
  ExpectCanaryIntact();
}

}  // namespace
}  // namespace peapod::sandboxer
