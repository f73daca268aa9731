// The sandboxer's pieces that need no VM: which layers containerd's mounts name, the mkfs.erofs
// layer cache (one build per layer, collection, rejection), safe removal of a pod's run dir, the
// config file, and what is read from containerd's CRI options.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mount.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <future>

#include "k8s/cri/v1/pod_sandbox_config.pb.h"
#include "sandboxer/config.h"
#include "sandboxer/controller_service.h"
#include "sandboxer/ksm.h"
#include "sandboxer/pod_cgroup.h"
#include "sandboxer/pod_share.h"
#include "sandboxer/storage.h"
#include "sandboxer/template.h"
#include "sandboxer/worker_pool.h"
#include "tests/unit/loop_fixture.h"

namespace peapod::sandboxer {
namespace {

namespace fs = std::filesystem;
using Mounts = google::protobuf::RepeatedPtrField<containerd::types::Mount>;
using namespace std::chrono_literals;

class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/peapod-storage-XXXXXX";
    path_ = ::mkdtemp(tmpl);
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

containerd::types::Mount MakeMount(const std::string& type, const std::string& source,
                                   std::vector<std::string> options) {
  containerd::types::Mount m;
  m.set_type(type);
  m.set_source(source);
  for (auto& o : options) m.add_options(o);
  return m;
}

TEST(LayersFromMountsTest, OverlayLowerdirsTopmostFirst) {
  TempDir t;
  Mounts mounts;
  *mounts.Add() = MakeMount(
      "overlay", "overlay",
      {"index=off", "workdir=/s/9/work", "upperdir=/s/9/fs", "lowerdir=/s/3/fs:/s/2/fs:/s/1/fs"});
  auto layers = LayersFromMounts(mounts);
  ASSERT_TRUE(layers.ok()) << layers.error().ToString();
  ASSERT_EQ(layers->size(), 3u);
  EXPECT_EQ((*layers)[0].path, "/s/3/fs");
  EXPECT_EQ((*layers)[2].path, "/s/1/fs");
  EXPECT_FALSE((*layers)[0].is_image);
}

TEST(LayersFromMountsTest, ErofsSnapshotterBlobsAreUsedAsTheyAre) {
  TempDir t;
  // The erofs snapshotter keeps snapshots/<n>/layer.erofs beside snapshots/<n>/fs.
  for (const char* n : {"1", "2"}) {
    fs::create_directories(t.path() + "/" + n + "/fs");
    std::ofstream(t.path() + "/" + n + "/layer.erofs") << "blob";
  }
  Mounts overlay;
  *overlay.Add() =
      MakeMount("overlay", "overlay", {"lowerdir=" + t.path() + "/2/fs:" + t.path() + "/1/fs"});
  auto layers = LayersFromMounts(overlay);
  ASSERT_TRUE(layers.ok()) << layers.error().ToString();
  ASSERT_EQ(layers->size(), 2u);
  EXPECT_EQ((*layers)[0].path, t.path() + "/2/layer.erofs");
  EXPECT_TRUE((*layers)[0].is_image);

  // A single-layer view as an erofs mount of the blob.
  Mounts erofs;
  *erofs.Add() = MakeMount("erofs", t.path() + "/1/layer.erofs", {"ro"});
  layers = LayersFromMounts(erofs);
  ASSERT_TRUE(layers.ok()) << layers.error().ToString();
  EXPECT_EQ((*layers)[0].path, t.path() + "/1/layer.erofs");
  EXPECT_TRUE((*layers)[0].is_image);

  Mounts multi;
  *multi.Add() = MakeMount("erofs", t.path() + "/1/layer.erofs", {"ro", "device=/x/2.erofs"});
  auto refused = LayersFromMounts(multi);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.error().message().find("device="), std::string::npos);
}

TEST(LayersFromMountsTest, BindOfOneLayerAndClearRefusals) {
  Mounts bind;
  *bind.Add() = MakeMount("bind", "/s/1/fs", {"rbind", "ro"});
  auto layers = LayersFromMounts(bind);
  ASSERT_TRUE(layers.ok());
  EXPECT_EQ((*layers)[0].path, "/s/1/fs");

  EXPECT_EQ(LayersFromMounts(Mounts()).error().code(), Code::kInvalidArgument);
  Mounts zfs;
  *zfs.Add() = MakeMount("zfs", "pool/ds", {});
  auto r = LayersFromMounts(zfs);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.error().message().find("overlayfs"), std::string::npos) << r.error().ToString();
  Mounts no_lower;
  *no_lower.Add() = MakeMount("overlay", "overlay", {"upperdir=/u", "workdir=/w"});
  EXPECT_EQ(LayersFromMounts(no_lower).error().code(), Code::kInvalidArgument);
}

class LayerCacheTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (std::system("command -v mkfs.erofs >/dev/null") != 0) {
      GTEST_SKIP() << "mkfs.erofs is not installed (erofs-utils)";
    }
    fs::create_directories(t_.path() + "/layer/etc");
    std::ofstream(t_.path() + "/layer/etc/hello") << "hello\n";
  }

  // Runs fn on the loop thread and waits.
  template <typename Fn>
  void OnLoop(Fn fn) {
    lt_.Sync(fn);
  }
  std::unique_ptr<LayerCache> MakeCache(std::chrono::seconds keep,
                                        std::string mkfs = "mkfs.erofs") {
    return std::make_unique<LayerCache>(
        t_.path() + "/cache", mkfs, keep, &workers_,
        [this](std::function<void()> fn) { lt_.loop()->Post(std::move(fn)); });
  }
  Result<std::string> Acquire(LayerCache& c, const std::string& dir) {
    std::promise<Result<std::string>> p;
    auto f = p.get_future();
    OnLoop([&] { c.Acquire(dir, [&](Result<std::string> r) { p.set_value(std::move(r)); }); });
    return f.get();
  }

  TempDir t_;
  WorkerPool workers_{2};
  peapod::testing::LoopThread lt_;
};

TEST_F(LayerCacheTest, ConcurrentRequestsForOneLayerBuildItOnce) {
  // A mkfs.erofs that counts its runs.
  std::string counter = t_.path() + "/runs";
  std::string wrapper = t_.path() + "/mkfs";
  std::ofstream(wrapper) << "#!/bin/sh\necho run >> " << counter
                         << "\nsleep 0.3\nexec mkfs.erofs \"$@\"\n";
  fs::permissions(wrapper, fs::perms::owner_all);
  auto cache = MakeCache(3600s, wrapper);
  ASSERT_TRUE(cache->Init().ok());
  std::vector<std::promise<Result<std::string>>> ps(4);
  OnLoop([&] {
    for (auto& p : ps) {
      cache->Acquire(t_.path() + "/layer", [&p](Result<std::string> r) { p.set_value(r); });
    }
  });
  std::string image;
  for (auto& p : ps) {
    auto r = p.get_future().get();
    ASSERT_TRUE(r.ok()) << r.error().ToString();
    if (image.empty()) image = *r;
    EXPECT_EQ(*r, image);
  }
  std::ifstream runs(counter);
  int n = 0;
  for (std::string l; std::getline(runs, l);) ++n;
  EXPECT_EQ(n, 1) << "one mkfs.erofs for four concurrent requests";
  EXPECT_TRUE(fs::is_regular_file(image));
  // A later request is served from the cache.
  ASSERT_TRUE(Acquire(*cache, t_.path() + "/layer").ok());
  runs = std::ifstream(counter);
  n = 0;
  for (std::string l; std::getline(runs, l);) ++n;
  EXPECT_EQ(n, 1);
}

TEST_F(LayerCacheTest, ContainerdBlobsAreCopiedOnceIntoTheCacheAndSymlinksRefused) {
  // An erofs snapshotter's blob lives in containerd's directories, which a confined QEMU
  // cannot pass: the cache holds a copy, made once, released like a built image.
  auto cache = MakeCache(0s);
  ASSERT_TRUE(cache->Init().ok());
  std::string blob = t_.path() + "/layer.erofs";
  std::string data(3 << 20, 'e');
  std::ofstream(blob) << data;
  auto copy = [&](const std::string& from) {
    std::promise<Result<std::string>> p;
    auto f = p.get_future();
    OnLoop([&] {
      cache->AcquireCopy(from, [&](Result<std::string> r) { p.set_value(std::move(r)); });
    });
    return f.get();
  };
  auto a = copy(blob);
  ASSERT_TRUE(a.ok()) << a.error().ToString();
  EXPECT_EQ(fs::path(*a).parent_path(), fs::path(t_.path() + "/cache"));
  EXPECT_EQ(fs::file_size(*a), data.size());
  std::ifstream in(*a);
  EXPECT_EQ(std::string(std::istreambuf_iterator<char>(in), {}), data);
  EXPECT_EQ((fs::status(*a).permissions() & fs::perms::others_read), fs::perms::others_read);
  auto b = copy(blob);
  ASSERT_TRUE(b.ok());
  EXPECT_EQ(*b, *a) << "one copy per blob";
  fs::create_symlink(blob, t_.path() + "/link.erofs");
  auto l = copy(t_.path() + "/link.erofs");
  EXPECT_FALSE(l.ok()) << "a symlinked blob must not be followed";
  OnLoop([&] {
    cache->Release(*a);
    cache->Release(*a);
    cache->Collect();
  });
  EXPECT_FALSE(fs::exists(*a)) << "the copy goes with its last user";
}

