// OCI runtime-spec config.json: the whole document plus validated typed views of what peapod uses.
//
// The host gets config.json from containerd and later rewrites it for the guest, so the document
// is kept whole (an ordered_json: unknown fields and key order survive Parse -> Dump untouched)
// and every change goes through a mutator that re-validates. A Spec that exists is valid: the
// typed views are filled by the same validation pass and never disagree with the document.
//
// Validation errors are kInvalidArgument and name the source, the JSON path and what was expected,
// e.g. "config.json: process.args[2]: expected string, got number". Load's I/O errors carry their
// errno's code (kNotFound for a missing file).
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/base/result.h"

namespace peapod::oci {

// Ordered so a rewritten config.json keeps the original's key order (diffable, "untouched").
using Json = nlohmann::ordered_json;
using StringMap = std::map<std::string, std::string, std::less<>>;

// Bounds on untrusted input: Dump and operator== recurse, so nesting must be bounded.
inline constexpr size_t kMaxSpecBytes = 8 << 20;
inline constexpr int kMaxNestingDepth = 64;

// CRI annotations (containerd's pkg/cri/annotations).
inline constexpr std::string_view kAnnotationContainerType = "io.kubernetes.cri.container-type";
inline constexpr std::string_view kAnnotationSandboxId = "io.kubernetes.cri.sandbox-id";

enum class NamespaceType { kPid, kNetwork, kMount, kIpc, kUts, kUser, kCgroup, kTime };
// The runtime-spec name: "pid", "network", ...
std::string_view NamespaceTypeName(NamespaceType type);
std::optional<NamespaceType> ParseNamespaceType(std::string_view name);

struct User {
  uint32_t uid = 0;
  uint32_t gid = 0;
  std::optional<uint32_t> umask;
  std::vector<uint32_t> additional_gids;
};

struct ConsoleSize {
  uint32_t height = 0;
  uint32_t width = 0;
};

struct Capabilities {
  std::vector<std::string> bounding;
  std::vector<std::string> effective;
  std::vector<std::string> inheritable;
  std::vector<std::string> permitted;
  std::vector<std::string> ambient;
};

struct Rlimit {
  std::string type;  // "RLIMIT_NOFILE", ...
  uint64_t hard = 0;
  uint64_t soft = 0;
};

struct Process {
  bool terminal = false;
  std::optional<ConsoleSize> console_size;
  User user;
  std::vector<std::string> args;  // never empty
  std::vector<std::string> env;   // each "KEY=VALUE" with a non-empty KEY
  std::string cwd;                // absolute
  std::optional<Capabilities> capabilities;
  std::vector<Rlimit> rlimits;
  bool no_new_privileges = false;
  std::optional<int> oom_score_adj;  // [-1000, 1000]
  // Kept as given: meaningful to the host's LSM, not to the guest's.
  std::optional<std::string> apparmor_profile;
  std::optional<std::string> selinux_label;

  // The value of KEY in env (last one wins, as getenv after execve would see).
  std::optional<std::string> Env(std::string_view key) const;
};

struct Root {
  std::string path;  // non-empty; relative paths are relative to the bundle
  bool readonly = false;
};

struct Mount {
  std::string destination;  // absolute
  std::string type;         // may be empty
  std::string source;       // may be empty
  std::vector<std::string> options;
};

struct Namespace {
  NamespaceType type = NamespaceType::kPid;
  std::string path;  // empty: create a new namespace; otherwise absolute: join it
};

struct IdMapping {
  uint32_t container_id = 0;
  uint32_t host_id = 0;
  uint32_t size = 0;
};

struct MemoryResources {
  std::optional<int64_t> limit;  // bytes; -1 is unlimited
  std::optional<int64_t> reservation;
  std::optional<int64_t> swap;
  std::optional<int64_t> kernel;
  std::optional<int64_t> kernel_tcp;
  std::optional<uint64_t> swappiness;
  std::optional<bool> disable_oom_killer;
};

struct CpuResources {
  std::optional<uint64_t> shares;
  std::optional<int64_t> quota;  // microseconds per period; -1 is unlimited
  std::optional<uint64_t> burst;
  std::optional<uint64_t> period;  // microseconds
  std::optional<int64_t> realtime_runtime;
  std::optional<uint64_t> realtime_period;
  std::string cpus;  // cpuset list, "" if unset
  std::string mems;
  std::optional<int64_t> idle;
};

struct PidsResources {
  int64_t limit = 0;  // <= 0 is unlimited
};

// devices, blockIO, hugepageLimits, network and rdma stay in the document only.
struct Resources {
  std::optional<MemoryResources> memory;
  std::optional<CpuResources> cpu;
  std::optional<PidsResources> pids;
  StringMap unified;  // cgroup v2 file -> value
};

// Named LinuxConfig / linux_config(): `linux` is a predefined macro under -std=gnu++*.
struct LinuxConfig {
  std::vector<Namespace> namespaces;  // no type twice
  std::string cgroups_path;           // cgroupfs path or systemd "slice:prefix:name"; may be empty
  std::optional<Resources> resources;
  std::vector<IdMapping> uid_mappings;
  std::vector<IdMapping> gid_mappings;
  StringMap sysctl;
  std::vector<std::string> masked_paths;
  std::vector<std::string> readonly_paths;

