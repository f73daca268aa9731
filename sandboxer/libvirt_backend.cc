#include "sandboxer/libvirt_backend.h"

#include <fcntl.h>
#include <libvirt/libvirt-qemu.h>
#include <libvirt/libvirt.h>
#include <libvirt/virterror.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

#include "common/base/unique_fd.h"
#include "sandboxer/domain_xml.h"
#include "sandboxer/share_server.h"
#include "sandboxer/state.h"
#include "sandboxer/template.h"

namespace peapod::sandboxer {

namespace fs = std::filesystem;

namespace {

Error LibvirtError(const std::string& what) {
  const virError* e = virGetLastError();
  std::string msg = e && e->message ? e->message : "unknown libvirt error";
  Code code = Code::kInternal;
  if (e && (e->code == VIR_ERR_NO_DOMAIN || e->code == VIR_ERR_DEVICE_MISSING))
    code = Code::kNotFound;
  if (e && (e->code == VIR_ERR_OPERATION_INVALID)) code = Code::kFailedPrecondition;
  return Error(code, what + ": " + msg);
}

// The embedded driver reads <root>/etc/qemu.conf. Written on every start so a changed peapod
// gets its settings. A pod's QEMU runs as a uid of its own (the domain's DAC seclabel) with no
// capabilities, in a mount namespace of its own, under libvirt's seccomp sandbox; libvirt
// never chowns the shared kernel, initrd or layer images (dynamic ownership off): the
// sandboxer gives each VM what it may open. "none" names no MAC driver; libvirt's DAC driver
// is always there. The user/group here are only the default for a domain without a seclabel.
Result<void> WriteQemuConf(const std::string& root) {
  std::error_code ec;
  fs::create_directories(root + "/etc", ec);
  if (ec) return Error::Errno("mkdir " + root + "/etc", ec.value());
  std::ofstream f(root + "/etc/qemu.conf", std::ios::trunc);
  f << "# Written by peapod-sandboxer for libvirt's embedded QEMU driver.\n"
       "stdio_handler = \"file\"\n"
       "user = \"root\"\n"
       "group = \"root\"\n"
       "dynamic_ownership = 0\n"
       "remember_owner = 0\n"
       "clear_emulator_capabilities = 1\n"
       "seccomp_sandbox = 1\n"
       "security_driver = \"none\"\n"
       "namespaces = [ \"mount\" ]\n";
  f.flush();
  if (!f) return Error::Errno("write " + root + "/etc/qemu.conf");
  return Ok();
}

// <root>/peapod-qemu, for a QEMU that runs as root (vm_uid_base 0): a bounding set of only the
// file capabilities its own 9p passthrough needs, so an escape cannot load modules, mount or
// make device nodes. Rewritten only when it changes: libvirt keys its cached QEMU
// capabilities (a probe of ~80 s under TCG) on the emulator file. A confined QEMU (its own
// uid) runs the plain binary: it has no capabilities to bound.
Result<std::string> WriteQemuWrapper(const std::string& root) {
  const char* qemu = "/usr/bin/qemu-system-x86_64";
  const char* setpriv = "/usr/bin/setpriv";
  if (::access(setpriv, X_OK) != 0 || ::access(qemu, X_OK) != 0) {
    spdlog::warn("libvirt: {} or {} missing: a root QEMU keeps every capability", setpriv, qemu);
    return std::string();
  }
  std::string path = root + "/peapod-qemu";
  std::string text = fmt::format(
      "#!/bin/sh\n"
      "# Written by peapod-sandboxer: QEMU with only the capabilities 9p passthrough needs.\n"
      "exec {} --bounding-set -all,+chown,+dac_override,+dac_read_search,+fowner,+fsetid "
      "--inh-caps -all -- {} \"$@\"\n",
      setpriv, qemu);
  std::ifstream old(path);
  std::string have((std::istreambuf_iterator<char>(old)), {});
  if (have != text) {
    PP_TRY(WriteFileAtomic(path, text));
    if (::chmod(path.c_str(), 0755) < 0) return Error::Errno("chmod " + path);
  }
  return path;
}

void EventTimer(int, void*) {}

// Zombie children that are nobody's to wait for: QEMUs libvirt starts to probe capabilities are
// daemonized, so as child subreaper we inherit them, and nobody waits for them when libvirt
// kills them. libvirt waits for its own direct children at once; a zombie child still there a
// sweep later (10 s) is an orphan we adopted, and is reaped by pid (never waitpid(-1)).
void ReapOrphans(int, void* opaque) {
  auto* seen = static_cast<std::set<pid_t>*>(opaque);
  std::set<pid_t> now;
  const std::string me = std::to_string(::getpid());
  std::error_code ec;
  for (const auto& e : fs::directory_iterator("/proc", ec)) {
    std::string name = e.path().filename().string();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::ifstream f(e.path() / "stat");
    std::string line;
    if (!std::getline(f, line)) continue;
    auto close = line.rfind(')');
    if (close == std::string::npos) continue;
    std::istringstream rest(line.substr(close + 2));
    std::string state, ppid;
    rest >> state >> ppid;
    if (state == "Z" && ppid == me) now.insert(static_cast<pid_t>(std::stol(name)));
  }
  for (pid_t pid : now) {
    if (!seen->count(pid)) continue;
    siginfo_t info{};
    if (::waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED | WNOHANG) == 0) {
      spdlog::debug("libvirt: reaped orphaned child {}", pid);
    }
  }
  *seen = std::move(now);
}

int OnLifecycle(virConnectPtr, virDomainPtr dom, int event, int, void* opaque) {
  if (event == VIR_DOMAIN_EVENT_STOPPED) {
    const char* name = virDomainGetName(dom);
    static_cast<std::function<void(const std::string&)>*>(opaque)->operator()(name ? name : "");
  }
  return 0;
}

struct ReapCtx {
  pid_t pid;
  int fd;
  int watch = -1;
};

void OnPidfd(int watch, int, int, void* opaque) {
  auto* ctx = static_cast<ReapCtx*>(opaque);
  ::waitpid(ctx->pid, nullptr, WNOHANG);
  virEventRemoveHandle(watch);
}

// One QMP command on a domain's monitor, through libvirt (the domain is tainted
// "custom-monitor": libvirt has no API for migrating to or from a file descriptor of ours).
// fd (if >= 0) travels with the command, for "getfd". Returns QMP's "return" member.
Result<nlohmann::json> Qmp(virDomainPtr dom, const nlohmann::json& cmd, int fd = -1) {
  char* out = nullptr;
  int fds[1] = {fd};
  std::string text = cmd.dump();
  int r = virDomainQemuMonitorCommandWithFiles(dom, text.c_str(), fd >= 0 ? 1 : 0,
                                               fd >= 0 ? fds : nullptr, nullptr, nullptr, &out, 0);
  if (r < 0) return LibvirtError("QEMU monitor: " + cmd.value("execute", std::string("?")));
  std::string reply = out ? out : "";
  free(out);
  auto j = nlohmann::json::parse(reply, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return Error::Internal("QEMU monitor: {}: unreadable answer", cmd.value("execute", ""));
  }
  if (auto e = j.find("error"); e != j.end()) {
    return Error::Internal("QEMU monitor: {}: {}", cmd.value("execute", ""),
                           e->is_object() ? JsonString(*e, "desc") : std::string("error"));
  }
  auto ret = j.find("return");
  return ret != j.end() && ret->is_object() ? *ret : nlohmann::json::object();
}

// Hands QEMU fd and runs a migration command ("migrate", "migrate-incoming") through it.
Result<void> MigrateThroughFd(virDomainPtr dom, const char* command, int fd) {
  PP_TRY(Qmp(dom, {{"execute", "getfd"}, {"arguments", {{"fdname", "peapod-template"}}}}, fd));
  PP_TRY(Qmp(dom, {{"execute", command}, {"arguments", {{"uri", "fd:peapod-template"}}}}));
  return Ok();
}

// The template state a restore reads is the file that was hashed, unchanged (template.h).
Result<void> CheckTemplateUnchanged(const VmSpec& spec, int fd) {
  if (spec.restore_identity.empty()) return Ok();
  struct stat st {};
  if (::fstat(fd, &st) < 0) return Error::Errno("stat " + spec.restore_from);
  if (FileIdentity(st) != spec.restore_identity) {
    return Error(Code::kDataLoss,
                 fmt::format("template state {} changed since it was checked", spec.restore_from));
  }
  return Ok();
}

// Wakes a thread that waits for a migration to or from a state file when QEMU reports the
// migration's progress (its MIGRATION event, which libvirt asks QEMU for at start): asking QEMU
// every few ms instead costs it and libvirt CPU that a burst of restores is short of (QEMU's
// monitor reads a command one byte per read).
class MigrationEvents {
 public:
  MigrationEvents(virConnectPtr conn, virDomainPtr dom) : conn_(conn) {
    auto* hold = new std::shared_ptr<State>(state_);
    id_ = virConnectDomainQemuMonitorEventRegister(
        conn, dom, "MIGRATION",
        [](virConnectPtr, virDomainPtr, const char*, long long, unsigned int, const char*,
           void* opaque) {
          auto& st = *static_cast<std::shared_ptr<State>*>(opaque);
          std::lock_guard<std::mutex> l(st->mu);
          ++st->events;
          st->cv.notify_all();
        },
        hold, [](void* p) { delete static_cast<std::shared_ptr<State>*>(p); }, 0);
    if (id_ < 0) {
      spdlog::warn("libvirt: QEMU migration events: {}; polling instead",
                   LibvirtError("register").message());
    }
  }
  ~MigrationEvents() {
    if (id_ >= 0) virConnectDomainQemuMonitorEventDeregister(conn_, id_);
  }
  MigrationEvents(const MigrationEvents&) = delete;
  MigrationEvents& operator=(const MigrationEvents&) = delete;

