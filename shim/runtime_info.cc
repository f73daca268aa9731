#include "shim/runtime_info.h"

#include <nlohmann/json.hpp>

#include "containerd/types/introspection.pb.h"

namespace peapod::shim {

std::string FeaturesJson() {
  nlohmann::json f;
  // The agent hands crun 1.0.2 whatever version containerd writes (crun 1.8 refuses newer).
  f["ociVersionMin"] = "1.0.0";
  f["ociVersionMax"] = "1.3.0";
  f["hooks"] = {"prestart",       "createRuntime", "createContainer",
                "startContainer", "poststart",     "poststop"};
  // Mount options the guest's crun applies to binds of the pod share. "rro" is why containerd
  // asks: a volume marked recursive read-only is read-only all the way down in the guest.
  f["mountOptions"] = {"async",       "atime",  "bind",     "defaults",   "dev",
                       "diratime",    "exec",   "noatime",  "nodev",      "nodiratime",
                       "noexec",      "nosuid", "private",  "rbind",      "relatime",
                       "remount",     "ro",     "rprivate", "rro",        "rrw",
                       "rshared",     "rslave", "rw",       "shared",     "slave",
                       "strictatime", "suid",   "sync",     "unbindable", "runbindable"};
  f["linux"] = {
      {"namespaces", {"cgroup", "ipc", "mount", "network", "pid", "uts"}},
      {"cgroup", {{"v1", false}, {"v2", true}, {"systemd", false}, {"systemdUser", false}}},
      {"seccomp", {{"enabled", true}}},
      {"apparmor", {{"enabled", false}}},
      {"selinux", {{"enabled", false}}},
      {"mountExtensions", {{"idmap", {{"enabled", false}}}}},
  };
  f["annotations"] = {{"io.peapod.isolation", "vm"}};
  return f.dump();
}

std::string RuntimeInfoBytes(const std::string& version) {
  containerd::types::RuntimeInfo info;
  info.set_name("io.containerd.peapod.v2");
  info.mutable_version()->set_version(version);
  auto* any = info.mutable_features();
  any->set_type_url("types.containerd.io/opencontainers/runtime-spec/1/features/Features");
  any->set_value(FeaturesJson());
  return info.SerializeAsString();
}

}  // namespace peapod::shim
