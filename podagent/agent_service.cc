#include "podagent/agent_service.h"

#include <sys/utsname.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <fstream>

#include <spdlog/spdlog.h>

#include "peapod/agent/v1/agent.pb.h"
#include "podagent/network.h"
#include "podagent/template.h"

namespace peapod::agent {

namespace v1 = peapod::agent::v1;
using google::protobuf::Empty;

namespace {

std::string ReadLine(const std::string& path) {
  std::ifstream f(path);
  std::string line;
  std::getline(f, line);
  return line;
}

// A method whose request is parsed here and which answers through the raw responder: fn(Req&&,
// ttrpc::Responder). A request that does not parse is answered INVALID_ARGUMENT.
template <typename Req, typename Fn>
void RegisterParsed(ttrpc::Server& server, const std::string& method, Fn fn) {
  server.Register(kAgentService, method,
                  [fn = std::move(fn), method](const ttrpc::CallContext&, std::string payload,
                                               ttrpc::Responder r) {
                    Req req;
                    if (!req.ParseFromString(payload)) {
                      return r(Error::Invalid("{}: request is not a valid {}", method,
                                              Req::descriptor()->full_name()));
                    }
                    fn(std::move(req), std::move(r));
                  });
}

// Like ttrpc::RegisterTyped, for methods that may answer much later (Wait, reads): fn also gets
// a predicate that tells whether the caller still waits, so data is never handed to a caller
// that gave up (its deadline passed or its connection closed).
template <typename Req, typename Resp, typename Fn>
void RegisterLong(ttrpc::Server& server, const std::string& method, Fn fn) {
  RegisterParsed<Req>(server, method, [fn = std::move(fn)](Req&& req, ttrpc::Responder r) {
    fn(
        std::move(req), [r] { return r.waiting(); },
        [r](Result<Resp> resp) {
          if (!resp.ok()) return r(std::move(resp).error());
          r(resp->SerializeAsString());
        });
  });
}

// A method answered on the spot from a Result.
template <typename Req, typename Resp, typename Fn>
void RegisterSync(ttrpc::Server& server, const std::string& method, Fn fn) {
  ttrpc::RegisterTyped<Req, Resp>(
      server, kAgentService, method,
      [fn = std::move(fn)](const ttrpc::CallContext&, Req&& req,
                           ttrpc::TypedResponder<Resp> reply) { reply(fn(req)); });
}

// Adapts a Reply<void> to an Empty response.
void EmptyReply(ttrpc::TypedResponder<Empty> reply,
                std::function<void(std::function<void(Result<void>)>)> op) {
  op([reply](Result<void> r) {
    if (!r.ok()) return reply(std::move(r).error());
    reply(Empty());
  });
}

Result<Empty> ToEmpty(Result<void> r) {
  if (!r.ok()) return std::move(r).error();
  return Empty();
}

// A stream request's offset, if it carries one.
template <typename Req>
std::optional<uint64_t> OffsetOf(const Req& req) {
  return req.has_offset() ? std::optional<uint64_t>(req.offset()) : std::nullopt;
}

// Answers a ReadStreamResponse{data = 1, eof = 2} written by hand around the stream's bytes,
// which go to the channel from the stream's buffer (Responder::Reply): a pod's stdout is the
// largest thing the guest sends.
void ReplyStreamData(const ttrpc::Responder& r, std::string_view data, bool eof) {
  char head[11];
  size_t n = 0;
  if (!data.empty()) {  // proto3 leaves out empty fields
    head[n++] = '\x0a';
    n += ttrpc::EncodeVarint(data.size(), head + 1);
  }
  std::string_view tail = eof ? std::string_view("\x10\x01", 2) : std::string_view();
  r.Reply({std::string_view(head, n), data, tail});
}

// Answers a ReadStdout/ReadStderr/ReadPort from out: data as soon as there is some, or EOF.
void ReadStream(OutputStream* out, uint32_t max_bytes, std::optional<uint64_t> offset,
                ttrpc::Responder r) {
  size_t max = max_bytes ? max_bytes : OutputStream::kMaxRead;
  auto res = out->Read(
      max, offset,
      {.waiting = [r] { return r.waiting(); },
       .deliver = [r](std::string_view data, bool eof) { ReplyStreamData(r, data, eof); }});
  if (!res.ok()) r(std::move(res).error());
}

Result<void> SetupSandbox(const v1::CreateSandboxRequest& req, bool local) {
  if (!local && !req.hostname().empty()) {
    if (::sethostname(req.hostname().data(), req.hostname().size()) < 0) {
      return Error::Errno("sethostname " + req.hostname());
    }
  }
  if (!local) {
    std::ofstream resolv("/etc/resolv.conf", std::ios::trunc);
    for (const auto& s : req.dns_servers()) resolv << "nameserver " << s << "\n";
    if (req.dns_searches_size()) {
      resolv << "search";
      for (const auto& s : req.dns_searches()) resolv << " " << s;
      resolv << "\n";
    }
    if (req.dns_options_size()) {
      resolv << "options";
      for (const auto& s : req.dns_options()) resolv << " " << s;
      resolv << "\n";
    }
    for (const auto& [key, value] : req.sysctls()) {
      std::string path = "/proc/sys/" + key;
      std::replace(path.begin() + 10, path.end(), '.', '/');
      std::ofstream f(path);
      if (!(f << value) || !f.flush()) {
        return Error::Invalid("sysctl {}={}: cannot write {}", key, value, path);
      }
    }
  }
  return Ok();
}

}  // namespace

void RegisterAgentService(ttrpc::Server& server, EventLoop* loop, ContainerManager* cm,
                          PortRelay* ports, ServiceOptions opts) {
  ttrpc::RegisterTyped<v1::CheckRequest, v1::CheckResponse>(
      server, kAgentService, "Check",
      [](const ttrpc::CallContext&, v1::CheckRequest&&,
         ttrpc::TypedResponder<v1::CheckResponse> reply) {
        v1::CheckResponse resp;
        resp.set_agent_version(PEAPOD_VERSION);
        utsname u{};
        if (::uname(&u) == 0) resp.set_kernel_release(u.release);
        resp.set_boot_id(ReadLine("/proc/sys/kernel/random/boot_id"));
        timespec ts{};
        ::clock_gettime(CLOCK_BOOTTIME, &ts);
        resp.set_uptime_ns(static_cast<uint64_t>(ts.tv_sec) * 1000000000ull +
                           static_cast<uint64_t>(ts.tv_nsec));
        reply(std::move(resp));
      });

  // Pod-wide setup: hostname, DNS, sysctls, and the storages every container may use (the
  // pod share, the scratch disk), mounted for the pod's lifetime.
  RegisterSync<v1::CreateSandboxRequest, Empty>(
      server, "CreateSandbox",
      [local = opts.local, cm](const v1::CreateSandboxRequest& req) -> Result<Empty> {
        PP_TRY(SetupSandbox(req, local));
        // A local agent has no virtio devices: its "pod" uses the host's directories.
        if (!local) PP_TRY(cm->AcquirePodStorage(req.storages()));
        return Empty();
      });

  // Template VMs: see podagent/template.h. A local agent runs on the host: neither is its to do.
  RegisterSync<v1::PrepareTemplateRequest, Empty>(
      server, "PrepareTemplate",
      [local = opts.local, cm](const v1::PrepareTemplateRequest& req) -> Result<Empty> {
        if (local)
          return Error::Make(Code::kUnimplemented, "PrepareTemplate is refused in local mode");
        for (const auto& fstype : req.fstypes()) PP_TRY(cm->LoadFilesystemModules(fstype));
        DropCaches();
        PP_ASSIGN_OR_RETURN(uint64_t cleared, ClearFreeMemory());
        spdlog::info("agent: template prepared: {} MiB of free memory cleared", cleared >> 20);
        return Empty();
      });
  RegisterSync<v1::ResumedRequest, Empty>(
      server, "Resumed", [local = opts.local](const v1::ResumedRequest& req) -> Result<Empty> {
        if (local) return Error::Make(Code::kUnimplemented, "Resumed is refused in local mode");
        return ToEmpty(ResumeFromTemplate(req));
      });

  RegisterSync<v1::ConfigureNetworkRequest, Empty>(
      server, "ConfigureNetwork",
      [local = opts.local](const v1::ConfigureNetworkRequest& req) -> Result<Empty> {
        // A local agent shares the host's network: it must never rename or readdress it.
        if (local) {
          return Error::Make(Code::kUnimplemented, "ConfigureNetwork is refused in local mode");
        }
        return ToEmpty(ConfigureNetwork(req));
      });

  ttrpc::RegisterTyped<v1::DestroySandboxRequest, Empty>(
      server, kAgentService, "DestroySandbox",
      [loop, cm, shutdown = opts.shutdown](const ttrpc::CallContext&, v1::DestroySandboxRequest&&,
                                           ttrpc::TypedResponder<Empty> reply) {
        spdlog::info("agent: DestroySandbox: stopping {} containers and powering off", cm->size());
        cm->KillAll();
        reply(Empty());
        // Let the answer reach the host before the VM goes away.
        loop->AddTimer(std::chrono::milliseconds(50), shutdown);
      });

  ttrpc::RegisterTyped<v1::CreateContainerRequest, v1::CreateContainerResponse>(
      server, kAgentService, "CreateContainer",
      [cm](const ttrpc::CallContext&, v1::CreateContainerRequest&& req,
           ttrpc::TypedResponder<v1::CreateContainerResponse> reply) {
        cm->Create(std::move(req), std::move(reply));
      });
  ttrpc::RegisterTyped<v1::StartContainerRequest, v1::StartContainerResponse>(
      server, kAgentService, "StartContainer",
      [cm](const ttrpc::CallContext&, v1::StartContainerRequest&& req,
           ttrpc::TypedResponder<v1::StartContainerResponse> reply) {
        cm->Start(req.container_id(), std::move(reply));
      });
  ttrpc::RegisterTyped<v1::RemoveContainerRequest, Empty>(
      server, kAgentService, "RemoveContainer",
      [cm](const ttrpc::CallContext&, v1::RemoveContainerRequest&& req,
           ttrpc::TypedResponder<Empty> reply) {
        EmptyReply(reply, [&](auto done) { cm->Remove(req.container_id(), req.force(), done); });
      });
  ttrpc::RegisterTyped<v1::ExecProcessRequest, v1::ExecProcessResponse>(
      server, kAgentService, "ExecProcess",
      [cm](const ttrpc::CallContext&, v1::ExecProcessRequest&& req,
           ttrpc::TypedResponder<v1::ExecProcessResponse> reply) {
        cm->Exec(std::move(req), std::move(reply));
      });
  RegisterSync<v1::SignalProcessRequest, Empty>(
      server, "SignalProcess",
      [cm](const v1::SignalProcessRequest& req) { return ToEmpty(cm->Signal(req)); });
  RegisterLong<v1::WaitProcessRequest, v1::WaitProcessResponse>(
      server, "WaitProcess", [cm](v1::WaitProcessRequest&& req, auto waiting, auto reply) {
        cm->Wait(req.container_id(), req.exec_id(), std::move(waiting), std::move(reply));
      });
  RegisterSync<v1::DeleteProcessRequest, Empty>(
      server, "DeleteProcess", [cm](const v1::DeleteProcessRequest& req) {
        return ToEmpty(cm->DeleteProcess(req.container_id(), req.exec_id()));
      });
  ttrpc::RegisterTyped<v1::ContainerRequest, Empty>(
      server, kAgentService, "PauseContainer",
      [cm](const ttrpc::CallContext&, v1::ContainerRequest&& req,
           ttrpc::TypedResponder<Empty> reply) {
        EmptyReply(reply, [&](auto done) { cm->Pause(req.container_id(), done); });
      });
  ttrpc::RegisterTyped<v1::ContainerRequest, Empty>(
      server, kAgentService, "ResumeContainer",
      [cm](const ttrpc::CallContext&, v1::ContainerRequest&& req,
           ttrpc::TypedResponder<Empty> reply) {
        EmptyReply(reply, [&](auto done) { cm->Resume(req.container_id(), done); });
      });
  ttrpc::RegisterTyped<v1::UpdateContainerRequest, Empty>(
      server, kAgentService, "UpdateContainer",
      [cm](const ttrpc::CallContext&, v1::UpdateContainerRequest&& req,
           ttrpc::TypedResponder<Empty> reply) {
        EmptyReply(reply,
                   [&](auto done) { cm->Update(req.container_id(), req.resources(), done); });
      });
  RegisterSync<v1::ContainerRequest, v1::StatsContainerResponse>(
      server, "StatsContainer",
      [cm](const v1::ContainerRequest& req) { return cm->Stats(req.container_id()); });
  RegisterSync<v1::ContainerRequest, v1::ListProcessesResponse>(
      server, "ListProcesses",
      [cm](const v1::ContainerRequest& req) { return cm->ListProcesses(req.container_id()); });
  RegisterSync<v1::ContainerRequest, v1::StateContainerResponse>(
      server, "StateContainer",
      [cm](const v1::ContainerRequest& req) { return cm->State(req.container_id()); });
  RegisterLong<v1::GetOOMEventRequest, v1::OOMEvent>(
      server, "GetOOMEvent", [cm](v1::GetOOMEventRequest&& req, auto waiting, auto reply) {
        cm->NextOOMEvent(req.container_id(), std::move(waiting), std::move(reply));
      });

  ttrpc::RegisterTyped<v1::WriteStreamRequest, v1::WriteStreamResponse>(
      server, kAgentService, "WriteStdin",
      [cm](const ttrpc::CallContext&, v1::WriteStreamRequest&& req,
           ttrpc::TypedResponder<v1::WriteStreamResponse> reply) {
        auto in = cm->Input(req.container_id(), req.exec_id());
        if (!in.ok()) return reply(in.error());
        auto offset = OffsetOf(req);
        (*in)->Write(
            std::move(*req.mutable_data()),
            [reply](Result<uint32_t> n) {
              if (!n.ok()) return reply(n.error());
              v1::WriteStreamResponse resp;
              resp.set_len(*n);
              reply(std::move(resp));
            },
            offset);
      });
  for (bool err : {false, true}) {
    RegisterParsed<v1::ReadStreamRequest>(
        server, err ? "ReadStderr" : "ReadStdout",
        [cm, err](v1::ReadStreamRequest&& req, ttrpc::Responder r) {
          auto out = cm->Output(req.container_id(), req.exec_id(), err);
          if (!out.ok()) return r(out.error());
          ReadStream(*out, req.max_bytes(), OffsetOf(req), std::move(r));
        });
  }
  RegisterSync<v1::ProcessRequest, Empty>(
      server, "CloseStdin", [cm](const v1::ProcessRequest& req) -> Result<Empty> {
        PP_ASSIGN_OR_RETURN(auto* in, cm->Input(req.container_id(), req.exec_id()));
        in->Close();
        return Empty();
      });
  RegisterSync<v1::ResizePtyRequest, Empty>(
      server, "ResizePty",
      [cm](const v1::ResizePtyRequest& req) { return ToEmpty(cm->ResizePty(req)); });

  // Port forwarding: connections to the pod's 127.0.0.1, relayed by the host.
  RegisterLong<v1::OpenPortRequest, v1::OpenPortResponse>(
      server, "OpenPort", [ports](v1::OpenPortRequest&& req, auto, auto reply) {
        ports->Open(req.port(), [reply](Result<std::string> id) {
          if (!id.ok()) return reply(std::move(id).error());
          v1::OpenPortResponse resp;
          resp.set_id(*id);
          reply(std::move(resp));
        });
      });
  RegisterParsed<v1::PortIoRequest>(server, "ReadPort",
                                    [ports](v1::PortIoRequest&& req, ttrpc::Responder r) {
                                      auto out = ports->Output(req.id());
                                      if (!out.ok()) return r(out.error());
                                      ReadStream(*out, req.max_bytes(), std::nullopt, std::move(r));
                                    });
  RegisterLong<v1::PortIoRequest, v1::WriteStreamResponse>(
      server, "WritePort", [ports](v1::PortIoRequest&& req, auto, auto reply) {
        auto in = ports->Input(req.id());
        if (!in.ok()) return reply(in.error());
        bool close = req.close_write();
        InputStream* stream = *in;
        auto answer = [reply](Result<uint32_t> n) {
          if (!n.ok()) return reply(n.error());
          v1::WriteStreamResponse resp;
          resp.set_len(*n);
          reply(std::move(resp));
        };
        if (req.data().empty()) {
          if (close) stream->Close();
          return answer(0u);
        }
        stream->Write(std::move(*req.mutable_data()), std::move(answer));
        if (close) stream->Close();
      });
  RegisterSync<v1::ClosePortRequest, Empty>(
      server, "ClosePort", [ports](const v1::ClosePortRequest& req) -> Result<Empty> {
        ports->Close(req.id());
        return Empty();
      });
}

}  // namespace peapod::agent