  // Returns once an event came since the last call, or after at most `most` (10 ms when
  // events could not be had).
  void Wait(std::chrono::milliseconds most) {
    if (id_ < 0) most = std::chrono::milliseconds(10);
    std::unique_lock<std::mutex> l(state_->mu);
    state_->cv.wait_for(l, most, [&] { return state_->events != seen_; });
    seen_ = state_->events;
  }

 private:
  struct State {
    std::mutex mu;
    std::condition_variable cv;
    uint64_t events = 0;
  };
  virConnectPtr conn_;
  std::shared_ptr<State> state_ = std::make_shared<State>();
  uint64_t seen_ = 0;
  int id_ = -1;
};

void FreeReapCtx(void* opaque) {
  auto* ctx = static_cast<ReapCtx*>(opaque);
  ::close(ctx->fd);
  delete ctx;
}

}  // namespace

Result<std::unique_ptr<LibvirtBackend>> LibvirtBackend::Open(const LibvirtOptions& opts) {
  static std::once_flag once;
  static int registered = -1;
  std::call_once(once, [] { registered = virEventRegisterDefaultImpl(); });
  if (registered < 0) return LibvirtError("libvirt event loop");

  std::unique_ptr<LibvirtBackend> b(new LibvirtBackend());
  b->uri_ = opts.uri.empty() ? "qemu:///embed?root=" + opts.embed_root : opts.uri;
  b->embed_root_ = opts.uri.empty() ? opts.embed_root : "";
  b->share_server_ = opts.share_server;
  if (!b->embed_root_.empty()) {
    PP_TRY(WriteQemuConf(b->embed_root_));
    PP_ASSIGN_OR_RETURN(b->emulator_, WriteQemuWrapper(b->embed_root_));
    // QEMU is our child with the embedded driver: adopt what it leaves so we can reap it.
    if (::prctl(PR_SET_CHILD_SUBREAPER, 1) < 0) return Error::Errno("PR_SET_CHILD_SUBREAPER");
  }
  if (!opts.guest_huge_pages) {
    if (b->embed_root_.empty()) {
      spdlog::warn(
          "libvirt: guest_huge_pages off does not reach the QEMUs of {} (they are libvirtd's "
          "children); set transparent huge pages there",
          b->uri_);
    } else if (::prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) < 0) {
      spdlog::warn("libvirt: PR_SET_THP_DISABLE: {}; guest RAM may use huge pages",
                   std::strerror(errno));
    } else {
      spdlog::info("libvirt: guest RAM in 4 KiB pages (no transparent huge pages)");
    }
  }
  b->conn_ = virConnectOpen(b->uri_.c_str());
  if (!b->conn_) {
    auto e = LibvirtError("connect to " + b->uri_);
    if (e.message().find("Failed to parse user") != std::string::npos) {
      return Error(e.code(), e.message() +
                                 " (libvirt's QEMU driver needs its default user to exist even "
                                 "when qemu.conf names another: scripts/install-deps.sh creates "
                                 "it)");
    }
    if (e.message().find("Failed to acquire pid file") != std::string::npos) {
      return Error(Code::kFailedPrecondition, e.message() + " (another peapod-sandboxer is using " +
                                                  b->embed_root_ +
                                                  "; one sandboxer per libvirt root)");
    }
    return e;
  }
  // Wakes the loop regularly so the thread notices quit_.
  b->wake_timer_ = virEventAddTimeout(200, EventTimer, nullptr, nullptr);
  if (!b->embed_root_.empty()) {
    b->orphan_timer_ = virEventAddTimeout(10000, ReapOrphans, &b->orphans_seen_, nullptr);
  }
  b->event_thread_ = std::thread([raw = b.get()] {
    while (!raw->quit_) virEventRunDefaultImpl();
  });
  auto* cb = new std::function<void(const std::string&)>(
      [raw = b.get()](const std::string& name) { raw->Stopped(name); });
  b->lifecycle_cb_ = virConnectDomainEventRegisterAny(
      b->conn_, nullptr, VIR_DOMAIN_EVENT_ID_LIFECYCLE, VIR_DOMAIN_EVENT_CALLBACK(OnLifecycle), cb,
      [](void* p) { delete static_cast<std::function<void(const std::string&)>*>(p); });
  if (b->lifecycle_cb_ < 0) return LibvirtError("register domain events");
  spdlog::info("libvirt: connected to {}", b->uri_);
  return b;
}

