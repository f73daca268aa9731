// containerd.services.sandbox.v1.Controller over gRPC: what containerd 2.x's proxy sandbox
// plugin calls. gRPC's callback API: each handler hands the request to the PodManager's control
// loop and returns; the loop answers the call. No thread waits for a call, so a Wait that lasts
// the pod's life costs no thread.
#pragma once

#include <grpcpp/grpcpp.h>

#include "common/loop/event_loop.h"
#include "containerd/services/sandbox/v1/sandbox.grpc.pb.h"
#include "sandboxer/pods.h"

namespace peapod::sandboxer {

namespace sbv1 = ::containerd::services::sandbox::v1;

class ControllerService final : public sbv1::Controller::CallbackService {
 public:
  ControllerService(EventLoop* loop, PodManager* pods) : loop_(loop), pods_(pods) {}

  grpc::ServerUnaryReactor* Create(grpc::CallbackServerContext* ctx,
                                   const sbv1::ControllerCreateRequest* req,
                                   sbv1::ControllerCreateResponse* resp) override;
  grpc::ServerUnaryReactor* Start(grpc::CallbackServerContext* ctx,
                                  const sbv1::ControllerStartRequest* req,
                                  sbv1::ControllerStartResponse* resp) override;
  grpc::ServerUnaryReactor* Platform(grpc::CallbackServerContext* ctx,
                                     const sbv1::ControllerPlatformRequest* req,
                                     sbv1::ControllerPlatformResponse* resp) override;
  grpc::ServerUnaryReactor* Stop(grpc::CallbackServerContext* ctx,
                                 const sbv1::ControllerStopRequest* req,
                                 sbv1::ControllerStopResponse* resp) override;
  grpc::ServerUnaryReactor* Wait(grpc::CallbackServerContext* ctx,
                                 const sbv1::ControllerWaitRequest* req,
                                 sbv1::ControllerWaitResponse* resp) override;
  grpc::ServerUnaryReactor* Status(grpc::CallbackServerContext* ctx,
                                   const sbv1::ControllerStatusRequest* req,
                                   sbv1::ControllerStatusResponse* resp) override;
  grpc::ServerUnaryReactor* Shutdown(grpc::CallbackServerContext* ctx,
                                     const sbv1::ControllerShutdownRequest* req,
                                     sbv1::ControllerShutdownResponse* resp) override;
  grpc::ServerUnaryReactor* Metrics(grpc::CallbackServerContext* ctx,
                                    const sbv1::ControllerMetricsRequest* req,
                                    sbv1::ControllerMetricsResponse* resp) override;
  grpc::ServerUnaryReactor* Update(grpc::CallbackServerContext* ctx,
                                   const sbv1::ControllerUpdateRequest* req,
                                   sbv1::ControllerUpdateResponse* resp) override;

 private:
  EventLoop* loop_;
  PodManager* pods_;
};

grpc::Status ToGrpc(const Error& e);

// Reads what peapod uses of the CRI PodSandboxConfig containerd puts in Create's options
// (hostname, DNS, sysctls, resource limits, overhead). Other options are ignored.
Result<void> PodOptionsFromCri(const google::protobuf::Any& options, PodOptions* opts);

}  // namespace peapod::sandboxer
