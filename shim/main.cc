// containerd-shim-peapod-v2: containerd's runtime v2 shim for peapod, one per container.
//
//   containerd-shim-peapod-v2 [flags] start    start the shim server; print its address
//   containerd-shim-peapod-v2 [flags] delete   clean up after a shim that died
//   containerd-shim-peapod-v2 -info            print a RuntimeInfo (the OCI features) on stdout
//   flags (set by containerd): -namespace NS -address SOCK -publish-binary PATH -id ID
//                              [-bundle DIR] [-debug]
//
// The container's pod lives in peapod-sandboxer (socket: $PEAPOD_SANDBOXER_SOCKET, default
// /run/peapod/shim.sock); the shim speaks to the pod's agent through the sandboxer's mux.
#include <fcntl.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include <google/protobuf/util/time_util.h>
#include <spdlog/spdlog.h>

#include "common/base/unique_fd.h"
#include "common/log/log.h"
#include "common/ttrpc/server.h"
#include "containerd/runtime/task/v2/shim.pb.h"
#include "shim/events.h"
#include "shim/runtime_info.h"
#include "shim/task_service.h"

namespace fs = std::filesystem;
using namespace peapod;

namespace {

constexpr int kListenFd = 3;  // the server socket, handed from `start` to the server

struct Args {
  std::map<std::string, std::string> flags;
  bool debug = false;
  std::string action;
};

int Usage(const char* why) {
  std::fprintf(stderr,
               "containerd-shim-peapod-v2: %s\n"
               "usage: containerd-shim-peapod-v2 -namespace NS -address SOCK -id ID "
               "[-publish-binary PATH] [-bundle DIR] [-debug] start|delete\n"
               "(containerd runs this; configure it as runtime io.containerd.peapod.v2)\n",
               why);
  return 2;
}

Args Parse(int argc, char** argv) {
  Args a;
  for (int i = 1; i < argc; ++i) {
    std::string s = argv[i];
    if (s == "-debug" || s == "--debug") {
      a.debug = true;
    } else if (s == "-v" || s == "--version" || s == "-version") {
      a.action = "version";
    } else if (s == "-info" || s == "--info") {
      a.action = "info";
    } else if (s.size() > 1 && s[0] == '-') {
      std::string key = s.substr(s.rfind('-', 1) == 1 ? 2 : 1);
      if (auto eq = key.find('='); eq != std::string::npos) {
        a.flags[key.substr(0, eq)] = key.substr(eq + 1);
      } else if (i + 1 < argc) {
        a.flags[key] = argv[++i];
      }
    } else {
      a.action = s;
    }
  }
  return a;
}

std::string Flag(const Args& a, const std::string& k) {
  auto it = a.flags.find(k);
  return it == a.flags.end() ? "" : it->second;
}

shim::ShimOptions OptionsFrom(const Args& a) {
  shim::ShimOptions o;
  o.id = Flag(a, "id");
  o.ns = Flag(a, "namespace");
  o.bundle = Flag(a, "bundle");
  if (o.bundle.empty()) o.bundle = fs::current_path().string();
  const char* s = std::getenv("PEAPOD_SANDBOXER_SOCKET");
  o.sandboxer = s && *s ? s : "/run/peapod/shim.sock";
  return o;
}

// The shim's socket: one per container, named by a hash (unix socket paths are short).
std::string SocketPath(const Args& a) {
  uint64_t h = 1469598103934665603ull;
  for (char ch : Flag(a, "address") + "\n" + Flag(a, "namespace") + "\n" + Flag(a, "id")) {
    h = (h ^ static_cast<unsigned char>(ch)) * 1099511628211ull;
  }
  const char* dir = std::getenv("PEAPOD_SHIM_SOCKET_DIR");
  return fmt::format("{}/{:016x}.sock", dir && *dir ? dir : "/run/peapod/shims", h);
}

int Start(const Args& a, char** argv) {
  auto opts = OptionsFrom(a);
  if (opts.id.empty() || opts.ns.empty()) return Usage("start needs -id and -namespace");
  std::string path = SocketPath(a);
  std::string address = "unix://" + path;
  // A shim already serving this container (containerd retried start): reuse it.
  if (ConnectUnix(path).ok()) {
    std::printf("%s", address.c_str());
    return 0;
  }
  std::error_code ec;
  fs::create_directories(fs::path(path).parent_path(), ec);
  auto listener = ListenUnix(path);
  if (!listener.ok()) {
    std::fprintf(stderr, "containerd-shim-peapod-v2: %s\n", listener.error().ToString().c_str());
    return 1;
  }
  ::chmod(path.c_str(), 0600);
  // Exec the binary by its path (not /proc/self/exe) so the server's process name is ours.
  std::error_code lec;
  std::string self = fs::read_symlink("/proc/self/exe", lec).string();
  if (self.empty()) self = "/proc/self/exe";
  pid_t pid = ::fork();
  if (pid < 0) {
    std::perror("fork");
    return 1;
  }
  if (pid == 0) {
    ::setsid();
    if (listener->get() == kListenFd) {
      ::fcntl(kListenFd, F_SETFD, 0);  // keep it across exec
    } else {
      ::dup2(listener->get(), kListenFd);  // dup2 clears close-on-exec
    }
    // Never keep containerd's pipes of the start command: it waits for them to close.
    int null = ::open("/dev/null", O_RDWR | O_CLOEXEC);
    ::dup2(null, 0);
    ::dup2(null, 1);
    ::dup2(null, 2);
    std::vector<std::string> args = {self,       "-namespace",       opts.ns,   "-id",      opts.id,
                                     "-address", Flag(a, "address"), "-bundle", opts.bundle};
    if (a.debug) args.push_back("-debug");
    args.push_back("serve");
    std::vector<char*> cargs;
    for (auto& s : args) cargs.push_back(s.data());
    cargs.push_back(nullptr);
    ::execv(self.c_str(), cargs.data());
    ::_exit(127);
  }
  (void)argv;
  std::ofstream(opts.bundle + "/address") << address;
  std::printf("%s", address.c_str());
  return 0;
}

int Delete(const Args& a) {
  auto opts = OptionsFrom(a);
  shim::CleanupAfterDeadShim(opts);
  containerd::task::v2::DeleteResponse resp;
  resp.set_exit_status(137);  // what containerd reports for a task whose shim died
  *resp.mutable_exited_at() = google::protobuf::util::TimeUtil::GetCurrentTime();
  std::string out = resp.SerializeAsString();
  std::fwrite(out.data(), 1, out.size(), stdout);
  return 0;
}

// containerd writes the handler's runtime options on stdin; peapod takes none that change its
// features, so they are read (the writer is not left blocked) and dropped.
int Info() {
  if (!::isatty(0)) {
    char buf[4096];
    while (::read(0, buf, sizeof buf) > 0) {
    }
  }
  std::string out = shim::RuntimeInfoBytes(PEAPOD_VERSION);
  std::fwrite(out.data(), 1, out.size(), stdout);
  return std::fflush(stdout) == 0 ? 0 : 1;
}

int Serve(const Args& a) {
  auto opts = OptionsFrom(a);
  // fd 3 must be the listening socket `start` handed over; anything else is a bug, not a
  // server to run.
  int listening = 0;
  socklen_t len = sizeof listening;
  if (::getsockopt(kListenFd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) < 0 || !listening) {
    return 1;
  }
  // containerd reads the shim's log from the "log" FIFO in the bundle, when it made one.
  int logfd = ::open((opts.bundle + "/log").c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC);
  if (logfd >= 0) {
    ::fcntl(logfd, F_SETFL, ::fcntl(logfd, F_GETFL) & ~O_NONBLOCK);
    ::dup2(logfd, 2);
  }
  if (auto r = log::Init({.program = "containerd-shim-peapod-v2",
                          .level = a.debug ? "debug" : "info",
                          .file = ""});
      !r.ok()) {
    return 1;
  }
  ::signal(SIGPIPE, SIG_IGN);
  auto loop_or = EventLoop::Create();
  if (!loop_or.ok()) return 1;
  EventLoop* loop = loop_or->get();
  const char* ttrpc_addr = std::getenv("TTRPC_ADDRESS");
  shim::EventPublisher events(loop, ttrpc_addr ? ttrpc_addr : "", opts.ns);
  ttrpc::Server server(loop);
  shim::TaskService tasks(loop, opts, &events);
  tasks.Register(server);
  tasks.SetOnShutdown([loop] { loop->Stop(); });
  if (auto r = server.ServeListener(UniqueFd(kListenFd)); !r.ok()) {
    spdlog::critical("shim: {}", r.error().ToString());
    return 1;
  }
  spdlog::info("shim: serving container {} (namespace {})", opts.id, opts.ns);
  loop->Run();
  ::unlink(SocketPath(a).c_str());
  spdlog::info("shim: {} exiting", opts.id);
  std::fflush(nullptr);
  std::_Exit(0);
}

}  // namespace

int main(int argc, char** argv) {
  Args a = Parse(argc, argv);
  if (a.action == "version") {
    std::printf("containerd-shim-peapod-v2 %s\n", PEAPOD_VERSION);
    return 0;
  }
  // start, delete and info answer containerd on stdout: anything logged goes to stderr, which
  // containerd copies into its own log. (spdlog's default logger writes to stdout: a warning
  // from delete's cleanup made its DeleteResponse unreadable, and containerd reported the task's
  // exit as 255 instead of 137.)
  if (a.action != "serve") {
    (void)log::Init(
        {.program = "containerd-shim-peapod-v2", .level = a.debug ? "debug" : "info", .file = ""});
  }
  if (a.action == "info") return Info();
  if (a.action == "start") return Start(a, argv);
  if (a.action == "delete") return Delete(a);
  if (a.action == "serve") return Serve(a);
  return Usage(a.action.empty() ? "no action" : ("unknown action " + a.action).c_str());
}