LibvirtBackend::~LibvirtBackend() {
  if (conn_ && lifecycle_cb_ >= 0) virConnectDomainEventDeregisterAny(conn_, lifecycle_cb_);
  quit_ = true;
  if (event_thread_.joinable()) event_thread_.join();
  if (wake_timer_ >= 0) virEventRemoveTimeout(wake_timer_);
  if (orphan_timer_ >= 0) virEventRemoveTimeout(orphan_timer_);
  if (conn_) virConnectClose(conn_);
}

void LibvirtBackend::SetOnStopped(std::function<void(const std::string&)> cb) {
  std::lock_guard<std::mutex> l(mu_);
  on_stopped_ = std::move(cb);
}

void LibvirtBackend::Stopped(const std::string& name) {
  std::function<void(const std::string&)> cb;
  {
    std::lock_guard<std::mutex> l(mu_);
    cb = on_stopped_;
  }
  spdlog::info("libvirt: domain {} stopped", name);
  DropQemuLog(name);
  if (cb) cb(name);
}

// The embedded driver keeps each domain's QEMU stderr in <root>/log/qemu/<domain>.log and never
// removes it: one file per pod ever run. When the domain stops, the messages in the file's tail
// (timestamped lines, without the command line and libvirt's own start-up notes) go to our log,
// and the file goes.
void LibvirtBackend::DropQemuLog(const std::string& name) {
  if (embed_root_.empty() || name.empty() || name.find('/') != std::string::npos ||
      name[0] == '.') {
    return;
  }
  const std::string path = embed_root_ + "/log/qemu/" + name + ".log";
  UniqueFd fd(::open(path.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC));
  if (!fd) return;
  constexpr off_t kTail = 4096;
  struct stat st {};
  if (::fstat(fd.get(), &st) == 0 && S_ISREG(st.st_mode)) {
    off_t from = st.st_size > kTail ? st.st_size - kTail : 0;
    std::string tail(static_cast<size_t>(st.st_size - from), '\0');
    ssize_t n = ::pread(fd.get(), tail.data(), tail.size(), from);
    tail.resize(n > 0 ? static_cast<size_t>(n) : 0);
    std::istringstream lines(tail);
    for (std::string line; std::getline(lines, line);) {
      if (line.empty() || line[0] < '0' || line[0] > '9') continue;
      if (line.find("starting up libvirt") != std::string::npos ||
          line.find("is tainted") != std::string::npos) {
        continue;
      }
      if (line.size() > 300) line.resize(300);
      spdlog::info("libvirt: {}: {}", name, line);
    }
  }
  ::unlink(path.c_str());
}

