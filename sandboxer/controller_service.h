// containerd.services.sandbox.v1.Controller over gRPC: what containerd 2.x's proxy sandbox
// plugin calls. Each handler runs on a gRPC thread and hands the request to the PodManager's
// control loop; Wait blocks its gRPC thread for the pod's life, as containerd expects.
#pragma once

#include <grpcpp/grpcpp.h>

#include "common/loop/event_loop.h"
#include "containerd/services/sandbox/v1/sandbox.grpc.pb.h"
#include "sandboxer/pods.h"

namespace peapod::sandboxer {

namespace sbv1 = ::containerd::services::sandbox::v1;

class ControllerService final : public sbv1::Controller::Service {
 public:
  ControllerService(EventLoop* loop, PodManager* pods) : loop_(loop), pods_(pods) {}

  grpc::Status Create(grpc::ServerContext*, const sbv1::ControllerCreateRequest* req,
                      sbv1::ControllerCreateResponse* resp) override;
  grpc::Status Start(grpc::ServerContext*, const sbv1::ControllerStartRequest* req,
                     sbv1::ControllerStartResponse* resp) override;
  grpc::Status Platform(grpc::ServerContext*, const sbv1::ControllerPlatformRequest* req,
                        sbv1::ControllerPlatformResponse* resp) override;
  grpc::Status Stop(grpc::ServerContext*, const sbv1::ControllerStopRequest* req,
                    sbv1::ControllerStopResponse* resp) override;
  grpc::Status Wait(grpc::ServerContext*, const sbv1::ControllerWaitRequest* req,
                    sbv1::ControllerWaitResponse* resp) override;
  grpc::Status Status(grpc::ServerContext*, const sbv1::ControllerStatusRequest* req,
                      sbv1::ControllerStatusResponse* resp) override;
  grpc::Status Shutdown(grpc::ServerContext*, const sbv1::ControllerShutdownRequest* req,
                        sbv1::ControllerShutdownResponse* resp) override;
  grpc::Status Metrics(grpc::ServerContext*, const sbv1::ControllerMetricsRequest* req,
                       sbv1::ControllerMetricsResponse* resp) override;
  grpc::Status Update(grpc::ServerContext*, const sbv1::ControllerUpdateRequest* req,
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
