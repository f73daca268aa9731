// peapod-agent: PID 1 of a pod's VM (or, with --listen, a local process for tests).
//
//   peapod-agent                       in the guest: set up, then serve the virtio-serial port
//   peapod-agent --listen PATH         local mode: serve a unix socket, no PID 1 duties
#include <fcntl.h>
#include <sys/prctl.h>
#include <unistd.h>

#include <cstring>
#include <optional>
#include <string>
#include <string_view>

#include <spdlog/spdlog.h>

#include "common/log/log.h"
#include "common/loop/event_loop.h"
#include "common/ttrpc/server.h"
#include "podagent/agent_service.h"
#include "podagent/channel.h"
#include "podagent/pid1.h"

namespace {

constexpr char kModuleList[] = "/etc/peapod/modules";

void Usage() {
  std::fprintf(stderr,
               "usage: peapod-agent [--listen SOCKET] [--run-dir DIR] [--cgroup-root DIR]\n"
               "                    [--crun PATH] [--fixed-helper-addresses auto|on|off]\n"
               "                    [--exec-with agent|crun] [--log-level LEVEL]\n"
               "  As PID 1 of a peapod guest it mounts the basics, loads modules and serves\n"
               "  peapod.agent.v1 on the virtio-serial port %s.\n"
               "  --listen SOCKET    serve on a unix socket instead (local test mode)\n"
               "  --run-dir DIR      bundles and sockets (default /run/peapod)\n"
               "  --cgroup-root DIR  cgroup v2 mount for container cgroups; empty: none\n"
               "                     (default /sys/fs/cgroup in a VM, none in local mode)\n"
               "  --crun PATH        the OCI runtime (default /usr/bin/crun)\n"
               "  --fixed-helper-addresses auto|on|off\n"
               "                     run crun without address randomization, so TCG reuses\n"
               "                     its translated code (auto: on when the CPU is QEMU's TCG)\n"
               "  --exec-with agent|crun\n"
               "                     who starts exec processes (default agent: crun only for\n"
               "                     what the agent does not do itself, e.g. a terminal)\n",
               peapod::agent::kPortName);
}

// In the guest a failure to start leaves nothing to serve: say why on the console and power off
// (returning from PID 1 would panic the kernel and hide the message).
[[noreturn]] void Fatal(bool pid1, const peapod::Error& e) {
  spdlog::critical("agent: {}", e.ToString());
  if (pid1) peapod::agent::PowerOff();
  std::exit(1);
}

}  // namespace