TEST_F(LayerCacheTest, UnusedImagesAreCollectedAfterTheirKeepTime) {
  auto cache = MakeCache(0s);
  ASSERT_TRUE(cache->Init().ok());
  auto a = Acquire(*cache, t_.path() + "/layer");
  auto b = Acquire(*cache, t_.path() + "/layer");
  ASSERT_TRUE(a.ok() && b.ok());
  OnLoop([&] {
    cache->Release(*a);
    cache->Collect();
  });
  EXPECT_TRUE(fs::exists(*a)) << "still used once";
  OnLoop([&] {
    cache->Release(*b);
    cache->Collect();
  });
  EXPECT_FALSE(fs::exists(*a));

  // Kept for an hour: survives collection, and a restart (Init) finds it again.
  auto kept = MakeCache(3600s);
  ASSERT_TRUE(kept->Init().ok());
  auto c = Acquire(*kept, t_.path() + "/layer");
  ASSERT_TRUE(c.ok());
  OnLoop([&] {
    kept->Release(*c);
    kept->Collect();
  });
  EXPECT_TRUE(fs::exists(*c));
  std::ofstream(t_.path() + "/cache/x.erofs.tmp-1234") << "half a build";
  auto again = MakeCache(3600s);
  ASSERT_TRUE(again->Init().ok());
  EXPECT_FALSE(fs::exists(t_.path() + "/cache/x.erofs.tmp-1234"));
  OnLoop([&] { EXPECT_TRUE(again->IsCached(*c)); });
}

TEST_F(LayerCacheTest, ALayerMkfsRejectsIsAClearErrorAndLeavesNothing) {
  auto cache = MakeCache(0s);
  ASSERT_TRUE(cache->Init().ok());
  std::ofstream(t_.path() + "/not-a-dir") << "x";
  auto r = Acquire(*cache, t_.path() + "/not-a-dir");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Code::kInvalidArgument);
  EXPECT_NE(r.error().message().find("mkfs.erofs rejected"), std::string::npos)
      << r.error().ToString();
  EXPECT_NE(r.error().message().find("not a directory"), std::string::npos) << r.error().ToString();
  EXPECT_TRUE(fs::is_empty(t_.path() + "/cache"));
  auto missing = Acquire(*cache, t_.path() + "/nope");
  EXPECT_EQ(missing.error().code(), Code::kNotFound) << missing.error().ToString();
}

TEST(RemoveTreeSafelyTest, UnmountsAndNeverDeletesThroughAMount) {
  if (::geteuid() != 0) GTEST_SKIP() << "needs root to bind-mount";
  TempDir t;
  std::string volume = t.path() + "/volume";
  fs::create_directories(volume);
  std::ofstream(volume + "/precious") << "data";
  std::string run = t.path() + "/run";
  ASSERT_TRUE(PrepareShare(run).ok());
  UniqueFd vfd(::open(volume.c_str(), O_PATH | O_CLOEXEC));
  ASSERT_TRUE(BindIntoShare(run, vfd.get(), "volumes/c1/0", false).ok());
  std::ofstream(t.path() + "/file") << "f";
  UniqueFd ffd(::open((t.path() + "/file").c_str(), O_PATH | O_CLOEXEC));
  ASSERT_TRUE(BindIntoShare(run, ffd.get(), "volumes/c1/1", true).ok());
  EXPECT_FALSE(std::ofstream(run + "/share/volumes/c1/1").good()) << "read-only bind is writable";
  EXPECT_TRUE(fs::exists(run + "/share/volumes/c1/0/precious"));
  ASSERT_TRUE(RemoveTreeSafely(run).ok());
  EXPECT_FALSE(fs::exists(run));
  EXPECT_TRUE(fs::exists(volume + "/precious")) << "deleted through the bind mount";
  EXPECT_TRUE(fs::exists(t.path() + "/file"));
  EXPECT_TRUE(RemoveTreeSafely(run).ok()) << "idempotent";
}

