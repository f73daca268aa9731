// A QEMU VM booted from the guest image (vm-images/) with the agent channel on a unix socket,
// and a gtest fixture that skips, saying why, where QEMU or the image is missing. QEMU is
// started directly here; the sandboxer starts it through libvirt.
#pragma once

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <thread>

#include "../unit/loop_fixture.h"
#include "common/ttrpc/client.h"
#include "peapod/agent/v1/agent.pb.h"
#include "tests/common/agent_client.h"

namespace peapod::vmtest {

using namespace std::chrono_literals;
namespace fs = std::filesystem;
namespace v1 = peapod::agent::v1;
using agenttest::kAgent;
inline constexpr char kTestMac[] = "52:54:00:12:34:56";

inline std::string ImageDir() { return PEAPOD_VM_IMAGE_DIR; }

inline std::string FindQemu() {
  for (const char* p : {"/usr/bin/qemu-system-x86_64", "/usr/local/bin/qemu-system-x86_64"}) {
    if (::access(p, X_OK) == 0) return p;
  }
  return "";
}

// The command line vm-images chose for this kernel.
inline std::string KernelCmdline() {
  std::ifstream f(ImageDir() + "/cmdline");
  std::string line;
  std::getline(f, line);
  return line.empty() ? "console=ttyS0 panic=-1 quiet" : line;
}

// TCG unless PEAPOD_TEST_ACCEL says otherwise: a /dev/kvm that exists is not always one that
// works (on the CI machines it exists, and the guest hangs after the firmware).
inline std::string Accel() {
  const char* a = std::getenv("PEAPOD_TEST_ACCEL");
  return a && *a ? a : "tcg";
}

// One QEMU process with the agent channel on a unix socket that QEMU listens on.
class Vm {
 public:
  // disks: image files attached read-only to a virtio-scsi controller as target 0, LUN 0, 1...
  // share: a host directory exported over 9p with mount tag "peapod-share" (if not empty).
  explicit Vm(const std::string& dir, const std::vector<std::string>& disks = {},
              const std::string& share = "")
      : dir_(dir) {
    sock_ = dir + "/agent.sock";
    console_ = dir + "/console.log";
    std::vector<std::string> argv = {
        FindQemu(), "-M", "q35", "-accel", Accel(), "-m", "512", "-smp", "1", "-nodefaults",
        "-no-user-config", "-nographic", "-no-reboot", "-kernel", ImageDir() + "/vmlinux",
        "-initrd", ImageDir() + "/initrd.img", "-append", KernelCmdline(), "-serial",
        "file:" + console_, "-device", "virtio-serial-pci", "-chardev",
        "socket,id=agent,path=" + sock_ + ",server=on,wait=off", "-device",
        "virtserialport,chardev=agent,name=io.peapod.agent.0",
        // A NIC with no backend traffic: enough for the agent to find it by MAC and set it up.
        "-netdev", "user,id=n0,restrict=on", "-device",
        "virtio-net-pci,netdev=n0,mac=" + std::string(kTestMac)};
    if (!share.empty()) {
      argv.insert(argv.end(), {"-virtfs", "local,path=" + share +
                                              ",mount_tag=peapod-share,security_model=none"});
    }
    if (!disks.empty()) {
      argv.insert(argv.end(), {"-device", "virtio-scsi-pci,id=scsi0"});
      for (size_t i = 0; i < disks.size(); ++i) {
        std::string id = "disk" + std::to_string(i);
        argv.insert(
            argv.end(),
            {"-drive", "file=" + disks[i] + ",if=none,id=" + id + ",format=raw,readonly=on",
             "-device",
             "scsi-hd,bus=scsi0.0,channel=0,scsi-id=0,lun=" + std::to_string(i) + ",drive=" + id});
      }
    }
    start_ = std::chrono::steady_clock::now();
    pid_ = ::fork();
    if (pid_ == 0) {
      int null = ::open("/dev/null", O_RDWR);
      int log = ::open((dir + "/qemu.log").c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      ::dup2(null, 0);
      ::dup2(log, 1);
      ::dup2(log, 2);
      std::vector<char*> args;
      for (auto& a : argv) args.push_back(a.data());
      args.push_back(nullptr);
      ::execv(args[0], args.data());
      ::_exit(127);
    }
  }
  ~Vm() {
    if (pid_ > 0) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, nullptr, 0);
    }
  }
  const std::string& socket() const { return sock_; }
  // What the guest printed, and what QEMU said.
  std::string Console() const {
    std::ifstream f(console_), q(dir_ + "/qemu.log");
    return std::string(std::istreambuf_iterator<char>(f), {}) + "\n--- qemu:\n" +
           std::string(std::istreambuf_iterator<char>(q), {});
  }
  // Waits for QEMU to exit; returns false on timeout.
  bool WaitExit(std::chrono::milliseconds timeout) {
    auto end = std::chrono::steady_clock::now() + timeout;
    while (std::chrono::steady_clock::now() < end) {
      if (::waitpid(pid_, nullptr, WNOHANG) == pid_) {
        pid_ = -1;
        return true;
      }
      std::this_thread::sleep_for(20ms);
    }
    return false;
  }
  std::chrono::steady_clock::time_point started() const { return start_; }