int main(int argc, char** argv) {
  using namespace peapod;
  // The guest image links /sbin/modprobe to the agent, for the kernel's module requests.
  if (std::string_view self = argv[0]; self.substr(self.rfind('/') + 1) == "modprobe") {
    return agent::ModprobeMain(argc, argv);
  }
  std::string listen_path;
  std::string level = "info";
  agent::ContainerOptions copts;
  std::optional<std::string> cgroup_root;
  std::string fixed_addresses = "auto";
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--listen" && i + 1 < argc) {
      listen_path = argv[++i];
    } else if (a == "--run-dir" && i + 1 < argc) {
      copts.run_dir = argv[++i];
    } else if (a == "--cgroup-root" && i + 1 < argc) {
      cgroup_root = argv[++i];
    } else if (a == "--crun" && i + 1 < argc) {
      copts.crun = argv[++i];
    } else if (a == "--fixed-helper-addresses" && i + 1 < argc) {
      fixed_addresses = argv[++i];
      if (fixed_addresses != "auto" && fixed_addresses != "on" && fixed_addresses != "off") {
        std::fprintf(stderr, "peapod-agent: --fixed-helper-addresses takes auto, on or off\n");
        return 2;
      }
    } else if (a == "--exec-with" && i + 1 < argc) {
      std::string with = argv[++i];
      if (with != "agent" && with != "crun") {
        std::fprintf(stderr, "peapod-agent: --exec-with takes agent or crun\n");
        return 2;
      }
      copts.agent_exec = with == "agent";
    } else if (a == "--log-level" && i + 1 < argc) {
      level = argv[++i];
    } else if (a == "--version") {
      std::printf("peapod-agent %s\n", PEAPOD_VERSION);
      return 0;
    } else {
      Usage();
      return a == "--help" || a == "-h" ? 0 : 2;
    }
  }
  const bool pid1 = ::getpid() == 1;
  if (auto r = log::Init({.program = "peapod-agent", .level = level, .file = ""}); !r.ok()) {
    std::fprintf(stderr, "peapod-agent: %s\n", r.error().ToString().c_str());
    return 2;
  }

  if (pid1) {
    if (auto r = agent::LeaveInitramfs(); !r.ok()) {
      spdlog::warn("agent: {}; containers will run with crun --no-pivot", r.error().ToString());
      copts.no_pivot = true;
    }
    if (auto r = agent::MountBasics(); !r.ok()) Fatal(pid1, r.error());
    auto loaded = agent::LoadModules(kModuleList);
    if (!loaded.ok()) Fatal(pid1, loaded.error());
    spdlog::info("agent: loaded {} modules; emptied their files ({} KiB)", *loaded,
                 agent::FreeLoadedModuleFiles(kModuleList, "/etc/peapod") / 1024);
    if (auto r = agent::LoopbackUp(); !r.ok()) spdlog::warn("agent: {}", r.error().ToString());
    if (auto r = agent::ServeFromReadOnlyRamfs(copts.crun, "/run/peapod-crun"); !r.ok()) {
      spdlog::warn("agent: {}", r.error().ToString());
    }
    if (auto skips = agent::CrunSkipsItsCopy(copts.crun); skips.ok() && *skips) {
      spdlog::info("agent: {} is on a read-only ramfs: crun runs without copying itself first",
                   copts.crun);
    } else {
      spdlog::warn(
          "agent: crun copies itself before each command ({})",
          skips.ok() ? "its binary is on a writable or shmem mount" : skips.error().ToString());
    }
  } else {
    if (!cgroup_root && ::geteuid() == 0) {
      if (auto r = agent::PrivateCgroup2(); !r.ok()) Fatal(pid1, r.error());
    }
    // Container processes are reparented to the agent once crun exits.
    if (::prctl(PR_SET_CHILD_SUBREAPER, 1) < 0) Fatal(pid1, Error::Errno("PR_SET_CHILD_SUBREAPER"));
  }
  copts.cgroup_root = cgroup_root.value_or(pid1 ? "/sys/fs/cgroup" : "");
  copts.fixed_helper_addresses =
      fixed_addresses == "on" || (fixed_addresses == "auto" && agent::UnderTcg());
  if (copts.fixed_helper_addresses) {
    spdlog::info(
        "agent: crun runs at fixed addresses (--fixed-helper-addresses {}); containers "
        "keep address randomization",
        fixed_addresses);
  }

  auto loop_or = EventLoop::Create();
  if (!loop_or.ok()) Fatal(pid1, loop_or.error());
  EventLoop* loop = loop_or->get();
  agent::Reaper reaper;
  if (auto r = agent::WatchSignals(loop, pid1, &reaper); !r.ok()) Fatal(pid1, r.error());
  agent::ContainerManager containers(loop, &reaper, copts);
  if (auto r = containers.Init(); !r.ok()) Fatal(pid1, r.error());

  agent::PortRelay ports(loop);
  ttrpc::Server server(loop);
  // The host stops reading the channel while one of its clients is slow (AgentMux
  // back-pressure); answers wait here, in the guest's memory, instead of being dropped.
  server.set_max_queued_bytes(ttrpc::kNoQueueCap);
  agent::RegisterAgentService(server, loop, &containers, &ports,
                              {.shutdown =
                                   [pid1, loop] {
                                     if (pid1) agent::PowerOff();
                                     loop->Stop();
                                   },
                               .local = !pid1});

  std::unique_ptr<agent::PortChannel> channel;
  if (!listen_path.empty()) {
    if (auto r = server.Listen(listen_path); !r.ok()) Fatal(pid1, r.error());
    spdlog::info("agent: serving socket={}", listen_path);
  } else {
    // vsock where the VM has it, virtio-serial otherwise (or as well, if both are offered).
    bool vsock = false;
    if (agent::HasVsockDevice()) {
      auto listener = agent::ListenVsock(agent::kVsockPort);
      if (listener.ok() && server.ServeListener(std::move(*listener)).ok()) {
        vsock = true;
        spdlog::info("agent: ready vsock port={}", agent::kVsockPort);
      } else if (!listener.ok()) {
        spdlog::warn("agent: {}", listener.error().ToString());
      }
    }
    auto port = agent::FindVirtioPort(
        agent::kPortName, vsock ? std::chrono::milliseconds(0) : std::chrono::seconds(10));
    if (port.ok()) {
      UniqueFd fd(::open(port->c_str(), O_RDWR | O_CLOEXEC | O_NONBLOCK));
      if (!fd) Fatal(pid1, Error::Errno("open " + *port));
      spdlog::info("agent: ready port={}", *port);
      channel = std::make_unique<agent::PortChannel>(loop, &server, std::move(fd));
      channel->Start();
    } else if (!vsock) {
      Fatal(pid1, port.error());
    }
  }
  loop->Run();
  if (pid1) agent::PowerOff();
  return 0;
}