TEST(KsmTest, StartsAStoppedKsmOnceAndSaysWhyItCannot) {
  TempDir t;
  std::string run = t.path() + "/run";
  std::ofstream(run) << "0\n";
  auto first = StartKsm(run);
  ASSERT_TRUE(first.ok()) << first.error().ToString();
  EXPECT_TRUE(*first);
  std::ifstream in(run);
  int v = -1;
  in >> v;
  EXPECT_EQ(v, 1);
  auto again = StartKsm(run);
  ASSERT_TRUE(again.ok());
  EXPECT_FALSE(*again) << "already running";
  auto missing = StartKsm(t.path() + "/no-ksm/run");
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.error().message().find("\"ksm\": false"), std::string::npos);
}

TEST(ConfigTest, ReadsKeysAndRefusesUnknownOnes) {
  TempDir t;
  std::string path = t.path() + "/c.json";
  std::ofstream(path) << R"({"memory_mib": 256, "memory_overhead_mib": 64,
                            "layer_cache_keep_seconds": 5, "shim_listen": "/x/shim.sock",
                            "ksm": true})";
  auto c = Config::Load(path, true);
  ASSERT_TRUE(c.ok()) << c.error().ToString();
  EXPECT_EQ(c->memory_mib, 256u);
  EXPECT_EQ(c->memory_overhead_mib, 64u);
  EXPECT_EQ(c->layer_cache_keep_seconds, 5u);
  EXPECT_EQ(c->shim_listen, "/x/shim.sock");
  EXPECT_TRUE(c->ksm);
  EXPECT_EQ(c->scratch_size_mib, 10240u);
  std::ofstream(path) << R"({"memroy_mib": 256})";
  auto bad = Config::Load(path, true);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.error().message().find("memroy_mib"), std::string::npos);
  std::ofstream(path) << R"({"vcpus": "two"})";
  EXPECT_NE(Config::Load(path, true).error().message().find("vcpus"), std::string::npos);
  std::ofstream(path) << R"({"run_dir": "/a/very/long/run/directory/for/peapod"})";
  auto long_dir = Config::Load(path, true);
  ASSERT_FALSE(long_dir.ok());
  EXPECT_NE(long_dir.error().message().find("too long"), std::string::npos);
  EXPECT_TRUE(Config::Load(t.path() + "/missing.json", false).ok());
  EXPECT_FALSE(Config::Load(t.path() + "/missing.json", true).ok());
  EXPECT_EQ(Config::Load(t.path() + "/missing.json", false)->start_from, "template");
  std::ofstream(path) << R"({"start_from": "snapshot"})";
  auto from = Config::Load(path, true);
  ASSERT_FALSE(from.ok());
  EXPECT_NE(from.error().message().find("start_from must be template or boot"), std::string::npos);
  EXPECT_EQ(Config::Load(t.path() + "/missing.json", false)->guest_huge_pages, "auto");
  std::ofstream(path) << R"({"guest_huge_pages": "off"})";
  EXPECT_EQ(Config::Load(path, true)->guest_huge_pages, "off");
  std::ofstream(path) << R"({"guest_huge_pages": "never"})";
  auto thp = Config::Load(path, true);
  ASSERT_FALSE(thp.ok());
  EXPECT_NE(thp.error().message().find("guest_huge_pages must be auto, on or off"),
            std::string::npos);
}

