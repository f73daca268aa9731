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
#include <map>
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
    // The one containerd config template; runc's pods get the same exec drain contract (an exec
    // whose children hold its output open ends after 5 s).
    std::string cfg = std::string(PEAPOD_SOURCE_DIR) + "/scripts/containerd-config.sh --dir " +
                      dir_ + " --debug debug --pause registry.local/peapod/pause:test --cni-conf " +
                      dir_ + "/net.d";
    if (v2) {
      cfg += " --containerd 2 --sandboxer " + dir_ + "/sandboxer.sock --drain-exec-io 5s";
    } else {
      cfg += " --containerd 1.6 --runc \"$(command -v runc || echo runc)\"";
    }
    auto written = Sh(cfg + " > " + dir_ + "/containerd.toml");
    ASSERT_EQ(written.rc, 0) << written.text;
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

  // <dir>/stdin.bin: `size` bytes of binary data (every byte value, no newline structure).
  // Returns its sha256.
  std::string WriteBlob(size_t size) {
    std::string data(size, '\0');
    uint32_t x = 12345;
    for (auto& c : data) c = static_cast<char>((x = x * 1103515245u + 12345u) >> 24);
    std::ofstream(dir_ + "/stdin.bin", std::ios::binary) << data;
    return Trim(Sh("sha256sum " + dir_ + "/stdin.bin | cut -d' ' -f1").text);
  }

  // stdin through `exec -i`, byte-exact: `size` bytes of binary data, counted and hashed inside
  // the container.
  void ExpectStdinExact(const std::string& id, size_t size = 3 << 20) {
    std::string want = WriteBlob(size);
    auto got = Crictl("exec -i " + id + " sh -c 'tee /tmp/in | wc -c; sha256sum /tmp/in' < " +
                      dir_ + "/stdin.bin");
    ASSERT_EQ(got.rc, 0) << got.text;
    EXPECT_NE(got.text.find(std::to_string(size) + "\n"), std::string::npos)
        << "stdin lost bytes: " << got.text;
    EXPECT_NE(got.text.find(want), std::string::npos) << got.text;
  }

  // <dir>/<name>.json: a busybox container running `sh -c script`, logging to <name>.log, with
  // `linux` as its linux section and `extra` (", key: value...") added at the top level.
  void WriteContainerConfig(const std::string& name, const std::string& script,
                            const std::string& linux_section = "{}",
                            const std::string& extra = "") {
    std::ofstream(dir_ + "/" + name + ".json")
        << R"({"metadata": {"name": ")" << name
        << R"("}, "image": {"image": "docker.io/peapod/busybox:test"}, "command": ["sh", "-c", ")"
        << script << R"("], "log_path": ")" << name << R"(.log", "linux": )" << linux_section
        << extra << "}";
  }

  // A pod named `name` (crictl runp, peapod handler) whose config is <dir>/<name>-pod.json; its id.
  std::string RunPod(const std::string& name, const std::string& linux_section = "{}") {
    fs::create_directories(dir_ + "/logs");
    std::ofstream(dir_ + "/" + name + "-pod.json")
        << R"({"metadata": {"name": ")" << name << R"(", "namespace": "default", "uid": "uid-)"
        << name << R"(", "attempt": 0}, "log_directory": ")" << dir_ << R"(/logs", "linux": )"
        << linux_section << "}";
    auto runp = Crictl("runp --runtime peapod " + dir_ + "/" + name + "-pod.json");
    EXPECT_EQ(runp.rc, 0) << runp.text;
    return runp.rc == 0 ? LastLine(runp.text) : "";
  }

  // Creates and starts the container <dir>/<name>.json in pod `pod` (made by RunPod(pod_name));
  // its id.
  std::string StartContainer(const std::string& pod, const std::string& pod_name,
                             const std::string& name) {
    auto created = Crictl("create " + pod + " " + dir_ + "/" + name + ".json " + dir_ + "/" +
                          pod_name + "-pod.json");
    EXPECT_EQ(created.rc, 0) << created.text;
    if (created.rc != 0) return "";
    std::string id = LastLine(created.text);
    auto started = Crictl("start " + id);
    EXPECT_EQ(started.rc, 0) << started.text;
    return id;
  }

  bool Running(const std::string& id) {
    return Crictl("inspect " + id).text.find("\"state\": \"CONTAINER_RUNNING\"") !=
           std::string::npos;
  }

  // Stops and removes the containers, then the pod, and checks nothing is left.
  void RemoveAll(const std::string& pod, const std::vector<std::string>& ids) {
    for (const auto& id : ids) {
      EXPECT_EQ(Crictl("stop " + id).rc, 0);
      EXPECT_EQ(Crictl("rm " + id).rc, 0);
    }
    auto stopp = Crictl("stopp " + pod);
    EXPECT_EQ(stopp.rc, 0) << stopp.text;
    auto rmp = Crictl("rmp " + pod);
    EXPECT_EQ(rmp.rc, 0) << rmp.text;
    ExpectNothingLeft();
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

// How many times needle occurs in text.
size_t Occurrences(const std::string& text, const std::string& needle) {
  size_t n = 0;
  for (size_t at = text.find(needle); at != std::string::npos; at = text.find(needle, at + 1)) ++n;
  return n;
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
// a container that exits meanwhile is reported exited once with its real status, a streaming
// exec and a container's log lose and repeat no line, stdin stays byte-exact, attach reaches a
// container's stdin, and everything stops and goes afterwards. Then the same for
// containerd killed with -9. Last, a shim killed with -9: containerd reports its container exited
// and the guest has killed it too, while the rest of the pod runs on.
TEST_F(CriPathsTest, D_ASandboxerRestartChangesNoContainer) {
  ASSERT_NO_FATAL_FAILURE(StartContainerd(/*v2=*/true));
  if (IsSkipped()) return;
  ASSERT_NO_FATAL_FAILURE(FindCrictl());
  if (IsSkipped()) return;
  // As kubelet gives each pod a cgroup: containerd reads the pod's stats there (statsp). One PID
  // namespace for the pod (namespace_options.pid POD): a container sees the others' processes.
  const std::string cgroup_top = "peapod-cri-" + std::to_string(::getpid());
  const std::string cgroup_parent = "/" + cgroup_top + "/pod-rs";
  std::string pod =
      RunPod("rs", R"({"cgroup_parent": ")" + cgroup_parent +
                       R"(", "security_context": {"namespace_options": {"pid": 0}}})");
  ASSERT_FALSE(pod.empty());
  WriteContainerConfig("talker", "i=0; while true; do echo line-$i; i=$((i+1)); sleep 0.05; done");
  WriteContainerConfig("idle", "sleep 3599");
  WriteContainerConfig("echoer", "while read l; do echo got-$l; done", "{}", R"(, "stdin": true)");
  // Exits with 7 once the test, on the host, creates trigger/go (a volume): while the sandboxer
  // is down.
  fs::create_directories(dir_ + "/trigger");
  WriteContainerConfig(
      "quitter", "while [ ! -e /trigger/go ]; do sleep 0.1; done; exit 7", "{}",
      R"(, "mounts": [{"container_path": "/trigger", "host_path": ")" + dir_ + R"(/trigger"}])");
  std::vector<std::string> ids;
  for (const char* c : {"talker", "idle", "echoer", "quitter"}) {
    ids.push_back(StartContainer(pod, "rs", c));
    ASSERT_FALSE(ids.back().empty());
  }
  const std::string& talker = ids[0];
  const std::string& idle = ids[1];
  const std::string& echoer = ids[2];
  const std::string& quitter = ids[3];
  // A line through `crictl attach -i` reaches the echoer's stdin: its answer is in its log.
  // (Without stdin_once the attach does not end with its input: `timeout` ends it.)
  auto attach_reaches = [&](const std::string& word) {
    std::ofstream(dir_ + "/line") << word << "\n";
    Sh("CRI_CONFIG_FILE=" + dir_ + "/crictl.yaml timeout 5 " + crictl_ + " attach -i " + echoer +
       " < " + dir_ + "/line");
    for (int i = 0; i < 50; ++i) {
      if (Crictl("logs " + echoer).text.find("got-" + word) != std::string::npos) return true;
      std::this_thread::sleep_for(200ms);
    }
    return false;
  };
  EXPECT_TRUE(attach_reaches("before"));

  // A streaming exec that runs across the restart.
  auto streaming = std::async(std::launch::async, [&] {
    return Crictl("exec " + idle +
                  " sh -c 'i=0; while [ $i -lt 150 ]; do echo exec-$i; i=$((i+1)); sleep 0.05; "
                  "done'");
  });
  std::this_thread::sleep_for(3s);
  ::kill(sandboxer_, SIGKILL);
  ::waitpid(sandboxer_, nullptr, 0);
  sandboxer_ = -1;
  std::ofstream(dir_ + "/trigger/go") << "go\n";  // the quitter exits while nobody listens
  std::this_thread::sleep_for(2s);                // the talker goes on writing meanwhile
  ASSERT_NO_FATAL_FAILURE(StartSandboxer());

  auto exec = streaming.get();
  EXPECT_EQ(exec.rc, 0) << exec.text;
  EXPECT_EQ(GapsOrRepeats(exec.text, "exec-", 150), "") << exec.text;
  const std::vector<std::string> live = {talker, idle, echoer};
  for (const auto& id : live) EXPECT_TRUE(Running(id)) << Crictl("inspect " + id).text;
  // The exit that happened while the sandboxer was away, with its real status (the shim's wait,
  // re-sent after the redial, collects what the agent kept).
  std::string quit;
  for (int i = 0; i < 100 && quit.find("CONTAINER_EXITED") == std::string::npos; ++i) {
    std::this_thread::sleep_for(200ms);
    quit = Crictl("inspect " + quitter).text;
  }
  EXPECT_NE(quit.find("\"exitCode\": 7"), std::string::npos) << quit;
  EXPECT_EQ(LastLine(Crictl("exec -s " + talker + " echo alive").text), "alive");
  ExpectStdinExact(idle);
  EXPECT_TRUE(attach_reaches("after-sandboxer"));
  auto logs = Crictl("logs " + talker);
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
  const size_t lines_before = Occurrences(Crictl("logs " + talker).text, "line-");
  ::kill(containerd_, SIGKILL);
  ::waitpid(containerd_, nullptr, 0);
  containerd_ = -1;
  ASSERT_NO_FATAL_FAILURE(SpawnContainerd());
  ASSERT_NO_FATAL_FAILURE(FindCrictl());
  for (const auto& id : live) EXPECT_TRUE(Running(id)) << Crictl("inspect " + id).text;
  EXPECT_NE(Crictl("inspect " + quitter).text.find("\"exitCode\": 7"), std::string::npos);
  EXPECT_EQ(LastLine(Crictl("exec -s " + talker + " echo alive").text), "alive");
  EXPECT_TRUE(attach_reaches("after-containerd"));
  // What the talker wrote while containerd was away waited in its FIFO: the log has no gap.
  std::this_thread::sleep_for(2s);
  auto logs_after = Crictl("logs " + talker);
  EXPECT_EQ(GapsOrRepeats(logs_after.text, "line-", 80), "") << logs_after.text;
  EXPECT_GE(Occurrences(logs_after.text, "line-"), lines_before + 20)
      << "the log stopped at the containerd restart";

  // The idle container's shim killed with -9: containerd cleans up after it (`shim delete`) and
  // reports the container exited; the guest no longer runs it; the others run on.
  auto shim = Sh("pgrep -f '[c]ontainerd-shim-peapod-v2.*-id " + idle + "'");
  ASSERT_EQ(shim.rc, 0) << "no shim for " << idle;
  Sh("kill -9 " + LastLine(shim.text));
  std::string state;
  for (int i = 0; i < 100 && state.find("CONTAINER_EXITED") == std::string::npos; ++i) {
    std::this_thread::sleep_for(200ms);
    state = Crictl("inspect " + idle).text;
  }
  // (Its exit code is 255, "unknown", as with runc: containerd's CRI sees the shim's Wait fail
  // before the cleanup's exit event.)
  EXPECT_NE(state.find("\"state\": \"CONTAINER_EXITED\""), std::string::npos) << state;
  auto ps = Crictl("exec -s " + talker + " ps");
  EXPECT_EQ(ps.rc, 0) << ps.text;
  EXPECT_EQ(ps.text.find("sleep 3599"), std::string::npos) << "the guest still runs it:\n"
                                                           << ps.text;
  EXPECT_TRUE(Running(talker));
  EXPECT_TRUE(Running(echoer));
  EXPECT_TRUE(attach_reaches("after-shim"));

  // Its exit was reported once.
  EXPECT_EQ(Occurrences(ReadAll(dir_ + "/containerd.log"),
                        "received container exit event container_id:\\\"" + quitter),
            1u)
      << "exit events for the quitter";
  RemoveAll(pod, ids);
  for (const auto& m : {"/sys/fs/cgroup/memory/", "/sys/fs/cgroup/unified/", "/sys/fs/cgroup/"}) {
    EXPECT_FALSE(fs::exists(m + cgroup_top + "/pod-rs/peapod-" + pod)) << "pod cgroup left";
  }
}

