// A pod's container storage: layer disks (AttachRootfs), volumes in the share (ShareVolumes)
// and their release, one at a time per pod through the pod's storage queue.
#include <algorithm>
#include <optional>
#include <set>

#include <spdlog/spdlog.h>

#include "common/base/ids.h"
#include "common/log/log.h"
#include "peapod/agent/v1/agent.pb.h"
#include "sandboxer/pods.h"
#include "sandboxer/pods_internal.h"

namespace peapod::sandboxer {

namespace v1 = peapod::agent::v1;
using Phase = PodRecord::Phase;

void PodManager::Enqueue(const std::string& id, std::function<void(std::function<void()>)> op) {
  Pod* pod = Find(id);
  if (!pod) return op([] {});
  pod->ops.push_back(std::move(op));
  if (pod->op_running) return;
  std::weak_ptr<bool> alive = alive_;
  // Runs the queue's head; its completion runs the next one (from the loop, never nested).
  // The runner holds itself only weakly: the op in flight keeps it alive through its
  // completion, and it is freed once the queue is empty (a strong self-reference was a cycle).
  auto run_next = std::make_shared<std::function<void()>>();
  std::weak_ptr<std::function<void()>> weak = run_next;
  *run_next = [this, alive, id, weak] {
    Pod* p = Find(id);
    if (!p || p->ops.empty()) {
      if (p) p->op_running = false;
      return;
    }
    p->op_running = true;
    auto next = std::move(p->ops.front());
    p->ops.pop_front();
    next([this, alive, self = weak.lock()] {
      loop_->Post([alive, self] {
        if (!alive.expired()) (*self)();
      });
    });
  };
  (*run_next)();
}

RootfsInfo PodManager::RootfsOf(const Pod& pod, const std::string& container) const {
  RootfsInfo info;
  auto it = pod.rec.rootfs.find(container);
  if (it == pod.rec.rootfs.end()) return info;
  for (unsigned unit : it->second) {
    for (const auto& d : pod.rec.disks) {
      if (d.unit != unit) continue;
      v1::Storage st;
      st.set_driver(v1::Storage::SCSI);
      st.set_source(fmt::format("0:{}", unit));
      st.set_fstype("erofs");
      st.add_options("ro");
      // Named by unit and image, so a unit reused for another image is another mount.
      st.set_mount_point(fmt::format("{}/{}-{}", kGuestLayersDir, unit, ShortHash(d.path)));
      info.layers.push_back(std::move(st));
    }
  }
  if (pod.rec.scratch) info.upper_dir = std::string(kGuestScratchDir) + "/" + container;
  return info;
}

void PodManager::AttachRootfs(const std::string& id, const std::string& container,
                              google::protobuf::RepeatedPtrField<containerd::types::Mount> mounts,
                              Reply<RootfsInfo> reply) {
  if (!IsValidId(container)) {
    return reply(Error::Invalid("container id '{}' is invalid: use {}", container, kIdRule));
  }
  if (!Find(id)) return reply(UnknownPod(id));
  auto sources = LayersFromMounts(mounts);
  if (!sources.ok()) {
    return reply(std::move(sources).error().Wrap("attach rootfs of container " + container));
  }
  Enqueue(id, [this, id, container, sources = std::move(*sources),
               reply](std::function<void()> done) {
    auto finish = [reply, done](Result<RootfsInfo> r) {
      reply(std::move(r));
      done();
    };
    Pod* pod = Find(id);
    if (!pod) return finish(UnknownPod(id));
    if (pod->rec.phase != Phase::kRunning) {
      return finish(Error::Make(Code::kFailedPrecondition,
                                "sandbox {} is {}: containers need a running pod", id,
                                PhaseName(pod->rec.phase)));
    }
    if (pod->rec.rootfs.count(container)) return finish(RootfsOf(*pod, container));
    if (!backend_->SupportsDisks()) {
      return finish(Error::Make(Code::kUnimplemented,
                                "this VM backend cannot attach disks (container {})", container));
    }
    // Every layer's image: erofs blobs as they are, directories through the cache (builds run
    // in parallel on the workers). Collected in order, then attached.
    struct Gather {
      std::vector<Result<std::pair<std::string, bool>>> images;
      size_t pending = 0;
    };
    auto g = std::make_shared<Gather>();
    g->images.assign(sources.size(), Error(Code::kUnknown, "pending"));
    g->pending = sources.size();
    auto one_done = [this, g, id, container, finish](size_t i,
                                                     Result<std::pair<std::string, bool>> r) {
      g->images[i] = std::move(r);
      if (--g->pending > 0) return;
      std::vector<std::pair<std::string, bool>> images;
      std::optional<Error> failed;
      for (auto& img : g->images) {
        if (img.ok()) {
          images.push_back(*img);
        } else if (!failed) {
          failed = img.error();
        }
      }
      if (failed) {
        for (const auto& [path, cached] : images) {
          if (cached) cache_.Release(path);
        }
        return finish(std::move(*failed).Wrap("attach rootfs of container " + container));
      }
      AttachImages(id, container, std::move(images),
                   [finish](Result<RootfsInfo> r) { finish(std::move(r)); });
    };
    for (size_t i = 0; i < sources.size(); ++i) {
      if (sources[i].is_image && !ids_.enabled()) {
        one_done(i, std::pair{sources[i].path, false});
      } else if (sources[i].is_image) {
        // containerd's blob, in directories a confined QEMU cannot pass: a copy in the cache.
        cache_.AcquireCopy(sources[i].path, [one_done, i](Result<std::string> r) {
          if (!r.ok()) return one_done(i, std::move(r).error());
          one_done(i, std::pair{*r, true});
        });
      } else {
        cache_.Acquire(sources[i].path, [one_done, i](Result<std::string> r) {
          if (!r.ok()) return one_done(i, std::move(r).error());
          one_done(i, std::pair{*r, true});
        });
      }
    }
  });
}

void PodManager::AttachImages(const std::string& id, const std::string& container,
                              std::vector<std::pair<std::string, bool>> images,
                              Reply<RootfsInfo> reply) {
  Pod* pod = Find(id);
  auto release_all = [this](const std::vector<std::pair<std::string, bool>>& imgs) {
    for (const auto& [path, cached] : imgs) {
      if (cached) cache_.Release(path);
    }
  };
  if (!pod) {
    release_all(images);
    return reply(UnknownPod(id));
  }
  // A layer the pod already has attached is shared (its disk keeps the one cache reference);
  // a new one gets the lowest free unit (0 is the scratch disk).
  std::set<unsigned> used = {0};
  for (const auto& d : pod->rec.disks) used.insert(d.unit);
  std::vector<unsigned> units;
  std::vector<DiskRecord> fresh;
  for (const auto& [path, cached] : images) {
    auto same = [&p = path](const DiskRecord& d) { return d.path == p; };
    auto old = std::find_if(pod->rec.disks.begin(), pod->rec.disks.end(), same);
    auto now = std::find_if(fresh.begin(), fresh.end(), same);
    if (old != pod->rec.disks.end()) {
      // Used again: it goes last, the order DetachUnused keeps idle disks by.
      units.push_back(old->unit);
      std::rotate(old, old + 1, pod->rec.disks.end());
      if (cached) cache_.Release(path);
      continue;
    }
    if (now != fresh.end()) {
      units.push_back(now->unit);
      if (cached) cache_.Release(path);
      continue;
    }
    unsigned unit = 1;
    while (used.count(unit)) ++unit;
    used.insert(unit);
    fresh.push_back(DiskRecord{unit, path, true, cached});
    units.push_back(unit);
  }
  std::string domain = pod->rec.domain;
  const auto t0 = std::chrono::steady_clock::now();
  Off(
      vm_workers_,
      [this, domain, fresh]() -> Result<void> {
        for (size_t attached = 0; attached < fresh.size(); ++attached) {
          const auto& d = fresh[attached];
          if (auto r = backend_->AttachDisk(domain, {d.path, d.unit, true}); !r.ok()) {
            for (size_t i = 0; i < attached; ++i) {
              (void)backend_->DetachDisk(domain, {fresh[i].path, fresh[i].unit, true});
            }
            return r;
          }
        }
        return Ok();
      },
      [this, id, container, units, fresh, reply, t0](Result<void> r) {
        Pod* pod = Find(id);
        if (!r.ok() || !pod) {
          for (const auto& d : fresh) {
            if (d.cached) cache_.Release(d.path);
          }
          if (!pod) return reply(UnknownPod(id));
          return reply(std::move(r).error().Wrap("attach rootfs of container " + container));
        }
        for (const auto& d : fresh) pod->rec.disks.push_back(d);
        pod->rec.rootfs[container] = units;
        spdlog::info("pod {}: container {} rootfs: {} layer(s), {} newly attached in {} ms", id,
                     container, units.size(), fresh.size(), log::MsSince(t0));
        // Answered once recorded: a restart then knows the disks the container stacks.
        SaveThen(*pod, [this, id, container, reply](Result<void>) {
          Pod* pod = Find(id);
          if (!pod) return reply(UnknownPod(id));
          reply(RootfsOf(*pod, container));
        });
      });
}

void PodManager::ShareVolumes(const std::string& id, const std::string& container,
                              std::vector<VolumeRequest> volumes,
                              Reply<std::vector<SharedVolume>> reply) {
  if (!IsValidId(container)) {
    return reply(Error::Invalid("container id '{}' is invalid: use {}", container, kIdRule));
  }
  if (!Find(id)) return reply(UnknownPod(id));
  Enqueue(id, [this, id, container, volumes = std::move(volumes),
               reply](std::function<void()> done) {
    auto finish = [reply, done](Result<std::vector<SharedVolume>> r) {
      reply(std::move(r));
      done();
    };
    Pod* pod = Find(id);
    if (!pod) return finish(UnknownPod(id));
    if (pod->rec.phase != Phase::kRunning) {
      return finish(Error::Make(Code::kFailedPrecondition, "sandbox {} is {}", id,
                                PhaseName(pod->rec.phase)));
    }
    size_t first = pod->rec.volumes[container].size();
    auto shared = std::make_shared<Result<SharedVolumes>>(Error(Code::kUnknown, ""));
    Off(
        fs_workers_,
        [this, id, container, first, volumes, shared] {
          *shared =
              storage_->ShareVolumes(RunDir(id), container, first, volumes, cfg_.run_dir + "/pods");
          return Ok();
        },
        [this, id, container, shared, finish](Result<void>) {
          Pod* pod = Find(id);
          if (!shared->ok()) return finish(std::move(*shared).error());
          if (!pod) {
            // Gone meanwhile: its run dir, and these binds below it, went with it.
            return finish(UnknownPod(id));
          }
          auto& mine = pod->rec.volumes[container];
          for (const auto& rel : (*shared)->rels) mine.push_back(RunDir(id) + "/share/" + rel);
          SaveThen(*pod, [shared, finish](Result<void>) { finish(std::move((*shared)->guest)); });
        });
  });
}

void PodManager::ReleaseContainer(const std::string& id, const std::string& container,
                                  Reply<void> reply) {
  Enqueue(id, [this, id, container, reply](std::function<void()> done) {
    auto finish = [reply, done](Result<void> r) {
      reply(std::move(r));
      done();
    };
    Pod* pod = Find(id);
    if (!pod) return finish(Ok());  // the pod, and everything of it, is already gone
    Off(
        fs_workers_,
        [this, id, container]() -> Result<void> {
          if (!IsValidId(container)) return Ok();
          return storage_->RemoveFromShare(RunDir(id), "volumes/" + container);
        },
        [this, id, container, finish](Result<void> r) {
          if (!r.ok()) return finish(std::move(r).error().Wrap("release container " + container));
          Pod* pod = Find(id);
          if (!pod) return finish(Ok());
          DetachUnused(*pod, container, finish);
        });
  });
}

void PodManager::DetachUnused(Pod& pod, const std::string& container,
                              std::function<void(Result<void>)> finish) {
  pod.rec.volumes.erase(container);
  pod.rec.rootfs.erase(container);
  // Disks no remaining container stacks, least recently used first. In a running pod the
  // kIdleLayerDisks used last stay attached: a container started again from the same image (a
  // restart, the next job) then needs no hot-plug, and its layer mounts at once.
  std::set<unsigned> in_use;
  for (const auto& [c, units] : pod.rec.rootfs) in_use.insert(units.begin(), units.end());
  std::vector<DiskRecord> unused;
  for (const auto& d : pod.rec.disks) {
    if (!in_use.count(d.unit)) unused.push_back(d);
  }
  if (pod.rec.phase == Phase::kRunning) {
    unused.resize(unused.size() - std::min(unused.size(), kIdleLayerDisks));
  }
  // Answered once recorded, detaching or not: a restart then knows the container is gone.
  if (unused.empty()) return SaveThen(pod, [finish](Result<void>) { finish(Ok()); });
  SaveLater(pod);
  std::string id = pod.rec.id, domain = pod.rec.domain;
  bool running = pod.rec.phase == Phase::kRunning;
  auto results = std::make_shared<std::vector<Result<void>>>();
  Off(
      vm_workers_,
      [this, domain, running, unused, results] {
        for (const auto& d : unused) {
          results->push_back(running ? backend_->DetachDisk(domain, {d.path, d.unit, true})
                                     : Result<void>(Ok()));
        }
        return Ok();
      },
      [this, id, unused, results, finish](Result<void>) {
        Pod* pod = Find(id);
        std::optional<Error> failed;
        for (size_t i = 0; i < unused.size(); ++i) {
          if (!(*results)[i].ok()) {
            // Still attached: keep it on record (its unit stays taken) and say so.
            if (!failed) failed = (*results)[i].error();
            continue;
          }
          // A pod shut down meanwhile released its disks' cache references already.
          if (!pod) continue;
          auto& disks = pod->rec.disks;
          disks.erase(std::remove_if(disks.begin(), disks.end(),
                                     [&](const DiskRecord& d) { return d.unit == unused[i].unit; }),
                      disks.end());
          if (unused[i].cached) cache_.Release(unused[i].path);
        }
        cache_.Collect();
        auto answer = [failed, finish](Result<void>) {
          if (failed) return finish(Error(*failed).Wrap("detach layer disk"));
          finish(Ok());
        };
        if (!pod) return answer(Ok());
        SaveThen(*pod, answer);  // answered once recorded
      });
}

}  // namespace peapod::sandboxer