// The template's files: keyed by every input, and refused (saying why) when the key, size or
// bytes do not match.
TEST(TemplateTest, AKeyChangesWithItsInputsAndABadStateIsRefused) {
  TempDir t;
  std::ofstream(t.path() + "/vmlinux") << "kernel";
  std::ofstream(t.path() + "/initrd") << "initrd";
  VmSpec s;
  s.kernel = t.path() + "/vmlinux";
  s.initrd = t.path() + "/initrd";
  s.cmdline = "console=ttyS0";
  s.tap = "pp0";
  s.disks.push_back({.path = t.path() + "/scratch.img", .unit = 0, .readonly = false});
  const std::string qemu = "/proc/self/exe";  // any file: its size and mtime are keyed
  auto k1 = TemplateKey(s, 1024, qemu);
  ASSERT_TRUE(k1.ok()) << k1.error().ToString();
  EXPECT_EQ(k1->size(), 64u);
  EXPECT_EQ(*TemplateKey(s, 1024, qemu), *k1) << "the same inputs, the same key";
  EXPECT_NE(*TemplateKey(s, 2048, qemu), *k1) << "scratch size";
  auto other = s;
  other.memory_mib = 1024;
  EXPECT_NE(*TemplateKey(other, 1024, qemu), *k1) << "memory";
  other = s;
  other.tap.clear();
  EXPECT_NE(*TemplateKey(other, 1024, qemu), *k1) << "NIC";
  other = s;
  other.share_dir = "/run/share";
  auto qemu_share = *TemplateKey(other, 1024, qemu);
  other.share_socket = "/run/vm/9p";  // a confined VM: the share through the 9p proxy
  EXPECT_NE(*TemplateKey(other, 1024, qemu), qemu_share) << "share proxy";
  std::ofstream(t.path() + "/initrd", std::ios::app) << '\0';
  EXPECT_NE(*TemplateKey(s, 1024, qemu), *k1) << "initrd bytes";
  EXPECT_FALSE(TemplateKey(s, 1024, t.path() + "/no-qemu").ok());

  std::string dir = t.path() + "/tpl";
  fs::create_directories(dir);
  EXPECT_EQ(LoadTemplate(dir, *k1).error().code(), Code::kNotFound);
  std::ofstream(dir + "/state") << std::string(4096, 's');
  ASSERT_TRUE(WriteTemplateManifest(dir, *k1, "02:00:00:00:00:01").ok());
  auto loaded = LoadTemplate(dir, *k1);
  ASSERT_TRUE(loaded.ok()) << loaded.error().ToString();
  EXPECT_EQ(loaded->state, dir + "/state");
  EXPECT_EQ(loaded->mac, "02:00:00:00:00:01");
  struct stat st {};
  ASSERT_EQ(::stat((dir + "/state").c_str(), &st), 0);
  EXPECT_EQ(loaded->identity, FileIdentity(st)) << "what a restore must still find";
  // A state that is a link (to a file that would pass) is not followed.
  fs::rename(dir + "/state", dir + "/real");
  fs::create_symlink(dir + "/real", dir + "/state");
  EXPECT_FALSE(LoadTemplate(dir, *k1).ok());
  fs::remove(dir + "/state");
  fs::rename(dir + "/real", dir + "/state");
  // A manifest of the wrong shape is an error, not a crash.
  std::string manifest;
  {
    std::ifstream in(dir + "/manifest.json");
    manifest.assign(std::istreambuf_iterator<char>(in), {});
  }
  std::ofstream(dir + "/manifest.json") << R"({"key": 7, "state_bytes": "x", "mac": []})";
  EXPECT_FALSE(LoadTemplate(dir, *k1).ok());
  std::ofstream(dir + "/manifest.json") << "[1, 2]";
  EXPECT_FALSE(LoadTemplate(dir, *k1).ok());
  std::ofstream(dir + "/manifest.json") << manifest;
  ASSERT_TRUE(LoadTemplate(dir, *k1).ok());
  EXPECT_NE(LoadTemplate(dir, "other").error().message().find("other inputs"), std::string::npos);
  {
    std::fstream f(dir + "/state", std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(100);
    f.put('x');
  }
  EXPECT_NE(LoadTemplate(dir, *k1).error().message().find("is corrupt"), std::string::npos);
  fs::resize_file(dir + "/state", 100);
  EXPECT_NE(LoadTemplate(dir, *k1).error().message().find("manifest says 4096"), std::string::npos);
  auto random = HostRandomBytes(64);
  ASSERT_TRUE(random.ok());
  EXPECT_EQ(random->size(), 64u);
  EXPECT_NE(*random, *HostRandomBytes(64));
}

TEST(PodOptionsFromCriTest, ReadsHostnameDnsSysctlsAndLimits) {
  peapod::cri::v1::PodSandboxConfig cfg;
  cfg.set_hostname("web-0");
  cfg.mutable_dns_config()->add_servers("10.96.0.10");
  cfg.mutable_dns_config()->add_searches("default.svc.cluster.local");
  cfg.mutable_dns_config()->add_options("ndots:5");
  (*cfg.mutable_linux()->mutable_sysctls())["net.ipv4.ip_unprivileged_port_start"] = "0";
  cfg.mutable_linux()->mutable_resources()->set_cpu_quota(150000);
  cfg.mutable_linux()->mutable_resources()->set_cpu_period(100000);
  cfg.mutable_linux()->mutable_resources()->set_memory_limit_in_bytes(256ll << 20);
  cfg.mutable_linux()->mutable_overhead()->set_memory_limit_in_bytes(100ll << 20);
  cfg.mutable_linux()->set_cgroup_parent("/kubepods/burstable/pod-uid");
  google::protobuf::Any any;
  any.set_type_url("type.googleapis.com/runtime.v1.PodSandboxConfig");
  any.set_value(cfg.SerializeAsString());
  PodOptions opts;
  ASSERT_TRUE(PodOptionsFromCri(any, &opts).ok());
  EXPECT_EQ(opts.hostname, "web-0");
  EXPECT_EQ(opts.dns_servers, std::vector<std::string>{"10.96.0.10"});
  EXPECT_EQ(opts.dns_options, std::vector<std::string>{"ndots:5"});
  EXPECT_EQ(opts.sysctls.at("net.ipv4.ip_unprivileged_port_start"), "0");
  EXPECT_DOUBLE_EQ(opts.cpus, 1.5);
  EXPECT_EQ(opts.memory_limit_bytes, 256ll << 20);
  EXPECT_EQ(opts.memory_overhead_bytes, 100ll << 20);
  EXPECT_EQ(opts.cgroup_parent, "/kubepods/burstable/pod-uid");

  PodOptions bare;  // as containerd's typeurl writes it: no URL prefix
  any.set_type_url("runtime.v1.PodSandboxConfig");
  ASSERT_TRUE(PodOptionsFromCri(any, &bare).ok());
  EXPECT_EQ(bare.hostname, "web-0");

  PodOptions untouched;
  google::protobuf::Any other;
  other.set_type_url("type.googleapis.com/something.Else");
  EXPECT_TRUE(PodOptionsFromCri(other, &untouched).ok());
  EXPECT_TRUE(untouched.hostname.empty());
  any.set_value("\xff\xff garbage");
  EXPECT_EQ(PodOptionsFromCri(any, &untouched).error().code(), Code::kInvalidArgument);
}

// kubelet's cgroup_parent, in either driver's form, becomes the pod's own leaf below it.
TEST(PodCgroupTest, TheLeafIsBelowTheParentInEitherDriversForm) {
  EXPECT_EQ(*PodCgroupLeaf("/kubepods/burstable/pod12", "p1"),
            "kubepods/burstable/pod12/peapod-p1");
  EXPECT_EQ(*PodCgroupLeaf("kubepods/pod12/", "p1"), "kubepods/pod12/peapod-p1");
  EXPECT_EQ(*PodCgroupLeaf("kubepods-burstable-pod12.slice", "p1"),
            "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod12.slice/peapod-p1");
  EXPECT_EQ(*PodCgroupLeaf("", "p1"), "") << "no parent: no cgroup of the pod's";
  for (const char* bad : {"/kubepods/../etc", "/a//b", "/a/./b", "-bad-.slice", "a--b.slice"}) {
    auto r = PodCgroupLeaf(bad, "p1");
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_EQ(r.error().code(), Code::kInvalidArgument) << bad;
  }
}

TEST(PodCgroupTest, OnlyHierarchiesThatAccountAreUsedOnceEach) {
  std::string table = ::testing::TempDir() + "/cg-mountinfo-" + std::to_string(::getpid());
  std::ofstream(table)
      << "30 25 0:26 / /sys/fs/cgroup/unified rw,nosuid shared:9 - cgroup2 cgroup2 rw\n"
      << "31 25 0:27 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd\n"
      << "32 25 0:28 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n"
      << "33 25 0:29 / /sys/fs/cgroup/cpuset rw - cgroup cgroup rw,cpuset\n"
      << "34 25 0:30 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
      << "35 25 0:30 / /mnt/memory-again rw - cgroup cgroup rw,memory\n"
      << "36 25 0:31 / /sys/fs/cgroup/devices rw - cgroup cgroup rw,devices\n"
      << "37 25 8:1 / / rw - ext4 /dev/sda1 rw\n";
  EXPECT_EQ(AccountingHierarchies(table),
            (std::vector<std::string>{"/sys/fs/cgroup/unified", "/sys/fs/cgroup/cpu,cpuacct",
                                      "/sys/fs/cgroup/memory"}));
  std::remove(table.c_str());
}

}  // namespace
}  // namespace peapod::sandboxer