// Issue 16: resources updated through CRI land in the container's guest cgroup, visible from
// inside and in `crictl inspect`; an update the VM cannot hold is refused with the figures and
// changes nothing. 10 MiB of binary stdin through `exec -i` and through attach arrive
// sha256-exact. An exec whose child keeps its output open ends as containerd's drain contract
// says (drain_exec_sync_io_timeout), as it does with runc.
TEST_F(CriPathsTest, E_UpdatesLandInTheGuestAndStdinIsExact) {
  ASSERT_NO_FATAL_FAILURE(StartContainerd(/*v2=*/true));
  if (IsSkipped()) return;
  ASSERT_NO_FATAL_FAILURE(FindCrictl());
  if (IsSkipped()) return;
  std::string pod = RunPod("up");
  ASSERT_FALSE(pod.empty());
  WriteContainerConfig("limited", "sleep 3600",
                       R"({"resources": {"memory_limit_in_bytes": 134217728}})");
  WriteContainerConfig("reader", "cat > /tmp/in; wc -c < /tmp/in; sha256sum /tmp/in", "{}",
                       R"(, "stdin": true, "stdin_once": true)");
  std::string limited = StartContainer(pod, "up", "limited");
  std::string reader = StartContainer(pod, "up", "reader");
  ASSERT_FALSE(limited.empty());
  ASSERT_FALSE(reader.empty());
  auto cat = [&](const std::string& file) {
    return LastLine(Crictl("exec -s " + limited + " cat /sys/fs/cgroup/" + file).text);
  };
  EXPECT_EQ(cat("memory.max"), "134217728");

  ExpectStdinExact(limited, 10 << 20);

  // Through attach: the reader's stdin (stdin_once) ends when the attach's does.
  std::string want = WriteBlob(10 << 20);
  auto attach = Crictl("attach -i " + reader + " < " + dir_ + "/stdin.bin");
  EXPECT_EQ(attach.rc, 0) << attach.text;
  std::string log;
  for (int i = 0; i < 100 && log.find(want) == std::string::npos; ++i) {
    std::this_thread::sleep_for(200ms);
    log = Crictl("logs " + reader).text;
  }
  EXPECT_NE(log.find(std::to_string(10 << 20) + "\n"), std::string::npos)
      << "stdin through attach lost bytes: " << log;
  EXPECT_NE(log.find(want), std::string::npos) << log;

  auto update = Crictl("update --memory 67108864 " + limited);
  EXPECT_EQ(update.rc, 0) << update.text;
  EXPECT_EQ(cat("memory.max"), "67108864");
  update = Crictl("update --cpu-quota 50000 --cpu-period 100000 " + limited);
  EXPECT_EQ(update.rc, 0) << update.text;
  EXPECT_EQ(cat("cpu.max"), "50000 100000");
  auto inspect = Crictl("inspect " + limited).text;
  EXPECT_NE(inspect.find("\"limit\": 67108864"), std::string::npos) << inspect;
  EXPECT_NE(inspect.find("\"quota\": 50000"), std::string::npos) << inspect;

  // More than the VM has (512 MiB, 1 vCPU): refused, with what to do; nothing changes.
  update = Crictl("update --memory 68719476736 " + limited);
  EXPECT_NE(update.rc, 0) << update.text;
  EXPECT_NE(update.text.find("more than the pod's VM has"), std::string::npos) << update.text;
  update = Crictl("update --cpu-quota 400000 --cpu-period 100000 " + limited);
  EXPECT_NE(update.rc, 0) << update.text;
  EXPECT_NE(update.text.find("more than the pod's VM has"), std::string::npos) << update.text;
  EXPECT_EQ(cat("memory.max"), "67108864");
  EXPECT_EQ(cat("cpu.max"), "50000 100000");
  inspect = Crictl("inspect " + limited).text;
  EXPECT_NE(inspect.find("\"limit\": 67108864"), std::string::npos) << inspect;

  // The drain contract: the exec's shell exits, its sleep holds the output. containerd waits
  // drain_exec_sync_io_timeout, deletes the exec and reports the held output, as with runc.
  auto drained = Crictl("exec -s --timeout 60 " + limited + " sh -c 'sleep 600 & echo started'");
  EXPECT_NE(drained.rc, 0) << drained.text;
  EXPECT_NE(drained.text.find("io is still held by other processes"), std::string::npos)
      << drained.text;
  EXPECT_EQ(LastLine(Crictl("exec -s " + limited + " echo alive").text), "alive");

  RemoveAll(pod, {limited, reader});
}

