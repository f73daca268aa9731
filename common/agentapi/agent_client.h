// peapod.agent.v1.Agent (api/peapod/agent/v1/agent.proto) as typed asynchronous calls: one
// method per rpc with its request and answer types, so each method's name, types, default
// deadline and whether it may be sent twice are written once, for the shim, the sandboxer and
// the tests.
//
// How a call travels is the caller's: AgentClient takes a Send. Over one ttrpc client (Over)
// every call is sent once. The shim's AgentLink re-sends, on a new connection, the calls marked
// Resend::kSafe: the agent can take them twice (reads, waits, and stdio at an offset).
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <string>

#include <google/protobuf/empty.pb.h>

#include "common/base/result.h"
#include "common/ttrpc/client.h"
#include "peapod/agent/v1/agent.pb.h"

namespace peapod::agentapi {

namespace v1 = peapod::agent::v1;
using google::protobuf::Empty;

inline constexpr char kService[] = "peapod.agent.v1.Agent";

template <typename T>
using Done = std::function<void(Result<T>)>;

// Whether a call may reach the agent twice (re-sent after a lost connection).
enum class Resend { kNever, kSafe };

class AgentClient {
 public:
  using Timeout = std::chrono::nanoseconds;
  // Control calls: the agent answers at once, or runs crun (seconds under TCG).
  static constexpr Timeout kControl = std::chrono::seconds(60);
  // Creating a container mounts its layers and runs crun create.
  static constexpr Timeout kCreate = std::chrono::seconds(120);
  // Long polls: answered when something happens (the agent bounds each wait itself).
  static constexpr Timeout kNoDeadline = Timeout(0);

  using Send = std::function<void(const char* method, std::string payload, Timeout timeout,
                                  Resend resend, ttrpc::Client::Callback done)>;

  AgentClient() = default;  // sends nothing: every call fails UNAVAILABLE
  explicit AgentClient(Send send) : send_(std::move(send)) {}
  // Every call on client, sent once (it is held as long as the AgentClient). Loop thread.
  static AgentClient Over(std::shared_ptr<ttrpc::Client> client);

  explicit operator bool() const { return static_cast<bool>(send_); }