Result<pid_t> LibvirtBackend::FindQemuPid(const std::string& name) {
  // libvirt writes QEMU's pid next to its runtime state.
  for (const std::string& dir : {embed_root_ + "/run/qemu", embed_root_ + "/run/libvirt/qemu",
                                 std::string("/run/libvirt/qemu")}) {
    std::ifstream f(dir + "/" + name + ".pid");
    pid_t pid = 0;
    if (f >> pid && pid > 0) return pid;
  }
  return Error::NotFound("no pid file for domain {}", name);
}

void LibvirtBackend::ReapWhenExits(const std::string& name, pid_t pid, bool our_child) {
  if (!our_child && embed_root_.empty()) return;  // qemu:///system: libvirtd's child
  int fd = static_cast<int>(::syscall(SYS_pidfd_open, pid, 0));
  if (fd < 0) {
    spdlog::warn("libvirt: pidfd for {} (pid {}): {}", name, pid, std::strerror(errno));
    return;
  }
  auto* ctx = new ReapCtx{pid, fd};
  ctx->watch = virEventAddHandle(fd, VIR_EVENT_HANDLE_READABLE, OnPidfd, ctx, FreeReapCtx);
  if (ctx->watch < 0) FreeReapCtx(ctx);
}

Result<VmInfo> LibvirtBackend::Start(const VmSpec& spec_in) {
  VmSpec spec = spec_in;
  if (spec.emulator.empty() && spec.uid == 0) spec.emulator = emulator_;
  PP_ASSIGN_OR_RETURN(auto xml, DomainXml(spec));
  // Checked here, not left to QEMU: libvirt takes tens of seconds to give up on a QEMU that
  // fails at startup, and its message does not say which setting to fix.
  for (const auto& [what, path] : {std::pair{"kernel", spec.kernel}, {"initrd", spec.initrd}}) {
    if (::access(path.c_str(), R_OK) != 0) {
      return Error::Errno(
          fmt::format("VM {}: guest {} {} is not readable (build it with the "
                      "vm-images target, or fix the image paths in the config)",
                      spec.name, what, path));
    }
  }
  // The template's state is opened here, read-only: QEMU gets this descriptor, never the path.
  UniqueFd template_fd;
  if (!spec.restore_from.empty()) {
    template_fd.Reset(::open(spec.restore_from.c_str(), O_RDONLY | O_CLOEXEC | O_NOFOLLOW));
    if (!template_fd) {
      auto e =
          Error::Errno(fmt::format("VM {}: open template state {}", spec.name, spec.restore_from));
      return Error(Code::kDataLoss, e.message());
    }
    PP_TRY(CheckTemplateUnchanged(spec, template_fd.get()));
  }
  // A confined QEMU cannot serve the share itself: its 9p server listens before QEMU starts,
  // and goes when QEMU does (it serves one connection).
  pid_t server = 0;
  if (spec.uid != 0 && !spec.share_dir.empty()) {
    ShareServerSpec ss;
    ss.helper = share_server_;
    ss.export_dir = spec.share_dir;
    ss.socket = spec.share_socket;
    ss.uid = spec.uid;
    ss.gid = spec.gid;
    PP_ASSIGN_OR_RETURN(server, StartShareServer(ss));
    ReapWhenExits(spec.name + " share server", server, /*our_child=*/true);
  }
  auto t0 = std::chrono::steady_clock::now();
  virDomainPtr dom = virDomainCreateXML(conn_, xml.c_str(), VIR_DOMAIN_NONE);
  if (!dom) {
    auto e = LibvirtError("start VM " + spec.name);
    if (server > 0) ::kill(server, SIGKILL);
    return e;
  }
  // Reaped as soon as it exits, from here on: a QEMU that dies while restoring would otherwise
  // stay a zombie of ours, and libvirt waits (~15 s) for it to vanish before it fails the
  // monitor call in flight.
  VmInfo info{spec.name, 0};
  if (auto pid = FindQemuPid(spec.name); pid.ok()) {
    info.pid = *pid;
    ReapWhenExits(spec.name, *pid);
  } else {
    spdlog::warn("libvirt: {}", pid.error().ToString());
  }
  if (!spec.restore_from.empty()) {
    auto t1 = std::chrono::steady_clock::now();
    auto r = RestoreState(spec.name, template_fd.get());
    auto ms = [](auto d) { return std::chrono::duration<double, std::milli>(d).count(); };
    spdlog::info("libvirt: {}: QEMU started in {:.0f} ms, its state loaded in {:.0f} ms", spec.name,
                 ms(t1 - t0), ms(std::chrono::steady_clock::now() - t1));
    // Checked again once loaded: a file written while QEMU read it is not what was hashed.
    if (r.ok()) r = CheckTemplateUnchanged(spec, template_fd.get());
    if (!r.ok()) {
      (void)virDomainDestroy(dom);
      virDomainFree(dom);
      if (server > 0) ::kill(server, SIGKILL);
      return Error(Code::kDataLoss, r.error().message());
    }
  }
  virDomainFree(dom);
  return info;
}

