// peapod-sandboxer: the host side of peapod pods. Serves containerd's sandbox Controller API
// (gRPC, proxy plugin) and owns every pod's VM (libvirt), agent channel mux and state.
// Stopping it (SIGTERM) leaves pods running: a restart re-adopts them.
#include <signal.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <optional>
#include <string>
#include <thread>

#include <grpcpp/grpcpp.h>
#include <spdlog/spdlog.h>

#include "common/log/log.h"
#include "common/loop/event_loop.h"
#include "sandboxer/config.h"
#include "sandboxer/console_log.h"
#include "sandboxer/controller_service.h"
#include "sandboxer/ksm.h"
#include "sandboxer/libvirt_backend.h"
#include "sandboxer/node_check.h"
#include "sandboxer/pods.h"
#include "sandboxer/shim_service.h"
#include "sandboxer/vm_launcher.h"

namespace {

constexpr char kDefaultConfig[] = "/etc/peapod/sandboxer.json";

void Usage(FILE* out) {
  std::fprintf(out,
               "usage: peapod-sandboxer [--config FILE] [--log-level LEVEL]\n"
               "       peapod-sandboxer [--config FILE] --check\n"
               "       peapod-sandboxer --version | --help\n"
               "\n"
               "Serves containerd.services.sandbox.v1.Controller on a unix socket for\n"
               "containerd 2.x ([proxy_plugins.peapod] type = \"sandbox\") and runs one VM per\n"
               "pod through libvirt. Config: JSON, default %s (optional; see\n"
               "docs/sandboxer.md for every key and its default). --check says, in plain\n"
               "words, whether this node can run peapod pods (KVM or TCG, libvirt, QEMU, the\n"
               "guest image, tun/vhost, cgroups, tools, containerd and its config) and exits 1\n"
               "if it cannot.\n",
               kDefaultConfig);
}

struct Flags {
  std::string config_path = kDefaultConfig;
  bool config_given = false;
  std::string level;
  bool check = false;
};

// The command line into flags; an exit code when the program is done (--version, --help, a
// mistake).
std::optional<int> ParseFlags(int argc, char** argv, Flags& f) {
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--config" && i + 1 < argc) {
      f.config_path = argv[++i];
      f.config_given = true;
    } else if (a == "--log-level" && i + 1 < argc) {
      f.level = argv[++i];
    } else if (a == "--check") {
      f.check = true;
    } else if (a == "--version") {
      std::printf("peapod-sandboxer %s\n", PEAPOD_VERSION);
      return 0;
    } else if (a == "--help" || a == "-h") {
      Usage(stdout);
      return 0;
    } else {
      std::fprintf(stderr, "peapod-sandboxer: unknown argument '%s'\n", a.c_str());
      Usage(stderr);
      return 2;
    }
  }
  return std::nullopt;
}

void StartKsmIfAsked(const peapod::sandboxer::Config& cfg) {
  if (!cfg.ksm) return;
  auto started = peapod::sandboxer::StartKsm();
  if (!started.ok()) {
    spdlog::warn("sandboxer: ksm: {}", started.error().ToString());
  } else {
    spdlog::info("sandboxer: ksm {}", *started ? "started" : "already running");
  }
}

// containerd's sandbox Controller over gRPC on cfg.listen (0600); null if it cannot serve.
std::unique_ptr<grpc::Server> ServeController(const peapod::sandboxer::Config& cfg,
                                              peapod::sandboxer::ControllerService* service) {
  std::error_code ec;
  std::filesystem::create_directories(std::filesystem::path(cfg.listen).parent_path(), ec);
  std::filesystem::remove(cfg.listen, ec);
  grpc::ServerBuilder builder;
  builder.AddListeningPort("unix://" + cfg.listen, grpc::InsecureServerCredentials());
  builder.RegisterService(service);
  auto server = builder.BuildAndStart();
  if (server) ::chmod(cfg.listen.c_str(), 0600);
  return server;
}

// The shims' API, on the control loop itself, on cfg.shim_listen (0600).
peapod::Result<void> ServeShimApi(const peapod::sandboxer::Config& cfg, peapod::ttrpc::Server& s,
                                  peapod::sandboxer::PodManager* pods) {
  peapod::sandboxer::RegisterShimService(s, pods);
  std::error_code ec;
  std::filesystem::create_directories(std::filesystem::path(cfg.shim_listen).parent_path(), ec);
  PP_TRY(s.Listen(cfg.shim_listen));
  ::chmod(cfg.shim_listen.c_str(), 0600);
  return peapod::Ok();
}

// Signals are taken by a signalfd on the loop: blocked before any thread starts.
sigset_t BlockSignals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  ::pthread_sigmask(SIG_BLOCK, &set, nullptr);
  ::signal(SIGPIPE, SIG_IGN);
  return set;
}

