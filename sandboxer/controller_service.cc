#include "sandboxer/controller_service.h"

#include <google/protobuf/util/time_util.h>
#include <spdlog/spdlog.h>

#include "k8s/cri/v1/pod_sandbox_config.pb.h"

namespace peapod::sandboxer {

using google::protobuf::util::TimeUtil;

grpc::Status ToGrpc(const Error& e) {
  return grpc::Status(static_cast<grpc::StatusCode>(static_cast<int>(e.code())), e.ToString());
}

namespace {

// Runs op(done) on the loop and answers the call from there: fill(value) writes the response,
// or the error is the status. No gRPC thread waits (a Wait lasts the pod's life).
template <typename T, typename Op, typename Fill>
grpc::ServerUnaryReactor* OnLoop(grpc::CallbackServerContext* ctx, EventLoop* loop, Op op,
                                 Fill fill) {
  auto* reactor = ctx->DefaultReactor();
  loop->Post([op = std::move(op), fill = std::move(fill), reactor]() mutable {
    op([fill = std::move(fill), reactor](Result<T> r) mutable {
      if (!r.ok()) return reactor->Finish(ToGrpc(r.error()));
      fill(*r);
      reactor->Finish(grpc::Status::OK);
    });
  });
  return reactor;
}

// A call answered at once.
grpc::ServerUnaryReactor* Answer(grpc::CallbackServerContext* ctx, const grpc::Status& status) {
  auto* reactor = ctx->DefaultReactor();
  reactor->Finish(status);
  return reactor;
}

// For PodManager calls that answer Result<void>.
template <typename F>
auto Void(F f) {
  return [f = std::move(f)](auto done) {
    f([done](Result<void> r) mutable {
      if (!r.ok()) return done(std::move(r).error());
      done(true);
    });
  };
}

void FillStatus(const PodStatus& s, sbv1::ControllerStatusResponse* resp) {
  resp->set_sandbox_id(s.id);
  resp->set_pid(static_cast<uint32_t>(s.pid));
  // CRI's vocabulary: containerd compares these strings.
  resp->set_state(s.ready ? "SANDBOX_READY" : "SANDBOX_NOTREADY");
  if (s.created_at_ns)
    *resp->mutable_created_at() = TimeUtil::NanosecondsToTimestamp(s.created_at_ns);
  if (s.exited_at_ns) *resp->mutable_exited_at() = TimeUtil::NanosecondsToTimestamp(s.exited_at_ns);
  resp->set_address(s.address);
  resp->set_version(2);
}

}  // namespace

Result<void> PodOptionsFromCri(const google::protobuf::Any& options, PodOptions* opts) {
  // containerd's CRI passes the pod's PodSandboxConfig; anything else (ctr, other clients) has
  // nothing for us.
  // containerd's typeurl names it "runtime.v1.PodSandboxConfig"; a type.googleapis.com/
  // prefix is accepted too.
  constexpr std::string_view kType = "runtime.v1.PodSandboxConfig";
  std::string_view type = options.type_url();
  if (auto slash = type.rfind('/'); slash != std::string_view::npos) type.remove_prefix(slash + 1);
  if (type != kType) return Ok();
  peapod::cri::v1::PodSandboxConfig cfg;
  if (!cfg.ParseFromString(options.value())) {
    return Error::Invalid("sandbox options: not a valid runtime.v1.PodSandboxConfig");
  }
  opts->hostname = cfg.hostname();
  opts->cri_files = true;  // containerd's CRI is the caller: it mounts the files from its dir
  opts->dns_servers.assign(cfg.dns_config().servers().begin(), cfg.dns_config().servers().end());
  opts->dns_searches.assign(cfg.dns_config().searches().begin(), cfg.dns_config().searches().end());
  opts->dns_options.assign(cfg.dns_config().options().begin(), cfg.dns_config().options().end());
  opts->sysctls.insert(cfg.linux().sysctls().begin(), cfg.linux().sysctls().end());
  opts->cgroup_parent = cfg.linux().cgroup_parent();
  const auto& res = cfg.linux().resources();
  if (res.memory_limit_in_bytes() > 0) opts->memory_limit_bytes = res.memory_limit_in_bytes();
  if (res.cpu_quota() > 0 && res.cpu_period() > 0) {
    opts->cpus = static_cast<double>(res.cpu_quota()) / static_cast<double>(res.cpu_period());
  }
  const auto& overhead = cfg.linux().overhead();
  if (overhead.memory_limit_in_bytes() > 0) {
    opts->memory_overhead_bytes = overhead.memory_limit_in_bytes();
  }
  return Ok();
}

grpc::ServerUnaryReactor* ControllerService::Create(grpc::CallbackServerContext* ctx,
                                                    const sbv1::ControllerCreateRequest* req,
                                                    sbv1::ControllerCreateResponse* resp) {
  spdlog::info("controller: Create {} netns={}", req->sandbox_id(), req->netns_path());
  std::string id = req->sandbox_id();
  PodOptions opts;
  opts.netns = req->netns_path();
  if (auto r = PodOptionsFromCri(req->options(), &opts); !r.ok()) {
    return Answer(ctx, ToGrpc(r.error()));
  }
  return OnLoop<bool>(
      ctx, loop_, Void([this, id, opts](auto done) { pods_->Create(id, opts, std::move(done)); }),
      [resp, id](bool) { resp->set_sandbox_id(id); });
}

grpc::ServerUnaryReactor* ControllerService::Start(grpc::CallbackServerContext* ctx,
                                                   const sbv1::ControllerStartRequest* req,
                                                   sbv1::ControllerStartResponse* resp) {
  spdlog::info("controller: Start {}", req->sandbox_id());
  std::string id = req->sandbox_id();
  return OnLoop<PodStatus>(
      ctx, loop_, [this, id](auto done) { pods_->Start(id, std::move(done)); },
      [resp, id](const PodStatus& s) {
        resp->set_sandbox_id(id);
        resp->set_pid(static_cast<uint32_t>(s.pid));
        *resp->mutable_created_at() = TimeUtil::NanosecondsToTimestamp(s.created_at_ns);
        // Version 2: containerd starts our shim for each container (and ignores the address,
        // which must still be non-empty).
        resp->set_address(s.address);
        resp->set_version(2);
      });
}

grpc::ServerUnaryReactor* ControllerService::Platform(grpc::CallbackServerContext* ctx,
                                                      const sbv1::ControllerPlatformRequest*,
                                                      sbv1::ControllerPlatformResponse* resp) {
  resp->mutable_platform()->set_os("linux");
  resp->mutable_platform()->set_architecture("amd64");
  return Answer(ctx, grpc::Status::OK);
}

grpc::ServerUnaryReactor* ControllerService::Stop(grpc::CallbackServerContext* ctx,
                                                  const sbv1::ControllerStopRequest* req,
                                                  sbv1::ControllerStopResponse*) {
  spdlog::info("controller: Stop {} timeout={}s", req->sandbox_id(), req->timeout_secs());
  std::string id = req->sandbox_id();
  uint32_t t = req->timeout_secs();
  return OnLoop<bool>(ctx, loop_,
                      Void([this, id, t](auto done) { pods_->Stop(id, t, std::move(done)); }),
                      [](bool) {});
}

grpc::ServerUnaryReactor* ControllerService::Wait(grpc::CallbackServerContext* ctx,
                                                  const sbv1::ControllerWaitRequest* req,
                                                  sbv1::ControllerWaitResponse* resp) {
  std::string id = req->sandbox_id();
  return OnLoop<PodExit>(
      ctx, loop_, [this, id](auto done) { pods_->Wait(id, std::move(done)); },
      [resp](const PodExit& e) {
        resp->set_exit_status(e.exit_status);
        *resp->mutable_exited_at() = TimeUtil::NanosecondsToTimestamp(e.exited_at_ns);
      });
}

grpc::ServerUnaryReactor* ControllerService::Status(grpc::CallbackServerContext* ctx,
                                                    const sbv1::ControllerStatusRequest* req,
                                                    sbv1::ControllerStatusResponse* resp) {
  std::string id = req->sandbox_id();
  bool verbose = req->verbose();
  return OnLoop<PodStatus>(
      ctx, loop_, [this, id](auto done) { done(pods_->Status(id)); },
      [resp, verbose](const PodStatus& s) {
        FillStatus(s, resp);
        if (verbose) (*resp->mutable_info())["phase"] = s.phase;
      });
}

grpc::ServerUnaryReactor* ControllerService::Shutdown(grpc::CallbackServerContext* ctx,
                                                      const sbv1::ControllerShutdownRequest* req,
                                                      sbv1::ControllerShutdownResponse*) {
  spdlog::info("controller: Shutdown {}", req->sandbox_id());
  std::string id = req->sandbox_id();
  return OnLoop<bool>(ctx, loop_,
                      Void([this, id](auto done) { pods_->Shutdown(id, std::move(done)); }),
                      [](bool) {});
}

grpc::ServerUnaryReactor* ControllerService::Metrics(grpc::CallbackServerContext* ctx,
                                                     const sbv1::ControllerMetricsRequest* req,
                                                     sbv1::ControllerMetricsResponse* resp) {
  std::string id = req->sandbox_id();
  return OnLoop<std::string>(
      ctx, loop_, [this, id](auto done) { pods_->Metrics(id, std::move(done)); },
      [resp, id](std::string& data) {
        auto* m = resp->mutable_metrics();
        *m->mutable_timestamp() = TimeUtil::GetCurrentTime();
        m->set_id(id);
        // cgroups v2 statistics of the whole pod, as a task's Stats carries them.
        m->mutable_data()->set_type_url("type.googleapis.com/io.containerd.cgroups.v2.Metrics");
        m->mutable_data()->set_value(std::move(data));
      });
}

grpc::ServerUnaryReactor* ControllerService::Update(grpc::CallbackServerContext* ctx,
                                                    const sbv1::ControllerUpdateRequest* req,
                                                    sbv1::ControllerUpdateResponse*) {
  // Labels and extensions live in containerd's own store; nothing of ours depends on them.
  std::string id = req->sandbox_id();
  return OnLoop<PodStatus>(
      ctx, loop_, [this, id](auto done) { done(pods_->Status(id)); }, [](const PodStatus&) {});
}

}  // namespace peapod::sandboxer
