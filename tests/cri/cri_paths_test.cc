// The three ways into peapod, each against the real containerd it names (label cri):
//   A: containerd 2.x (built from the Go module proxy) through the sandbox API, driven by crictl;
//   B: Debian's containerd 1.6 through the classic CRI (the pause container's shim makes the pod);
//   C: Debian's containerd 1.6 with plain `ctr run`.
// Each starts its own peapod-sandboxer and containerd under a temporary root, with images built
// here from busybox-static (no registry) and CNI from Debian's containernetworking-plugins, and
// checks that nothing is left afterwards.
#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <future>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "common/base/unique_fd.h"

namespace peapod::critest {
namespace {

namespace fs = std::filesystem;
using namespace std::chrono_literals;

struct Out {
  int rc = -1;
  std::string text;
};

// Runs a shell command line; stdout and stderr together.
Out Sh(const std::string& cmd) {
  Out o;
  FILE* p = ::popen((cmd + " 2>&1").c_str(), "r");
  if (!p) return o;
  std::array<char, 4096> buf;
  size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), p)) > 0) o.text.append(buf.data(), n);
  int st = ::pclose(p);
  o.rc = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  return o;
}

std::string Trim(std::string s) {
  while (!s.empty() && (s.back() == '\n' || s.back() == '\r' || s.back() == ' ')) s.pop_back();
  while (!s.empty() && (s.front() == '\n' || s.front() == '\r')) s.erase(0, 1);
  return s;
}

// The last line that is not one of crictl's warnings.
std::string LastLine(const std::string& text) {
  std::istringstream in(text);
  std::string line, last;
  while (std::getline(in, line)) {
    if (!line.empty() && line.find("level=warning") == std::string::npos) last = line;
  }
  return Trim(last);
}

std::string ReadAll(const std::string& path) {
  std::ifstream f(path);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

pid_t Spawn(const std::vector<std::string>& argv, const std::string& log,
            const std::vector<std::string>& env) {
  pid_t pid = ::fork();
  if (pid == 0) {
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    ::setpgid(0, 0);
    int fd = ::open(log.c_str(), O_WRONLY | O_CREAT | O_APPEND, 0644);
    ::dup2(fd, 1);
    ::dup2(fd, 2);
    for (const auto& e : env) ::putenv(const_cast<char*>(e.c_str()));
    std::vector<char*> a;
    for (const auto& s : argv) a.push_back(const_cast<char*>(s.c_str()));
    a.push_back(nullptr);
    ::execv(a[0], a.data());
    ::_exit(127);
  }
  return pid;
}

// A TCP port on 127.0.0.1 that nothing listens on just now.
uint16_t FreePort() {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a));
  socklen_t len = sizeof(a);
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&a), &len);
  ::close(fd);
  return ntohs(a.sin_port);
}

// GET / from 127.0.0.1:port: the whole answer, or "" if nothing answers.
std::string HttpGet(uint16_t port) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  timeval tv{10, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  std::string out;
  if (::connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0) {
    std::string req = "GET / HTTP/1.0\r\nHost: localhost\r\n\r\n";
    if (::send(fd, req.data(), req.size(), MSG_NOSIGNAL) == static_cast<ssize_t>(req.size())) {
      char buf[4096];
      ssize_t n;
      while ((n = ::read(fd, buf, sizeof(buf))) > 0) out.append(buf, static_cast<size_t>(n));
    }
  }
  ::close(fd);
  return out;
}

void Stop(pid_t& pid) {
  if (pid <= 0) return;
  ::kill(pid, SIGTERM);
  for (int i = 0; i < 100; ++i) {
    if (::waitpid(pid, nullptr, WNOHANG) == pid) {
      pid = -1;
      return;
    }
    std::this_thread::sleep_for(100ms);
  }
  ::kill(pid, SIGKILL);
  ::waitpid(pid, nullptr, 0);
  pid = -1;
}

class CriPathsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (::geteuid() != 0) GTEST_SKIP() << "needs root (containerd, libvirt, mounts)";
    for (const char* tool : {"/usr/bin/containerd", "/usr/bin/ctr", "/usr/lib/cni/bridge",
                             "/usr/bin/mkfs.erofs", "/bin/busybox"}) {
      if (::access(tool, X_OK) != 0) {
        GTEST_SKIP() << tool << " is missing (scripts/install-deps.sh installs it)";
      }
    }
    if (::access(PEAPOD_VM_IMAGE_DIR "/vmlinux", R_OK) != 0) {
      GTEST_SKIP() << "no guest image in " PEAPOD_VM_IMAGE_DIR;
    }
    // Short: the sandboxer's run dir must leave room for sockets named by 64-character ids.
    char tmpl[] = "/tmp/ppc-XXXXXX";
    dir_ = ::mkdtemp(tmpl);
    ::chmod(dir_.c_str(), 0711);  // pod VMs (QEMU as uids of their own) pass through it
    ASSERT_EQ(
        Sh(std::string(PEAPOD_SOURCE_DIR) + "/tests/cri/make-images.sh " + dir_ + "/images").rc, 0);
    const char* root = std::getenv("PEAPOD_TEST_LIBVIRT_ROOT");
    std::ofstream(dir_ + "/sandboxer.json")
        << "{\"listen\": \"" << dir_ << "/sandboxer.sock\", "
        << "\"shim_listen\": \"" << dir_ << "/shim.sock\", \"state_dir\": \"" << dir_
        << "/state\", "
        << "\"run_dir\": \"" << dir_ << "/run\", \"libvirt_root\": \""
        << (root && *root ? root : "/var/lib/peapod/test-libvirt") << "\", \"image_dir\": \""
        << PEAPOD_VM_IMAGE_DIR << "\", \"accel\": \"tcg\", \"layer_cache_keep_seconds\": 0, "
        << "\"cri_root\": \"" << dir_ << "/ctd-root/io.containerd.grpc.v1.cri\"}";
    ASSERT_NO_FATAL_FAILURE(StartSandboxer());
    fs::create_directories(dir_ + "/net.d");
    std::ofstream(dir_ + "/net.d/10-peapod-test.conflist")
        << R"({"cniVersion": "1.0.0", "name": "peapod-test", "plugins": [
             {"type": "bridge", "bridge": "ppcri0", "isGateway": true,
              "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.97.0.0/24"}]],
                       "routes": [{"dst": "0.0.0.0/0"}], "dataDir": ")"
        << dir_ << R"(/ipam"}}]})";
  }

  void StartSandboxer() {
    ::unlink((dir_ + "/shim.sock").c_str());  // a killed sandboxer leaves its socket
    sandboxer_ = Spawn({PEAPOD_SANDBOXER_BINARY, "--config", dir_ + "/sandboxer.json"},
                       dir_ + "/sandboxer.log", {});
    auto end = std::chrono::steady_clock::now() + 150s;
    while (!ConnectUnix(dir_ + "/shim.sock").ok() && std::chrono::steady_clock::now() < end) {
      std::this_thread::sleep_for(100ms);
    }
    ASSERT_TRUE(ConnectUnix(dir_ + "/shim.sock").ok()) << "sandboxer did not start:\n"
                                                       << ReadAll(dir_ + "/sandboxer.log");
  }

  void TearDown() override {
    if (dir_.empty()) return;
    if (HasFailure() || std::getenv("PEAPOD_CRI_KEEP_LOGS")) {
      // The whole logs, for a look after the directory is gone.
      Sh("mkdir -p /tmp/peapod-cri-logs && cp " + dir_ + "/*.log /tmp/peapod-cri-logs/");
      std::printf("(whole logs in /tmp/peapod-cri-logs)\n");
      std::printf("--- sandboxer log (tail) ---\n%s\n--- containerd log (tail) ---\n%s\n",
                  Sh("tail -40 " + dir_ + "/sandboxer.log").text.c_str(),
                  Sh("grep -v level=debug " + dir_ + "/containerd.log | tail -40").text.c_str());
    }
    Stop(containerd_);
    Stop(sandboxer_);
    // Whatever a failed test left: shims and QEMUs name our directory on their command line.
    Sh("pkill -9 -f " + dir_);
    std::this_thread::sleep_for(300ms);
    Sh("grep -o ' " + dir_ + "[^ ]*' /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l");
    Sh("ip link del ppcri0 2>/dev/null");
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  // Starts containerd (Debian's 1.6, or the 2.x build) with the CRI plugin and the peapod
  // runtime, and imports the test images.
  void StartContainerd(bool v2) {
    std::string bin = "/usr/bin";
    if (v2) {
      auto p = Sh(std::string(PEAPOD_SOURCE_DIR) + "/scripts/go-tools.sh --print-path containerd");
      bin = Trim(p.text);
      if (p.rc != 0 || ::access((bin + "/containerd").c_str(), X_OK) != 0) {
        GTEST_SKIP() << "containerd 2.x is not built (scripts/go-tools.sh containerd): " << p.text;
      }
    }
    ctr_ = bin + "/ctr --address " + dir_ + "/containerd.sock";
    std::ofstream cfg(dir_ + "/containerd.toml");
    cfg << (v2 ? "version = 3\n" : "version = 2\n") << "root = \"" << dir_ << "/ctd-root\"\n"
        << "state = \"" << dir_ << "/ctd-state\"\n[grpc]\n  address = \"" << dir_
        << "/containerd.sock\"\n[ttrpc]\n  address = \"" << dir_ << "/containerd.sock.ttrpc\"\n"
        << "[debug]\n  level = \"debug\"\n";
    if (v2) {
      cfg << "[proxy_plugins.peapod]\n  type = \"sandbox\"\n  address = \"" << dir_
          << "/sandboxer.sock\"\n"
          << "[plugins.'io.containerd.cri.v1.images'.pinned_images]\n"
          << "  sandbox = \"registry.local/peapod/pause:test\"\n"
          << "[plugins.'io.containerd.cri.v1.runtime'.cni]\n  bin_dirs = [\"/usr/lib/cni\"]\n"
          << "  conf_dir = \"" << dir_ << "/net.d\"\n"
          << "[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.peapod]\n"
          << "  runtime_type = \"io.containerd.peapod.v2\"\n  sandboxer = \"peapod\"\n";
    } else {
      cfg << "[plugins.\"io.containerd.grpc.v1.cri\"]\n"
          << "  sandbox_image = \"registry.local/peapod/pause:test\"\n"
          << "  [plugins.\"io.containerd.grpc.v1.cri\".cni]\n    bin_dir = \"/usr/lib/cni\"\n"
          << "    conf_dir = \"" << dir_ << "/net.d\"\n"
          << "  [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n"
          << "    runtime_type = \"io.containerd.runc.v2\"\n"
          << "  [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.peapod]\n"
          << "    runtime_type = \"io.containerd.peapod.v2\"\n";
    }
    cfg.close();
    containerd_bin_ = bin;
    ASSERT_NO_FATAL_FAILURE(SpawnContainerd());
    for (const char* ns : {"k8s.io", "default"}) {
      for (const char* img : {"busybox", "pause"}) {
        auto r = Sh(ctr_ + " -n " + ns + " images import " + dir_ + "/images/" + img + ".tar");
        ASSERT_EQ(r.rc, 0) << r.text;
      }
    }
    std::ofstream(dir_ + "/crictl.yaml")
        << "runtime-endpoint: unix://" << dir_ << "/containerd.sock\nimage-endpoint: unix://"
        << dir_ << "/containerd.sock\ntimeout: 120\n";
  }

  // Starts (or starts again) the containerd StartContainerd configured.
  void SpawnContainerd() {
    const std::string& bin = containerd_bin_;
    std::string path = std::string("PATH=") + PEAPOD_SHIM_DIR + ":" + bin + ":" +
                       (std::getenv("PATH") ? std::getenv("PATH") : "/usr/bin:/bin");
    containerd_ =
        Spawn({bin + "/containerd", "--config", dir_ + "/containerd.toml"},
              dir_ + "/containerd.log", {path, "PEAPOD_SANDBOXER_SOCKET=" + dir_ + "/shim.sock"});
    auto end = std::chrono::steady_clock::now() + 30s;
    while (Sh(ctr_ + " version").rc != 0 && std::chrono::steady_clock::now() < end) {
      std::this_thread::sleep_for(200ms);
    }
    ASSERT_EQ(Sh(ctr_ + " version").rc, 0) << ReadAll(dir_ + "/containerd.log");
  }

  // crictl from the Go tool cache, and containerd's CRI plugin answering it.
  void FindCrictl() {
    auto found = Sh(std::string(PEAPOD_SOURCE_DIR) + "/scripts/go-tools.sh --print-path crictl");
    crictl_ = Trim(found.text) + "/crictl";
    if (found.rc != 0 || ::access(crictl_.c_str(), X_OK) != 0) {
      GTEST_SKIP() << "crictl is not built (scripts/go-tools.sh crictl)";
    }
    auto end = std::chrono::steady_clock::now() + 60s;
    while (Crictl("version").rc != 0 && std::chrono::steady_clock::now() < end) {
      std::this_thread::sleep_for(300ms);
    }
  }

  Out Crictl(const std::string& args) {
    return Sh("CRI_CONFIG_FILE=" + dir_ + "/crictl.yaml " + crictl_ + " " + args);
  }

  // stdin through `exec -i`, byte-exact: 3 MiB of binary data (every byte value, no newline
  // structure), counted and hashed inside the container.
  void ExpectStdinExact(const std::string& id) {
    std::string blob = dir_ + "/stdin.bin";
    std::string data(3 << 20, '\0');
    uint32_t x = 12345;
    for (auto& c : data) c = static_cast<char>((x = x * 1103515245u + 12345u) >> 24);
    std::ofstream(blob, std::ios::binary) << data;
    auto want = Sh("sha256sum " + blob + " | cut -d' ' -f1");
    auto got =
        Crictl("exec -i " + id + " sh -c 'tee /tmp/in | wc -c; sha256sum /tmp/in' < " + blob);
    ASSERT_EQ(got.rc, 0) << got.text;
    EXPECT_NE(got.text.find(std::to_string(data.size()) + "\n"), std::string::npos)
        << "stdin lost bytes: " << got.text;
    EXPECT_NE(got.text.find(Trim(want.text)), std::string::npos) << got.text;
  }

  // <dir>/<name>.json: a busybox container running `sh -c script`, logging to <name>.log.
  void WriteContainerConfig(const std::string& name, const std::string& script) {
    std::ofstream(dir_ + "/" + name + ".json")
        << R"({"metadata": {"name": ")" << name
        << R"("}, "image": {"image": "docker.io/peapod/busybox:test"}, "command": ["sh", "-c", ")"
        << script << R"("], "log_path": ")" << name << R"(.log", "linux": {}})";
  }

  // The pod scenario of paths A and B.
  void PodScenario() {
    ASSERT_NO_FATAL_FAILURE(FindCrictl());
    if (IsSkipped()) return;
    fs::create_directories(dir_ + "/logs");
    std::ofstream(dir_ + "/pod.json")
        << R"({"metadata": {"name": "web", "namespace": "default", "uid": "uid-web", "attempt": 0},
               "hostname": "web-0", "dns_config": {"servers": ["10.96.0.10"], "searches": ["svc.test"]},
               "log_directory": ")"
        << dir_ << R"(/logs", "linux": {}})";
    auto container = [&](const std::string& name, const std::string& script) {
      WriteContainerConfig(name, script);
    };
    container("c1", "echo c1 says hi; sleep 3600");
    container("c2", "echo c2 says hi; sleep 3600");
    container("c3", "echo c3 exits 3; exit 3");
    // A web server on the guest's 8080, for PortForward.
    container("c5",
              "mkdir -p /www; echo peapod-pf > /www/index.html; exec httpd -f -p 8080 -h /www");
    // 32 MiB of memory for a 64 MiB buffer: the guest kernel OOM-kills it.
    std::ofstream(dir_ + "/c4.json")
        << R"({"metadata": {"name": "c4"}, "image": {"image": "docker.io/peapod/busybox:test"},
               "command": ["dd", "if=/dev/zero", "of=/dev/null", "bs=64M", "count=1"],
               "log_path": "c4.log", "linux": {"resources": {"memory_limit_in_bytes": 33554432}}})";

    auto runp = Crictl("runp --runtime peapod " + dir_ + "/pod.json");
    ASSERT_EQ(runp.rc, 0) << runp.text;
    std::string pod = LastLine(runp.text);
    std::vector<std::string> ids;
    for (const char* c : {"c1", "c2", "c3", "c4", "c5"}) {
      auto created = Crictl("create " + pod + " " + dir_ + "/" + c + ".json " + dir_ + "/pod.json");
      ASSERT_EQ(created.rc, 0) << created.text;
      ids.push_back(LastLine(created.text));
      auto started = Crictl("start " + ids.back());
      ASSERT_EQ(started.rc, 0) << started.text;
    }
    // One kernel for the pod, not the host's.
    std::string host_boot = Trim(ReadAll("/proc/sys/kernel/random/boot_id"));
    auto b1 = Crictl("exec -s " + ids[0] + " cat /proc/sys/kernel/random/boot_id");
    auto b2 = Crictl("exec -s " + ids[1] + " cat /proc/sys/kernel/random/boot_id");
    ASSERT_EQ(b1.rc, 0) << b1.text;
    EXPECT_EQ(LastLine(b1.text), LastLine(b2.text));
    EXPECT_NE(LastLine(b1.text), host_boot);
    EXPECT_EQ(LastLine(Crictl("exec -s " + ids[0] + " hostname").text), "web-0");
    ExpectStdinExact(ids[1]);
    // The pod's DNS config, through the resolv.conf containerd mounts from the pod's files.
    auto resolv = Crictl("exec -s " + ids[0] + " cat /etc/resolv.conf").text;
    EXPECT_NE(resolv.find("nameserver 10.96.0.10"), std::string::npos) << resolv;
    EXPECT_NE(resolv.find("search svc.test"), std::string::npos) << resolv;
    // Logs, the exit code, stats.
    std::this_thread::sleep_for(2s);
    EXPECT_NE(Crictl("logs " + ids[0]).text.find("c1 says hi"), std::string::npos);
    EXPECT_NE(Crictl("logs " + ids[1]).text.find("c2 says hi"), std::string::npos);
    EXPECT_NE(Crictl("inspect " + ids[2]).text.find("\"exitCode\": 3"), std::string::npos)
        << Crictl("inspect " + ids[2]).text;
    // OOM: containerd's CRI learns it only from the shim's /tasks/oom event.
    auto oom = Crictl("inspect " + ids[3]).text;
    EXPECT_NE(oom.find("\"reason\": \"OOMKilled\""), std::string::npos) << oom;
    EXPECT_NE(oom.find("\"exitCode\": 137"), std::string::npos) << oom;
    auto stats = Crictl("stats -o json " + ids[0]);
    EXPECT_NE(stats.text.find("\"workingSetBytes\""), std::string::npos) << stats.text;
    EXPECT_EQ(stats.text.find("\"workingSetBytes\": {\n          \"value\": \"0\""),
              std::string::npos)
        << stats.text;

    // PortForward: containerd dials localhost:8080 inside the pod netns; the sandboxer's
    // forwarder there relays the connection into the guest, where c5 serves.
    uint16_t local = FreePort();
    pid_t pf = Spawn({crictl_, "port-forward", pod, std::to_string(local) + ":8080"},
                     dir_ + "/port-forward.log", {"CRI_CONFIG_FILE=" + dir_ + "/crictl.yaml"});
    std::string page;
    for (int i = 0; i < 100 && page.find("peapod-pf") == std::string::npos; ++i) {
      std::this_thread::sleep_for(200ms);
      page = HttpGet(local);
    }
    EXPECT_NE(page.find("peapod-pf"), std::string::npos) << page << "\n"
                                                         << ReadAll(dir_ + "/port-forward.log");
    EXPECT_NE(HttpGet(local).find("200 OK"), std::string::npos);  // and again: one per request
    Stop(pf);

    // A shim killed with -9: the pod and its other containers live on; removing works.
    auto shim = Sh("pgrep -f '[c]ontainerd-shim-peapod-v2.*-id " + ids[0] + "'");
    ASSERT_EQ(shim.rc, 0) << "no shim for " << ids[0];
    Sh("kill -9 " + LastLine(shim.text));
    std::this_thread::sleep_for(3s);
    auto still = Crictl("exec -s " + ids[1] + " echo alive");
    EXPECT_EQ(LastLine(still.text), "alive") << still.text;
    EXPECT_EQ(Crictl("rm -f " + ids[0]).rc, 0);

    for (size_t i = 1; i < ids.size(); ++i) {
      EXPECT_EQ(Crictl("stop " + ids[i]).rc, 0);
      EXPECT_EQ(Crictl("rm " + ids[i]).rc, 0);
    }
    auto stopp = Crictl("stopp " + pod);
    EXPECT_EQ(stopp.rc, 0) << stopp.text;
    auto rmp = Crictl("rmp " + pod);
    EXPECT_EQ(rmp.rc, 0) << rmp.text;
    ExpectNothingLeft();
  }

  void ExpectNothingLeft() {
    std::this_thread::sleep_for(1s);
    std::error_code ec;
    EXPECT_TRUE(fs::is_empty(dir_ + "/state/pods", ec)) << "pod records left";
    EXPECT_TRUE(fs::is_empty(dir_ + "/run/pods", ec)) << "pod run dirs left";
    EXPECT_TRUE(!fs::exists(dir_ + "/state/layers") || fs::is_empty(dir_ + "/state/layers"))
        << "layer images left";
    // "[q]": the pattern must not match the shell that runs pgrep.
    EXPECT_NE(Sh("pgrep -f '[q]emu.*" + dir_ + "'").rc, 0) << "QEMU left";
    auto shims = Sh("pgrep -af '[c]ontainerd-shim-peapod-v2.*" + dir_ + "'");
    EXPECT_NE(shims.rc, 0) << "shims left: " << shims.text;
    EXPECT_NE(Sh("grep -q ' " + dir_ + "/run/pods/' /proc/self/mountinfo").rc, 0) << "mounts left";
  }

  std::string dir_;
  std::string ctr_, crictl_, containerd_bin_;
  pid_t sandboxer_ = -1, containerd_ = -1;
};

