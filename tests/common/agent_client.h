// Test helpers that drive peapod-agent the way the shim does: typed calls over a ttrpc client,
// busybox rootfs and OCI specs built locally. Shared by the local-mode and VM tests.
#pragma once

#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "common/agentapi/agent_client.h"
#include "common/ttrpc/client.h"
#include "peapod/agent/v1/agent.pb.h"

namespace peapod::agenttest {

namespace v1 = peapod::agent::v1;
using google::protobuf::Empty;
using namespace std::chrono_literals;

inline constexpr char kAgent[] = "peapod.agent.v1.Agent";

// A busybox root filesystem from Debian's busybox-static. Empty on success, else why not.
inline std::string BuildBusyboxRoot(const std::string& root) {
  namespace fs = std::filesystem;
  if (::access("/bin/busybox", X_OK) != 0) return "/bin/busybox missing (busybox-static)";
  fs::create_directories(root + "/bin");
  for (const char* d : {"proc", "sys", "dev", "tmp", "etc", "run"}) {
    fs::create_directories(root + "/" + d);
  }
  fs::copy_file("/bin/busybox", root + "/bin/busybox", fs::copy_options::overwrite_existing);
  for (const char* applet : {"sh", "cat", "echo", "sleep", "dd", "seq", "uname", "readlink", "tty",
                             "true", "ls", "head", "ip", "hostname", "wc", "stty"}) {
    std::error_code ec;
    fs::create_symlink("busybox", root + "/bin/" + applet, ec);
  }
  return "";
}

// Builds the busybox root as an EROFS layer image; empty on success, else why not.
inline std::string BuildBusyboxLayer(const std::string& dir, const std::string& image) {
  if (std::system("command -v mkfs.erofs >/dev/null") != 0) return "mkfs.erofs missing";
  std::string root = dir + "/busybox-root";
  if (auto why = BuildBusyboxRoot(root); !why.empty()) return why;
  std::string cmd = "mkfs.erofs --quiet --all-root " + image + " " + root + " >/dev/null 2>&1";
  if (std::system(cmd.c_str()) != 0) return "mkfs.erofs failed: " + cmd;
  return "";
}

// The busybox layer (BuildBusyboxLayer) as the guest sees it: read-only EROFS on SCSI disk 0:0.
inline v1::Storage BusyboxLayerStorage() {
  v1::Storage s;
  s.set_driver(v1::Storage::SCSI);
  s.set_source("0:0");
  s.set_fstype("erofs");
  s.add_options("ro");
  s.set_mount_point("/run/peapod/layers/busybox");
  return s;
}

// A minimal OCI spec like `crun spec`, running args. The network namespace names a host path,
// as containerd's CRI specs do: the agent must drop it.
inline std::string Spec(const std::vector<std::string>& args, bool terminal = false,
                        int64_t memory_limit = 0) {
  nlohmann::json spec = nlohmann::json::parse(R"({
    "ociVersion": "1.0.2",
    "process": {"terminal": false, "user": {"uid": 0, "gid": 0}, "args": [],
                "env": ["PATH=/bin", "TERM=xterm"], "cwd": "/",
                "capabilities": {"bounding": ["CAP_KILL", "CAP_NET_BIND_SERVICE"],
                                 "effective": ["CAP_KILL", "CAP_NET_BIND_SERVICE"],
                                 "permitted": ["CAP_KILL", "CAP_NET_BIND_SERVICE"]},
                "noNewPrivileges": true},
    "root": {"path": "rootfs", "readonly": false},
    "hostname": "ignored-in-a-pod",
    "mounts": [
      {"destination": "/proc", "type": "proc", "source": "proc"},
      {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
       "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
      {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
       "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
      {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
       "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
      {"destination": "/sys", "type": "sysfs", "source": "sysfs",
       "options": ["nosuid", "noexec", "nodev", "ro"]}
    ],
    "linux": {
      "namespaces": [{"type": "pid"}, {"type": "network", "path": "/var/run/netns/cni-1234"},
                     {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}, {"type": "cgroup"}],
      "maskedPaths": ["/proc/kcore"], "readonlyPaths": ["/proc/sys"]
    }
  })");
  spec["process"]["args"] = args;
  spec["process"]["terminal"] = terminal;
  if (memory_limit > 0) {
    spec["linux"]["resources"] = {{"memory", {{"limit", memory_limit}, {"swap", memory_limit}}}};
  }
  return spec.dump();
}

inline std::string ProcessJson(const std::vector<std::string>& args, bool terminal = false) {
  nlohmann::json p = {{"terminal", terminal},
                      {"user", {{"uid", 0}, {"gid", 0}}},
                      {"args", args},
                      {"env", {"PATH=/bin"}},
                      {"cwd", "/"}};
  return p.dump();
}

inline std::vector<std::string> Lines(const std::string& s) {
  std::vector<std::string> out;
  std::istringstream ss(s);
  for (std::string l; std::getline(ss, l);) out.push_back(l);
  return out;
}

// Typed calls to one agent. `layer` is the Storage every Create stacks the rootfs on.
class AgentClient {
 public:
  AgentClient(std::shared_ptr<ttrpc::Client> client, v1::Storage layer)
      : client_(std::move(client)),
        layer_(std::move(layer)),
        // The shim's and the sandboxer's typed client, each call made from the test thread.
        typed_([c = client_](const char* method, std::string payload,
                             agentapi::AgentClient::Timeout timeout, agentapi::Resend,
                             ttrpc::Client::Callback done) {
          ttrpc::CallOptions opts;
          opts.timeout = timeout;
          done(c->CallSync(agentapi::kService, method, std::move(payload), opts));
        }) {}

  ttrpc::Client* raw() { return client_.get(); }

  // One call of the typed client (e.g. &Typed::CreateContainer), waited for.
  using Typed = agentapi::AgentClient;
  template <typename Req, typename Resp>
  Result<Resp> Sync(void (Typed::*method)(const Req&, agentapi::Done<Resp>, Typed::Timeout) const,
                    const std::type_identity_t<Req>& req, Typed::Timeout timeout = 120s) {
    std::optional<Result<Resp>> out;
    (typed_.*method)(
        req, [&out](Result<Resp> r) { out.emplace(std::move(r)); }, timeout);
    return std::move(*out);
  }

  Result<uint32_t> Create(const std::string& id, const std::string& spec, bool stdin = false) {
    v1::CreateContainerRequest req;
    req.set_container_id(id);
    req.set_oci_spec(spec);
    req.set_stdin(stdin);
    *req.add_layers() = layer_;
    PP_ASSIGN_OR_RETURN(auto r, Sync(&Typed::CreateContainer, req));
    return r.pid();
  }

  // A Create request built by the caller (its own layers, upper dir, mounts).
  Result<uint32_t> Create(const v1::CreateContainerRequest& req) {
    PP_ASSIGN_OR_RETURN(auto r, Sync(&Typed::CreateContainer, req));
    return r.pid();
  }

  Result<void> Start(const std::string& id) {
    v1::StartContainerRequest req;
    req.set_container_id(id);
    PP_TRY(Sync(&Typed::StartContainer, req));
    return Ok();
  }

  Result<uint32_t> Wait(const std::string& id, const std::string& exec_id = "") {
    v1::WaitProcessRequest req;
    req.set_container_id(id);
    req.set_exec_id(exec_id);
    PP_ASSIGN_OR_RETURN(auto r, Sync(&Typed::WaitProcess, req));
    return r.exit_status();
  }

  // One read: whatever is buffered (waiting for some), or EOF.
  Result<v1::ReadStreamResponse> ReadOnce(const std::string& id, const std::string& exec_id = "",
                                          bool stderr = false,
                                          std::chrono::milliseconds timeout = 120s) {
    v1::ReadStreamRequest req;
    req.set_container_id(id);
    req.set_exec_id(exec_id);
    req.set_max_bytes(64 << 10);
    return Sync(stderr ? &Typed::ReadStderr : &Typed::ReadStdout, req, timeout);
  }

  // Everything the process writes to stdout (or stderr), until EOF.
  std::string ReadAll(const std::string& id, const std::string& exec_id = "", bool stderr = false) {
    std::string out;
    for (;;) {
      auto r = ReadOnce(id, exec_id, stderr);
      if (!r.ok()) {
        ADD_FAILURE() << "read " << id << ": " << r.error().ToString();
        return out;
      }
      out += r->data();
      if (r->eof()) return out;
    }
  }

  Result<uint32_t> Exec(const std::string& id, const std::string& exec_id,
                        const std::vector<std::string>& args, bool terminal = false) {
    v1::ExecProcessRequest req;
    req.set_container_id(id);
    req.set_exec_id(exec_id);
    req.set_process(ProcessJson(args, terminal));
    req.set_terminal(terminal);
    PP_ASSIGN_OR_RETURN(auto r, Sync(&Typed::ExecProcess, req));
    return r.pid();
  }

  Result<void> Signal(const std::string& id, const std::string& exec_id, int sig) {
    v1::SignalProcessRequest req;
    req.set_container_id(id);
    req.set_exec_id(exec_id);
    req.set_signal(static_cast<uint32_t>(sig));
    PP_TRY(Sync(&Typed::SignalProcess, req));
    return Ok();
  }

  Result<void> Remove(const std::string& id, bool force = false) {
    v1::RemoveContainerRequest req;
    req.set_container_id(id);
    req.set_force(force);
    PP_TRY(Sync(&Typed::RemoveContainer, req));
    return Ok();
  }

  v1::StateContainerResponse::Status State(const std::string& id) {
    v1::ContainerRequest req;
    req.set_container_id(id);
    auto r = Sync(&Typed::StateContainer, req);
    return r.ok() ? r->status() : v1::StateContainerResponse::UNKNOWN;
  }

 private:
  std::shared_ptr<ttrpc::Client> client_;
  v1::Storage layer_;
  agentapi::AgentClient typed_;
};

}  // namespace peapod::agenttest