Result<void> LibvirtBackend::RestoreState(const std::string& name, int fd) {
  virDomainPtr dom = virDomainLookupByName(conn_, name.c_str());
  if (!dom) return LibvirtError("look up VM " + name);
  auto done = [&]() -> Result<void> {
    MigrationEvents events(conn_, dom);
    PP_TRY(MigrateThroughFd(dom, "migrate-incoming", fd));
    // QEMU loads the state, then stays paused (libvirt's start-up "cont" came while it was
    // waiting) until we continue it. A bad file makes QEMU exit: the monitor call then fails.
    // QEMU is asked again when it reports the migration's progress, and every 200 ms anyway.
    std::string last;
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    while (std::chrono::steady_clock::now() < deadline) {
      PP_ASSIGN_OR_RETURN(auto mig, Qmp(dom, {{"execute", "query-migrate"}}));
      std::string m = JsonString(mig, "status");
      if (m == "failed" || m == "cancelled") {
        std::string why = JsonString(mig, "error-desc");
        return Error::Internal("loading the state failed: {}", why.empty() ? m : why);
      }
      if (m == "completed") {
        PP_ASSIGN_OR_RETURN(auto st, Qmp(dom, {{"execute", "query-status"}}));
        last = JsonString(st, "status");
        if (last == "running") return Ok();
        if (last == "paused") {
          if (virDomainResume(dom) < 0) return LibvirtError("resume VM " + name);
          continue;
        }
      } else {
        last = "migration " + m;
      }
      events.Wait(std::chrono::milliseconds(200));
    }
    spdlog::warn("libvirt: {}: still {} after 30 s", name, last);
    return Error::Make(Code::kDeadlineExceeded, "the template did not load within 30 s");
  }();
  virDomainFree(dom);
  if (!done.ok()) return done.error().Wrap("VM " + name + ": restore from template");
  return Ok();
}