  const Namespace* FindNamespace(NamespaceType type) const;
};

// Who this container is to the CRI plugin (design.md, "Three ways in").
enum class CriContainerType {
  kNone,       // no CRI annotation: plain containerd, a one-container pod
  kSandbox,    // the pod's pause container: its shim creates the pod VM
  kContainer,  // an application container joining the pod named by SandboxId()
};

class Spec {
 public:
  // Parses and validates. `source` names the document in error messages.
  static Result<Spec> Parse(std::string_view json_text, std::string_view source = "config.json");
  // Reads and parses a file; errors start with the path.
  static Result<Spec> Load(const std::string& path);
  // Validates an already parsed document.
  static Result<Spec> FromJson(Json doc, std::string_view source = "config.json");

  // Compact by default; indent >= 0 pretty-prints. Never throws.
  std::string Dump(int indent = -1) const;
  const Json& doc() const { return doc_; }

  // Typed views, valid as long as the Spec is not mutated.
  const std::string& oci_version() const { return oci_version_; }
  const std::optional<Process>& process() const { return process_; }
  const Root& root() const { return root_; }
  const std::optional<std::string>& hostname() const { return hostname_; }
  const std::vector<Mount>& mounts() const { return mounts_; }
  const StringMap& annotations() const { return annotations_; }
  const std::optional<LinuxConfig>& linux_config() const { return linux_; }

  std::optional<std::string> Annotation(std::string_view key) const;
  CriContainerType ContainerType() const;
  // io.kubernetes.cri.sandbox-id; always set when ContainerType() is kContainer.
  std::optional<std::string> SandboxId() const;
  // The path of the namespace of this type to join, if the spec names one.
  std::optional<std::string> NamespacePath(NamespaceType type) const;

  // Mutators for the guest rewrite. Each validates the result and changes nothing on error.
  Result<void> SetRootPath(std::string_view path);
  // Replaces the path of the namespace of this type, or adds the namespace. An empty path
  // means "create a new one" (the "path" key is removed).
  Result<void> SetNamespace(NamespaceType type, std::string_view path = {});
  Result<void> RemoveNamespace(NamespaceType type);
  Result<void> SetCgroupsPath(std::string_view path);
  // Any other rewrite: `edit` changes a copy of the document, which replaces this one only if it
  // validates. An nlohmann exception thrown by `edit` becomes a kInternal error.
  Result<void> Edit(const std::function<void(Json& doc)>& edit);

 private:
  Spec() = default;
  // Validates doc and, only if valid, makes it (and its views) this Spec's.
  Result<void> Commit(Json doc);
  // Fills the typed views of a fresh Spec from doc; the error names the JSON path only.
  Result<void> ReadViews(const Json& doc);

  std::string source_ = "config.json";
  Json doc_;
  std::string oci_version_;
  std::optional<Process> process_;
  Root root_;
  std::optional<std::string> hostname_;
  std::vector<Mount> mounts_;
  StringMap annotations_;
  std::optional<LinuxConfig> linux_;
};

// A bare process object, as in an exec request (task v2 ExecProcessRequest.spec).
Result<Process> ParseProcess(std::string_view json_text, std::string_view source = "process");
Result<Process> ProcessFromJson(const Json& doc, std::string_view source = "process");

}  // namespace peapod::oci