TEST_F(CriPathsTest, A_Containerd2SandboxApiRunsAPodOfContainersInOneVm) {
  ASSERT_NO_FATAL_FAILURE(StartContainerd(/*v2=*/true));
  if (IsSkipped()) return;
  PodScenario();
}

TEST_F(CriPathsTest, B_Containerd16ClassicCriRunsAPodOfContainersInOneVm) {
  ASSERT_NO_FATAL_FAILURE(StartContainerd(/*v2=*/false));
  PodScenario();
}

// Numbers the lines "<prefix><n>" of text must hold, in order, each once: an empty string, or
// what is wrong.
std::string GapsOrRepeats(const std::string& text, const std::string& prefix, int at_least) {
  std::istringstream in(text);
  std::string line;
  int next = 0;
  while (std::getline(in, line)) {
    auto at = line.find(prefix);
    if (at == std::string::npos) continue;
    int n = std::atoi(line.c_str() + at + prefix.size());
    if (n != next) {
      return "expected " + prefix + std::to_string(next) + ", got " + line.substr(at);
    }
    ++next;
  }
  if (next < at_least) {
    return "only " + std::to_string(next) + " lines of " + prefix + ", wanted " +
           std::to_string(at_least);
  }
  return "";
}

// Issue 16: a sandboxer killed with -9 and started again changes nothing: containers stay running,
// a streaming exec and a container's log lose and repeat no line, stdin stays byte-exact, and
// everything stops and goes afterwards. Then the same for containerd killed with -9.
TEST_F(CriPathsTest, D_ASandboxerRestartChangesNoContainer) {
  ASSERT_NO_FATAL_FAILURE(StartContainerd(/*v2=*/true));
  if (IsSkipped()) return;
  ASSERT_NO_FATAL_FAILURE(FindCrictl());
  if (IsSkipped()) return;
  fs::create_directories(dir_ + "/logs");
  // As kubelet gives each pod a cgroup: containerd reads the pod's stats there (statsp).
  const std::string cgroup_top = "peapod-cri-" + std::to_string(::getpid());
  const std::string cgroup_parent = "/" + cgroup_top + "/pod-rs";
  std::ofstream(dir_ + "/pod.json")
      << R"({"metadata": {"name": "rs", "namespace": "default", "uid": "uid-rs", "attempt": 0},
             "log_directory": ")"
      << dir_ << R"(/logs", "linux": {"cgroup_parent": ")" << cgroup_parent << R"("}})";
  auto container = [&](const std::string& name, const std::string& script) {
    WriteContainerConfig(name, script);
  };
  container("talker", "i=0; while true; do echo line-$i; i=$((i+1)); sleep 0.05; done");
  container("idle", "sleep 3600");
  auto runp = Crictl("runp --runtime peapod " + dir_ + "/pod.json");
  ASSERT_EQ(runp.rc, 0) << runp.text;
  std::string pod = LastLine(runp.text);
  std::vector<std::string> ids;
  for (const char* c : {"talker", "idle"}) {
    auto created = Crictl("create " + pod + " " + dir_ + "/" + c + ".json " + dir_ + "/pod.json");
    ASSERT_EQ(created.rc, 0) << created.text;
    ids.push_back(LastLine(created.text));
    ASSERT_EQ(Crictl("start " + ids.back()).rc, 0);
  }
  auto running = [&](const std::string& id) {
    return Crictl("inspect " + id).text.find("\"state\": \"CONTAINER_RUNNING\"") !=
           std::string::npos;
  };

  // A streaming exec that runs across the restart.
  auto streaming = std::async(std::launch::async, [&] {
    return Crictl("exec " + ids[1] +
                  " sh -c 'i=0; while [ $i -lt 150 ]; do echo exec-$i; i=$((i+1)); sleep 0.05; "
                  "done'");
  });
  std::this_thread::sleep_for(3s);
  ::kill(sandboxer_, SIGKILL);
  ::waitpid(sandboxer_, nullptr, 0);
  sandboxer_ = -1;
  std::this_thread::sleep_for(2s);  // the talker goes on writing meanwhile
  ASSERT_NO_FATAL_FAILURE(StartSandboxer());

  auto exec = streaming.get();
  EXPECT_EQ(exec.rc, 0) << exec.text;
  EXPECT_EQ(GapsOrRepeats(exec.text, "exec-", 150), "") << exec.text;
  for (const auto& id : ids) EXPECT_TRUE(running(id)) << Crictl("inspect " + id).text;
  EXPECT_EQ(LastLine(Crictl("exec -s " + ids[0] + " echo alive").text), "alive");
  ExpectStdinExact(ids[1]);
  auto logs = Crictl("logs " + ids[0]);
  EXPECT_EQ(GapsOrRepeats(logs.text, "line-", 40), "") << logs.text;
  // The pod's stats: its VM's CPU and memory on the host.
  auto statsp = Crictl("statsp -o json --id " + pod);
  EXPECT_EQ(statsp.rc, 0) << statsp.text;
  EXPECT_NE(statsp.text.find("\"usageCoreNanoSeconds\""), std::string::npos) << statsp.text;
  EXPECT_NE(statsp.text.find("\"workingSetBytes\""), std::string::npos) << statsp.text;
  EXPECT_EQ(statsp.text.find("\"workingSetBytes\": {\n            \"value\": \"0\""),
            std::string::npos)
      << statsp.text;

  // containerd killed and started again: the shims are still there, and it finds them.
  auto log_lines = [](const std::string& text) {
    size_t n = 0;
    for (size_t at = text.find("line-"); at != std::string::npos; at = text.find("line-", at + 1)) {
      ++n;
    }
    return n;
  };
  const size_t lines_before = log_lines(Crictl("logs " + ids[0]).text);
  ::kill(containerd_, SIGKILL);
  ::waitpid(containerd_, nullptr, 0);
  containerd_ = -1;
  ASSERT_NO_FATAL_FAILURE(SpawnContainerd());
  ASSERT_NO_FATAL_FAILURE(FindCrictl());
  for (const auto& id : ids) EXPECT_TRUE(running(id)) << Crictl("inspect " + id).text;
  EXPECT_EQ(LastLine(Crictl("exec -s " + ids[0] + " echo alive").text), "alive");
  // What the talker wrote while containerd was away waited in its FIFO: the log has no gap.
  std::this_thread::sleep_for(2s);
  auto logs_after = Crictl("logs " + ids[0]);
  EXPECT_EQ(GapsOrRepeats(logs_after.text, "line-", 80), "") << logs_after.text;
  EXPECT_GE(log_lines(logs_after.text), lines_before + 20)
      << "the log stopped at the containerd restart";
  for (const auto& id : ids) {
    EXPECT_EQ(Crictl("stop " + id).rc, 0);
    EXPECT_EQ(Crictl("rm " + id).rc, 0);
  }
  auto stopp = Crictl("stopp " + pod);
  EXPECT_EQ(stopp.rc, 0) << stopp.text;
  auto rmp = Crictl("rmp " + pod);
  EXPECT_EQ(rmp.rc, 0) << rmp.text;
  ExpectNothingLeft();
  for (const auto& m : {"/sys/fs/cgroup/memory/", "/sys/fs/cgroup/unified/", "/sys/fs/cgroup/"}) {
    EXPECT_FALSE(fs::exists(m + cgroup_top + "/pod-rs/peapod-" + pod)) << "pod cgroup left";
  }
}