Result<void> LibvirtBackend::SaveState(const std::string& name, const std::string& path) {
  virDomainPtr dom = virDomainLookupByName(conn_, name.c_str());
  if (!dom) return LibvirtError("look up VM " + name);
  auto done = [&]() -> Result<void> {
    if (virDomainSuspend(dom) < 0) return LibvirtError("pause VM " + name);
    UniqueFd out(::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600));
    if (!out) return Error::Errno("create " + path);
    MigrationEvents events(conn_, dom);
    PP_TRY(MigrateThroughFd(dom, "migrate", out.get()));
    auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
    while (std::chrono::steady_clock::now() < deadline) {
      PP_ASSIGN_OR_RETURN(auto st, Qmp(dom, {{"execute", "query-migrate"}}));
      std::string status = JsonString(st, "status");
      if (status == "completed") {
        if (::fsync(out.get()) < 0) return Error::Errno("fsync " + path);
        return Ok();
      }
      if (status == "failed" || status == "cancelled") {
        std::string why = JsonString(st, "error-desc");
        return Error::Internal("saving the state failed: {}", why.empty() ? status : why);
      }
      events.Wait(std::chrono::milliseconds(200));
    }
    return Error::Make(Code::kDeadlineExceeded, "saving the state took over 120 s");
  }();
  virDomainFree(dom);
  if (!done.ok()) return done.error().Wrap("VM " + name + ": save state to " + path);
  return Ok();
}