// What a process holds: its threads, open fds and resident memory.
struct ProcUse {
  long threads = -1, fds = -1, rss_kib = -1;
};

long CountEntries(const std::string& dir) {
  std::error_code ec;
  long n = 0;
  for (fs::directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) ++n;
  return ec ? -1 : n;
}

ProcUse UseOf(pid_t pid) {
  ProcUse u;
  const std::string proc = "/proc/" + std::to_string(pid);
  u.threads = CountEntries(proc + "/task");
  u.fds = CountEntries(proc + "/fd");
  std::ifstream status(proc + "/status");
  for (std::string line; std::getline(status, line);) {
    if (line.rfind("VmRSS:", 0) == 0) u.rss_kib = std::atol(line.c_str() + 6);
  }
  return u;
}

std::string Show(const ProcUse& u) {
  return std::to_string(u.threads) + " threads, " + std::to_string(u.fds) + " fds, " +
         std::to_string(u.rss_kib) + " KiB RSS";
}

// Files under dir (recursively), or 0 when it does not exist.
long CountFiles(const std::string& dir) {
  std::error_code ec;
  long n = 0;
  for (fs::recursive_directory_iterator it(dir, ec), end; !ec && it != end; it.increment(ec)) {
    if (!it->is_directory(ec)) ++n;
  }
  return n;
}