TEST_F(CriPathsTest, C_PlainCtrRunIsAOneContainerPod) {
  ASSERT_NO_FATAL_FAILURE(StartContainerd(/*v2=*/false));
  const std::string run = ctr_ + " run --runtime io.containerd.peapod.v2 ";
  const std::string img = " docker.io/peapod/busybox:test ";
  auto once = Sh(run + "--rm" + img + "t1 sh -c 'echo hello from $(uname -r); exit 3'");
  EXPECT_EQ(once.rc, 3) << once.text;
  EXPECT_NE(once.text.find("hello from"), std::string::npos) << once.text;
  EXPECT_EQ(once.text.find(Trim(Sh("uname -r").text)), std::string::npos) << "the host's kernel";

  ASSERT_EQ(Sh(run + "-d" + img + "t2 sleep 3600").rc, 0);
  auto exec = Sh(ctr_ + " task exec --exec-id e1 t2 sh -c 'echo from-exec; exit 4'");
  EXPECT_EQ(exec.rc, 4) << exec.text;
  EXPECT_NE(exec.text.find("from-exec"), std::string::npos);
  auto ps = Sh(ctr_ + " task ps t2");
  EXPECT_EQ(ps.rc, 0) << ps.text;
  EXPECT_NE(ps.text.find("PID"), std::string::npos);
  EXPECT_EQ(Sh(ctr_ + " task kill -s KILL t2").rc, 0);
  std::this_thread::sleep_for(1s);
  EXPECT_NE(Sh(ctr_ + " task ls").text.find("STOPPED"), std::string::npos);
  EXPECT_EQ(Sh(ctr_ + " task delete t2").rc, 0);
  EXPECT_EQ(Sh(ctr_ + " container rm t2").rc, 0);

  // A tty session, driven through `script` (ctr wants a terminal).
  if (Sh("command -v script").rc == 0) {
    auto tty =
        Sh("(sleep 8; echo 'echo tty-ok $(tty)'; sleep 1; echo 'exit 5') | timeout 120 "
           "script -qec \"" +
           run + "-t --rm" + img + "t3 sh\" /dev/null");
    EXPECT_EQ(tty.rc, 5) << tty.text;
    EXPECT_NE(tty.text.find("tty-ok /dev/pts/"), std::string::npos) << tty.text;
  }
  ExpectNothingLeft();
}

}  // namespace
}  // namespace peapod::critest