 private:
  std::string dir_, sock_, console_;
  pid_t pid_ = -1;
  std::chrono::steady_clock::time_point start_;
};

class AgentVmTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (FindQemu().empty()) GTEST_SKIP() << "qemu-system-x86_64 is not installed";
    if (!fs::exists(ImageDir() + "/vmlinux") || !fs::exists(ImageDir() + "/initrd.img")) {
      GTEST_SKIP() << "no guest image in " << ImageDir() << " (the vm-images target builds it)";
    }
    dir_ = fs::temp_directory_path() / ("peapod-vmtest-" + std::to_string(::getpid()));
    fs::create_directories(dir_);
  }
  void TearDown() override {
    if (!dir_.empty()) fs::remove_all(dir_);
  }

  // Connects to QEMU's end of the channel and calls Check until the agent answers.
  std::shared_ptr<ttrpc::Client> ConnectAndCheck(peapod::testing::LoopThread& lt, Vm& vm,
                                                 v1::CheckResponse* out,
                                                 std::chrono::seconds budget = 120s) {
    return ConnectAndCheck(lt, vm.socket(), out, budget);
  }
  // The same for any socket that leads to an agent (QEMU's chardev, a mux).
  std::shared_ptr<ttrpc::Client> ConnectAndCheck(peapod::testing::LoopThread& lt,
                                                 const std::string& socket, v1::CheckResponse* out,
                                                 std::chrono::seconds budget = 120s) {
    auto end = std::chrono::steady_clock::now() + budget;
    while (std::chrono::steady_clock::now() < end) {
      auto fd = ConnectUnix(socket);
      if (!fd.ok()) {
        std::this_thread::sleep_for(20ms);
        continue;
      }
      auto client = lt.Sync([&] { return *ttrpc::Client::Create(lt.loop(), std::move(*fd)); });
      // Until the agent serves the port, a call has nobody to answer it: retry with a deadline.
      for (int i = 0; i < 1000 && std::chrono::steady_clock::now() < end; ++i) {
        ttrpc::CallOptions opts;
        opts.timeout = 500ms;
        auto r =
            client->CallSyncTyped<v1::CheckResponse>(kAgent, "Check", v1::CheckRequest(), opts);
        if (r.ok()) {
          *out = *r;
          return client;
        }
        if (r.error().code() != Code::kDeadlineExceeded) break;  // reconnect
      }
      lt.Sync([&] { client.reset(); });
    }
    return nullptr;
  }

  std::string dir_;
};

}  // namespace peapod::vmtest