// SIGTERM/SIGINT: answer the pending Waits, remove the pool, stop the loop; pods keep running.
peapod::Result<peapod::UniqueFd> OnExitSignals(peapod::EventLoop* loop, const sigset_t& set,
                                               peapod::sandboxer::PodManager* pods) {
  peapod::UniqueFd sfd(::signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK));
  if (!sfd) return peapod::Error::Errno("signalfd");
  int fd = sfd.get();
  PP_TRY(loop->Watch(fd, EPOLLIN, [fd, loop, pods](uint32_t) {
    signalfd_siginfo info;
    while (::read(fd, &info, sizeof(info)) == sizeof(info)) {
      spdlog::info("sandboxer: signal {}: exiting; pods keep running", info.ssi_signo);
      pods->Quit([loop] { loop->Stop(); });
    }
  }));
  return sfd;
}

}  // namespace

int main(int argc, char** argv) {
  using namespace peapod;
  using namespace std::chrono_literals;
  Flags flags;
  if (auto code = ParseFlags(argc, argv, flags)) return *code;
  auto cfg = sandboxer::Config::Load(flags.config_path, flags.config_given);
  if (!cfg.ok()) {
    std::fprintf(stderr, "peapod-sandboxer: %s\n", cfg.error().ToString().c_str());
    return 2;
  }
  if (!flags.level.empty()) cfg->log_level = flags.level;
  if (auto r = log::Init({.program = "peapod-sandboxer", .level = cfg->log_level, .file = ""});
      !r.ok()) {
    std::fprintf(stderr, "peapod-sandboxer: %s\n", r.error().ToString().c_str());
    return 2;
  }

  if (flags.check) return sandboxer::CheckNode(*cfg, stdout);
  const sigset_t signals = BlockSignals();

  const bool huge_pages = cfg->guest_huge_pages == "on" ||
                          (cfg->guest_huge_pages == "auto" && sandboxer::UsesKvm(*cfg));
  auto backend = sandboxer::LibvirtBackend::Open({.uri = cfg->libvirt_uri,
                                                  .embed_root = cfg->libvirt_root,
                                                  .share_server = cfg->share_server,
                                                  .guest_huge_pages = huge_pages});
  if (!backend.ok()) {
    spdlog::critical("sandboxer: {}", backend.error().ToString());
    return 1;
  }
  auto loop_or = EventLoop::Create();
  if (!loop_or.ok()) {
    spdlog::critical("sandboxer: {}", loop_or.error().ToString());
    return 1;
  }
  EventLoop* loop = loop_or->get();
  sandboxer::PodManager pods(loop, *cfg, backend->get());
  (*backend)->SetOnStopped([&pods](const std::string& name) { pods.VmStopped(name); });
  if (auto r = pods.Recover(); !r.ok()) {
    spdlog::critical("sandboxer: recovering state from {}: {}", cfg->state_dir,
                     r.error().ToString());
    return 1;
  }
  StartKsmIfAsked(*cfg);
  // The VM template (loaded, or built in the background), then pool_size pre-started VMs
  // (none by default).
  pods.PrepareTemplate();

  sandboxer::ControllerService service(loop, &pods);
  auto server = ServeController(*cfg, &service);
  if (!server) {
    spdlog::critical("sandboxer: cannot serve gRPC on {}", cfg->listen);
    return 1;
  }
  ttrpc::Server shim_server(loop);
  if (auto r = ServeShimApi(*cfg, shim_server, &pods); !r.ok()) {
    spdlog::critical("sandboxer: cannot serve the shim API on {}: {}", cfg->shim_listen,
                     r.error().ToString());
    return 1;
  }
  // Unused layer images go once they have been unused for layer_cache_keep_seconds.
  std::function<void()> collect = [&] {
    pods.layer_cache().Collect();
    loop->AddTimer(60s, collect);
  };
  loop->AddTimer(60s, collect);
  // The guests' console logs stay under kConsoleLogCap (plus what a guest writes in a second).
  sandboxer::ConsoleLogCapper console_logs({cfg->state_dir + "/pods", cfg->state_dir + "/pool"});
  spdlog::info("sandboxer: serving {} and {} (state {}, libvirt {})", cfg->listen, cfg->shim_listen,
               cfg->state_dir, (*backend)->uri());

  auto sfd = OnExitSignals(loop, signals, &pods);
  if (!sfd.ok()) {
    spdlog::critical("sandboxer: {}", sfd.error().ToString());
    return 1;
  }
  loop->Run();
  // Pending Waits were answered above. A call still inside the loop's work (a Start halfway)
  // can no longer finish; its state is on disk and the next sandboxer recovers it, so do not
  // wait for it longer than a moment.
  std::thread([&server] { server->Shutdown(std::chrono::system_clock::now() + 1s); }).detach();
  std::this_thread::sleep_for(1500ms);
  std::fflush(nullptr);
  std::_Exit(0);
}