// Issue 16: 100 cycles of create, start, exec, stop and remove, in pods of two containers (a
// keeper that lives as long as its pod, a worker made and removed each cycle; four pods of 25
// cycles), leave no growth in the sandboxer's or the keeper's shim's threads, fds and RSS, no
// growth in the guest's processes, and no process, mount, network device, disk, domain or file
// on the host once the pods are gone.
TEST_F(CriPathsTest, F_HundredCyclesLeaveNothingBehind) {
  ASSERT_NO_FATAL_FAILURE(StartContainerd(/*v2=*/true));
  if (IsSkipped()) return;
  ASSERT_NO_FATAL_FAILURE(FindCrictl());
  if (IsSkipped()) return;
  const char* env_root = std::getenv("PEAPOD_TEST_LIBVIRT_ROOT");
  const std::string libvirt_root =
      env_root && *env_root ? env_root : "/var/lib/peapod/test-libvirt";
  // Everything on the host a pod makes, counted. The CNI bridge, made by the first pod and
  // kept by CNI, is not counted.
  auto host = [&] {
    std::map<std::string, long> c;
    c["processes naming the test dir"] =
        std::atol(Sh("pgrep -f '[/]" + dir_.substr(1) + "' | wc -l").text.c_str());
    c["mounts under the test dir"] =
        std::atol(Sh("grep -c ' " + dir_ + "' /proc/self/mountinfo").text.c_str());
    c["network devices"] = CountEntries("/sys/class/net") - (fs::exists("/sys/class/net/ppcri0"));
    c["sandboxer state files"] = CountFiles(dir_ + "/state");
    c["sandboxer run files"] = CountFiles(dir_ + "/run");
    c["libvirt domain files"] = CountFiles(libvirt_root + "/run/qemu");
    c["libvirt domain dirs"] = CountEntries(libvirt_root + "/lib/qemu");
    c["libvirt QEMU logs"] = CountFiles(libvirt_root + "/log/qemu");
    c["QEMU processes"] = std::atol(Sh("pgrep -c '[q]emu-system'").text.c_str());
    return c;
  };
  // The sandboxer builds its VM template in the background (a VM, its TAP, share and files):
  // the count starts once that is over.
  for (int i = 0; i < 600; ++i) {
    std::string log = ReadAll(dir_ + "/sandboxer.log");
    if (log.find("pods start from it") != std::string::npos ||
        log.find("template: building it failed") != std::string::npos) {
      break;
    }
    std::this_thread::sleep_for(200ms);
  }
  const auto host_before = host();

  WriteContainerConfig("keeper", "sleep 3600");
  WriteContainerConfig("worker", "sleep 3600");
  ProcUse sandboxer_warm;
  int cycle = 0;
  for (int p = 0; p < 4; ++p) {
    const std::string name = "leak" + std::to_string(p);
    std::string pod = RunPod(name);
    ASSERT_FALSE(pod.empty());
    std::string keeper = StartContainer(pod, name, "keeper");
    ASSERT_FALSE(keeper.empty());
    auto shim = Sh("pgrep -f '[c]ontainerd-shim-peapod-v2.*-id " + keeper + "'");
    ASSERT_EQ(shim.rc, 0) << "no shim for " << keeper;
    const pid_t keeper_shim = std::atoi(LastLine(shim.text).c_str());
    ProcUse shim_early;
    std::string guest_early;
    for (int i = 0; i < 25; ++i, ++cycle) {
      std::string worker = StartContainer(pod, name, "worker");
      ASSERT_FALSE(worker.empty()) << "cycle " << cycle;
      auto e1 = Crictl("exec -s " + worker + " true");
      ASSERT_EQ(e1.rc, 0) << "cycle " << cycle << ": " << e1.text;
      auto e2 = Crictl("exec -s " + keeper + " true");
      ASSERT_EQ(e2.rc, 0) << "cycle " << cycle << ": " << e2.text;
      ASSERT_EQ(Crictl("stop -t 0 " + worker).rc, 0) << "cycle " << cycle;
      ASSERT_EQ(Crictl("rm " + worker).rc, 0) << "cycle " << cycle;
      if (i == 4) {
        std::this_thread::sleep_for(1s);  // threads of the last calls end
        shim_early = UseOf(keeper_shim);
        // User processes only: kernel threads ([kworker/0:1]) come and go.
        guest_early = Crictl("exec -s " + keeper + " sh -c \"ps | grep -vc ']$'\"").text;
      }
    }
    std::this_thread::sleep_for(1s);
    ProcUse shim_late = UseOf(keeper_shim);
    std::printf("keeper shim of pod %d after cycles 5 and 25: %s; %s\n", p,
                Show(shim_early).c_str(), Show(shim_late).c_str());
    EXPECT_EQ(shim_late.threads, shim_early.threads) << "pod " << p;
    EXPECT_EQ(shim_late.fds, shim_early.fds) << "pod " << p;
    EXPECT_LE(shim_late.rss_kib, shim_early.rss_kib + 2048) << "pod " << p;
    EXPECT_EQ(Crictl("exec -s " + keeper + " sh -c \"ps | grep -vc ']$'\"").text, guest_early)
        << "the guest's processes grew";
    RemoveAll(pod, {keeper});
    ProcUse sandboxer_now = UseOf(sandboxer_);
    std::printf("sandboxer after pod %d: %s\n", p, Show(sandboxer_now).c_str());
    if (p == 0) {
      sandboxer_warm = sandboxer_now;
    } else {
      EXPECT_EQ(sandboxer_now.threads, sandboxer_warm.threads) << "pod " << p;
      EXPECT_EQ(sandboxer_now.fds, sandboxer_warm.fds) << "pod " << p;
      EXPECT_LE(sandboxer_now.rss_kib, sandboxer_warm.rss_kib + 4096) << "pod " << p;
    }
  }
  EXPECT_EQ(cycle, 100);
  std::this_thread::sleep_for(1s);
  const auto host_after = host();
  for (const auto& [what, n] : host_before) {
    EXPECT_EQ(host_after.at(what), n) << what << " before and after 100 cycles";
  }
  // These pods' VMs came from the template (the sandboxer's default), through containerd.
  std::string log = ReadAll(dir_ + "/sandboxer.log");
  if (log.find("pods start from it") != std::string::npos) {
    EXPECT_NE(log.find(": restoring from template"), std::string::npos) << log;
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