  void Check(const v1::CheckRequest& req, Done<v1::CheckResponse> done,
             Timeout timeout = kControl) const {
    Call<v1::CheckResponse>("Check", req, timeout, Resend::kSafe, std::move(done));
  }
  void CreateSandbox(const v1::CreateSandboxRequest& req, Done<Empty> done,
                     Timeout timeout = kControl) const {
    Call<Empty>("CreateSandbox", req, timeout, Resend::kNever, std::move(done));
  }
  void ConfigureNetwork(const v1::ConfigureNetworkRequest& req, Done<Empty> done,
                        Timeout timeout = kControl) const {
    Call<Empty>("ConfigureNetwork", req, timeout, Resend::kNever, std::move(done));
  }
  void PrepareTemplate(const v1::PrepareTemplateRequest& req, Done<Empty> done,
                       Timeout timeout = kControl) const {
    Call<Empty>("PrepareTemplate", req, timeout, Resend::kNever, std::move(done));
  }
  void Resumed(const v1::ResumedRequest& req, Done<Empty> done, Timeout timeout = kControl) const {
    Call<Empty>("Resumed", req, timeout, Resend::kNever, std::move(done));
  }
  void DestroySandbox(const v1::DestroySandboxRequest& req, Done<Empty> done,
                      Timeout timeout = kControl) const {
    Call<Empty>("DestroySandbox", req, timeout, Resend::kNever, std::move(done));
  }
  void CreateContainer(const v1::CreateContainerRequest& req,
                       Done<v1::CreateContainerResponse> done, Timeout timeout = kCreate) const {
    Call<v1::CreateContainerResponse>("CreateContainer", req, timeout, Resend::kNever,
                                      std::move(done));
  }
  void StartContainer(const v1::StartContainerRequest& req, Done<v1::StartContainerResponse> done,
                      Timeout timeout = kControl) const {
    Call<v1::StartContainerResponse>("StartContainer", req, timeout, Resend::kNever,
                                     std::move(done));
  }
  void RemoveContainer(const v1::RemoveContainerRequest& req, Done<Empty> done,
                       Timeout timeout = kControl) const {
    Call<Empty>("RemoveContainer", req, timeout, Resend::kNever, std::move(done));
  }
  void ExecProcess(const v1::ExecProcessRequest& req, Done<v1::ExecProcessResponse> done,
                   Timeout timeout = kControl) const {
    Call<v1::ExecProcessResponse>("ExecProcess", req, timeout, Resend::kNever, std::move(done));
  }
  void SignalProcess(const v1::SignalProcessRequest& req, Done<Empty> done,
                     Timeout timeout = kControl) const {
    Call<Empty>("SignalProcess", req, timeout, Resend::kNever, std::move(done));
  }
  void WaitProcess(const v1::WaitProcessRequest& req, Done<v1::WaitProcessResponse> done,
                   Timeout timeout = kNoDeadline) const {
    Call<v1::WaitProcessResponse>("WaitProcess", req, timeout, Resend::kSafe, std::move(done));
  }
  void DeleteProcess(const v1::DeleteProcessRequest& req, Done<Empty> done,
                     Timeout timeout = kControl) const {
    Call<Empty>("DeleteProcess", req, timeout, Resend::kNever, std::move(done));
  }
  void PauseContainer(const v1::ContainerRequest& req, Done<Empty> done,
                      Timeout timeout = kControl) const {
    Call<Empty>("PauseContainer", req, timeout, Resend::kNever, std::move(done));
  }
  void ResumeContainer(const v1::ContainerRequest& req, Done<Empty> done,
                       Timeout timeout = kControl) const {
    Call<Empty>("ResumeContainer", req, timeout, Resend::kNever, std::move(done));
  }
  void UpdateContainer(const v1::UpdateContainerRequest& req, Done<Empty> done,
                       Timeout timeout = kControl) const {
    Call<Empty>("UpdateContainer", req, timeout, Resend::kNever, std::move(done));
  }
  void StatsContainer(const v1::ContainerRequest& req, Done<v1::StatsContainerResponse> done,
                      Timeout timeout = kControl) const {
    Call<v1::StatsContainerResponse>("StatsContainer", req, timeout, Resend::kSafe,
                                     std::move(done));
  }
  void ListProcesses(const v1::ContainerRequest& req, Done<v1::ListProcessesResponse> done,
                     Timeout timeout = kControl) const {
    Call<v1::ListProcessesResponse>("ListProcesses", req, timeout, Resend::kSafe, std::move(done));
  }
  void StateContainer(const v1::ContainerRequest& req, Done<v1::StateContainerResponse> done,
                      Timeout timeout = kControl) const {
    Call<v1::StateContainerResponse>("StateContainer", req, timeout, Resend::kSafe,
                                     std::move(done));
  }
  void GetOOMEvent(const v1::GetOOMEventRequest& req, Done<v1::OOMEvent> done,
                   Timeout timeout = kNoDeadline) const {
    Call<v1::OOMEvent>("GetOOMEvent", req, timeout, Resend::kSafe, std::move(done));
  }
  void WriteStdin(const v1::WriteStreamRequest& req, Done<v1::WriteStreamResponse> done,
                  Timeout timeout = kNoDeadline) const {
    Call<v1::WriteStreamResponse>("WriteStdin", req, timeout, Resend::kSafe, std::move(done));
  }
  void ReadStdout(const v1::ReadStreamRequest& req, Done<v1::ReadStreamResponse> done,
                  Timeout timeout = kNoDeadline) const {
    Call<v1::ReadStreamResponse>("ReadStdout", req, timeout, Resend::kSafe, std::move(done));
  }
  void ReadStderr(const v1::ReadStreamRequest& req, Done<v1::ReadStreamResponse> done,
                  Timeout timeout = kNoDeadline) const {
    Call<v1::ReadStreamResponse>("ReadStderr", req, timeout, Resend::kSafe, std::move(done));
  }
  void CloseStdin(const v1::ProcessRequest& req, Done<Empty> done,
                  Timeout timeout = kControl) const {
    Call<Empty>("CloseStdin", req, timeout, Resend::kSafe, std::move(done));
  }
  void ResizePty(const v1::ResizePtyRequest& req, Done<Empty> done,
                 Timeout timeout = kControl) const {
    Call<Empty>("ResizePty", req, timeout, Resend::kNever, std::move(done));
  }
  void OpenPort(const v1::OpenPortRequest& req, Done<v1::OpenPortResponse> done,
                Timeout timeout = kControl) const {
    Call<v1::OpenPortResponse>("OpenPort", req, timeout, Resend::kNever, std::move(done));
  }
  void ReadPort(const v1::PortIoRequest& req, Done<v1::ReadStreamResponse> done,
                Timeout timeout = kNoDeadline) const {
    Call<v1::ReadStreamResponse>("ReadPort", req, timeout, Resend::kNever, std::move(done));
  }
  void WritePort(const v1::PortIoRequest& req, Done<v1::WriteStreamResponse> done,
                 Timeout timeout = kNoDeadline) const {
    Call<v1::WriteStreamResponse>("WritePort", req, timeout, Resend::kNever, std::move(done));
  }
  void ClosePort(const v1::ClosePortRequest& req, Done<Empty> done,
                 Timeout timeout = kControl) const {
    Call<Empty>("ClosePort", req, timeout, Resend::kNever, std::move(done));
  }

 private:
  template <typename Resp>
  void Call(const char* method, const google::protobuf::MessageLite& req, Timeout timeout,
            Resend resend, Done<Resp> done) const {
    if (!send_) return done(Error(Code::kUnavailable, "not connected to the pod's agent"));
    std::string bytes;
    if (!req.SerializeToString(&bytes)) return done(Error::Internal("could not encode {}", method));
    send_(method, std::move(bytes), timeout, resend,
          [method, done = std::move(done)](Result<std::string> raw) {
            if (!raw.ok()) return done(std::move(raw).error());
            Resp resp;
            if (!resp.ParseFromString(*raw)) {
              return done(
                  Error::Make(Code::kInternal, "the agent's answer to {} does not parse", method));
            }
            done(std::move(resp));
          });
  }

  Send send_;
};

}  // namespace peapod::agentapi