Result<void> LibvirtBackend::Destroy(const std::string& name) {
  virDomainPtr dom = virDomainLookupByName(conn_, name.c_str());
  if (!dom) {
    auto e = LibvirtError("look up VM " + name);
    if (e.code() == Code::kNotFound) return Ok();
    return e;
  }
  int r = virDomainDestroy(dom);
  virDomainFree(dom);
  if (r < 0) {
    auto e = LibvirtError("stop VM " + name);
    if (e.code() == Code::kNotFound || e.code() == Code::kFailedPrecondition) return Ok();
    return e;
  }
  return Ok();
}

Result<void> LibvirtBackend::AttachDisk(const std::string& name, const DiskSpec& disk) {
  PP_ASSIGN_OR_RETURN(auto xml, DiskXml(disk));
  virDomainPtr dom = virDomainLookupByName(conn_, name.c_str());
  if (!dom) return LibvirtError("look up VM " + name);
  int r = virDomainAttachDeviceFlags(dom, xml.c_str(), VIR_DOMAIN_AFFECT_LIVE);
  virDomainFree(dom);
  if (r < 0) return LibvirtError(fmt::format("attach disk {} to VM {}", disk.path, name));
  return Ok();
}

Result<void> LibvirtBackend::DetachDisk(const std::string& name, const DiskSpec& disk) {
  PP_ASSIGN_OR_RETURN(auto xml, DiskXml(disk));
  virDomainPtr dom = virDomainLookupByName(conn_, name.c_str());
  if (!dom) {
    auto e = LibvirtError("look up VM " + name);
    return e.code() == Code::kNotFound ? Ok() : Result<void>(e);
  }
  int r = virDomainDetachDeviceFlags(dom, xml.c_str(), VIR_DOMAIN_AFFECT_LIVE);
  virDomainFree(dom);
  if (r < 0) {
    auto e = LibvirtError(fmt::format("detach disk {} from VM {}", disk.path, name));
    // Already gone (or the VM is): nothing left to undo.
    if (e.code() == Code::kNotFound || e.code() == Code::kFailedPrecondition) return Ok();
    return e;
  }
  return Ok();
}

Result<std::vector<VmInfo>> LibvirtBackend::List() {
  virDomainPtr* doms = nullptr;
  int n = virConnectListAllDomains(conn_, &doms, VIR_CONNECT_LIST_DOMAINS_ACTIVE);
  if (n < 0) return LibvirtError("list VMs");
  std::vector<VmInfo> out;
  for (int i = 0; i < n; ++i) {
    const char* name = virDomainGetName(doms[i]);
    if (name && std::string(name).rfind("peapod-", 0) == 0) {
      VmInfo info{name, 0};
      if (auto pid = FindQemuPid(name); pid.ok()) info.pid = *pid;
      out.push_back(info);
    }
    virDomainFree(doms[i]);
  }
  free(doms);
  return out;
}

}  // namespace peapod::sandboxer
