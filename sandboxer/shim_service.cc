#include "sandboxer/shim_service.h"

#include <google/protobuf/empty.pb.h>
#include <spdlog/spdlog.h>

#include "peapod/sandboxer/v1/sandboxer.pb.h"

namespace peapod::sandboxer {

namespace pb = peapod::sandboxer::v1;
using google::protobuf::Empty;

namespace {

constexpr char kService[] = "peapod.sandboxer.v1.Sandboxer";

pb::PodInfo InfoOf(const PodStatus& s) {
  pb::PodInfo info;
  info.set_pod_id(s.id);
  auto scheme = s.address.find("://");
  info.set_agent_address(scheme == std::string::npos ? s.address : s.address.substr(scheme + 3));
  info.set_pid(static_cast<uint32_t>(s.pid));
  info.set_ready(s.ready);
  return info;
}

template <typename Req, typename Resp, typename Fn>
void Register(ttrpc::Server& server, const std::string& method, Fn fn) {
  ttrpc::RegisterTyped<Req, Resp>(server, kService, method,
                                  [fn = std::move(fn)](const ttrpc::CallContext&, Req&& req,
                                                       ttrpc::TypedResponder<Resp> reply) {
                                    fn(std::move(req), std::move(reply));
                                  });
}

pb::AttachRootfsResponse RootfsOf(RootfsInfo r) {
  pb::AttachRootfsResponse resp;
  for (auto& l : r.layers) *resp.add_layers() = std::move(l);
  resp.set_upper_dir(r.upper_dir);
  return resp;
}

std::vector<VolumeRequest> VolumesOf(const google::protobuf::RepeatedPtrField<pb::HostVolume>& in) {
  std::vector<VolumeRequest> volumes;
  for (const auto& v : in) {
    volumes.push_back(
        {v.host_path(), v.readonly(), v.recursive_readonly(), v.propagate_from_host()});
  }
  return volumes;
}

pb::ShareVolumesResponse SharedOf(std::vector<SharedVolume> shared) {
  pb::ShareVolumesResponse resp;
  for (auto& v : shared) {
    resp.add_guest_paths(std::move(v.guest_path));
    auto* subs = resp.add_submounts();
    for (auto& m : v.submounts) {
      auto* s = subs->add_submounts();
      s->set_path(std::move(m.path));
      s->set_guest_path(std::move(m.guest_path));
      s->set_readonly(m.readonly);
    }
  }
  return resp;
}

// PrepareContainer: the pod, then its rootfs, then its volumes; a failure after the rootfs
// releases what the container got.
void PrepareContainer(PodManager* pods, pb::PrepareContainerRequest req,
                      ttrpc::TypedResponder<pb::PrepareContainerResponse> reply) {
  auto status = pods->Status(req.pod_id());
  if (!status.ok()) return reply(std::move(status).error());
  auto resp = std::make_shared<pb::PrepareContainerResponse>();
  *resp->mutable_pod() = InfoOf(*status);
  auto shared_req = std::make_shared<pb::PrepareContainerRequest>(std::move(req));
  const std::string pod = shared_req->pod_id();
  const std::string ctr = shared_req->container_id();
  pods->AttachRootfs(pod, ctr, std::move(*shared_req->mutable_mounts()),
                     [pods, pod, ctr, shared_req, resp, reply](Result<RootfsInfo> r) {
                       if (!r.ok()) return reply(std::move(r).error());
                       *resp->mutable_rootfs() = RootfsOf(std::move(*r));
                       if (shared_req->volumes().empty()) return reply(*resp);
                       pods->ShareVolumes(
                           pod, ctr, VolumesOf(shared_req->volumes()),
                           [pods, pod, ctr, resp, reply](Result<std::vector<SharedVolume>> v) {
                             if (v.ok()) {
                               *resp->mutable_volumes() = SharedOf(std::move(*v));
                               return reply(*resp);
                             }
                             pods->ReleaseContainer(
                                 pod, ctr, [reply, e = std::move(v).error()](Result<void> x) {
                                   if (!x.ok())
                                     spdlog::warn("shim api: release after a failed prepare: {}",
                                                  x.error().ToString());
                                   reply(e);
                                 });
                           });
                     });
}

std::function<void(Result<void>)> EmptyReply(ttrpc::TypedResponder<Empty> reply) {
  return [reply](Result<void> r) {
    if (!r.ok()) return reply(std::move(r).error());
    reply(Empty());
  };
}

}  // namespace

void RegisterShimService(ttrpc::Server& server, PodManager* pods) {
  // Create (if new) and start (if not running): the shim of a pause container, or of a plain
  // container that is its own pod, calls this and may call it again after a restart.
  Register<pb::CreatePodRequest, pb::PodInfo>(
      server, "CreatePod",
      [pods](pb::CreatePodRequest req, ttrpc::TypedResponder<pb::PodInfo> reply) {
        std::string id = req.pod_id();
        spdlog::info("shim api: CreatePod {} netns={}", id, req.netns_path());
        auto start = [pods, id, reply] {
          pods->Start(id, [reply](Result<PodStatus> s) {
            if (!s.ok()) return reply(std::move(s).error());
            reply(InfoOf(*s));
          });
        };
        if (pods->Status(id).ok()) return start();
        PodOptions opts;
        opts.netns = req.netns_path();
        opts.hostname = req.hostname();
        opts.memory_limit_bytes = req.memory_limit_bytes();
        opts.cpus = req.cpus();
        pods->Create(id, opts, [reply, start](Result<void> r) {
          if (!r.ok()) return reply(std::move(r).error());
          start();
        });
      });

  Register<pb::GetPodRequest, pb::PodInfo>(
      server, "GetPod", [pods](pb::GetPodRequest req, ttrpc::TypedResponder<pb::PodInfo> reply) {
        auto s = pods->Status(req.pod_id());
        if (!s.ok()) return reply(std::move(s).error());
        reply(InfoOf(*s));
      });

  Register<pb::RemovePodRequest, Empty>(
      server, "RemovePod", [pods](pb::RemovePodRequest req, ttrpc::TypedResponder<Empty> reply) {
        spdlog::info("shim api: RemovePod {}", req.pod_id());
        pods->Shutdown(req.pod_id(), EmptyReply(reply));
      });

  Register<pb::AttachRootfsRequest, pb::AttachRootfsResponse>(
      server, "AttachRootfs",
      [pods](pb::AttachRootfsRequest req, ttrpc::TypedResponder<pb::AttachRootfsResponse> reply) {
        pods->AttachRootfs(req.pod_id(), req.container_id(), std::move(*req.mutable_mounts()),
                           [reply](Result<RootfsInfo> r) {
                             if (!r.ok()) return reply(std::move(r).error());
                             reply(RootfsOf(std::move(*r)));
                           });
      });

  Register<pb::ShareVolumesRequest, pb::ShareVolumesResponse>(
      server, "ShareVolumes",
      [pods](pb::ShareVolumesRequest req, ttrpc::TypedResponder<pb::ShareVolumesResponse> reply) {
        pods->ShareVolumes(req.pod_id(), req.container_id(), VolumesOf(req.volumes()),
                           [reply](Result<std::vector<SharedVolume>> r) {
                             if (!r.ok()) return reply(std::move(r).error());
                             reply(SharedOf(std::move(*r)));
                           });
      });

  Register<pb::PrepareContainerRequest, pb::PrepareContainerResponse>(
      server, "PrepareContainer",
      [pods](pb::PrepareContainerRequest req,
             ttrpc::TypedResponder<pb::PrepareContainerResponse> reply) {
        PrepareContainer(pods, std::move(req), std::move(reply));
      });

  Register<pb::ReleaseContainerRequest, Empty>(
      server, "ReleaseContainer",
      [pods](pb::ReleaseContainerRequest req, ttrpc::TypedResponder<Empty> reply) {
        pods->ReleaseContainer(req.pod_id(), req.container_id(), EmptyReply(reply));
      });
}

}  // namespace peapod::sandboxer
