#include "podagent/channel.h"

#include <dirent.h>
#include <fcntl.h>
#include <linux/vm_sockets.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <thread>

#include <spdlog/spdlog.h>

namespace peapod::agent {

bool HasVsockDevice() {
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(
           "/sys/bus/virtio/drivers/vmw_vsock_virtio_transport", ec)) {
    if (e.path().filename().string().rfind("virtio", 0) == 0) return true;
  }
  return false;
}

Result<UniqueFd> ListenVsock(unsigned port) {
  UniqueFd fd(::socket(AF_VSOCK, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) return Error::Errno("vsock socket");
  sockaddr_vm addr{};
  addr.svm_family = AF_VSOCK;
  addr.svm_cid = VMADDR_CID_ANY;
  addr.svm_port = port;
  if (::bind(fd.get(), reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) < 0) {
    return Error::Errno(fmt::format("bind vsock port {}", port));
  }
  if (::listen(fd.get(), 64) < 0) return Error::Errno("listen vsock");
  return fd;
}

namespace {
constexpr auto kHostPollInterval = std::chrono::milliseconds(20);
}

Result<std::string> FindVirtioPort(const std::string& name, std::chrono::milliseconds timeout,
                                   const std::string& sysfs_root) {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    if (DIR* dir = ::opendir(sysfs_root.c_str())) {
      std::string found;
      while (dirent* e = ::readdir(dir)) {
        if (e->d_name[0] == '.') continue;
        std::ifstream f(sysfs_root + "/" + e->d_name + "/name");
        std::string port_name;
        if (f && std::getline(f, port_name) && port_name == name) found = e->d_name;
      }
      ::closedir(dir);
      if (!found.empty()) {
        std::string dev = "/dev/" + found;
        if (::access(dev.c_str(), F_OK) == 0) return dev;
      }
    }
    if (std::chrono::steady_clock::now() >= deadline) {
      return Error::NotFound(
          "no virtio-serial port named {} under {} after {} ms: is the VM's channel configured "
          "and virtio_console loaded?",
          name, sysfs_root, timeout.count());
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

void PortChannel::Start() { CheckHost(); }

void PortChannel::CheckHost() {
  // While no host is connected the port polls as HUP; when one connects, HUP clears.
  pollfd p{port_.get(), POLLIN, 0};
  int n = ::poll(&p, 1, 0);
  if (n < 0 || (p.revents & POLLHUP)) {
    loop_->AddTimer(kHostPollInterval, [this] { CheckHost(); });
    return;
  }
  UniqueFd session(::fcntl(port_.get(), F_DUPFD_CLOEXEC, 0));
  if (!session) {
    spdlog::error("agent: dup of the channel port failed: {}", Error::Errno("dup").ToString());
    loop_->AddTimer(kHostPollInterval, [this] { CheckHost(); });
    return;
  }
  ++sessions_;
  spdlog::info("agent: host connected session={}", sessions_);
  auto r = server_->ServeConnection(std::move(session), [this] {
    spdlog::info("agent: host session {} ended", sessions_);
    loop_->AddTimer(kHostPollInterval, [this] { CheckHost(); });
  });
  if (!r.ok()) {
    spdlog::error("agent: serving the channel failed: {}", r.error().ToString());
    loop_->AddTimer(kHostPollInterval, [this] { CheckHost(); });
  }
}

}  // namespace peapod::agent
