#include "common/oci/spec.h"

#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>

namespace peapod::oci {
namespace {

const std::string kSandboxId = "4f3c2b1a0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b";

std::string TestdataPath(const std::string& name) {
  return std::string(PEAPOD_TESTDATA_DIR) + "/oci/" + name;
}

std::string ReadText(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

Json ReadJson(const std::string& name) { return Json::parse(ReadText(TestdataPath(name))); }

// The CRI container spec with one defect, as text.
std::string Mutated(const std::function<void(Json&)>& mutate,
                    const std::string& name = "cri_container.json") {
  Json doc = ReadJson(name);
  mutate(doc);
  return doc.dump(2);
}

bool AllPrintableAscii(const std::string& s) {
  for (unsigned char c : s) {
    if (c < 0x20 || c >= 0x7f) return false;
  }
  return true;
}

constexpr std::string_view kMinimal = R"({"ociVersion": "1.1.0", "root": {"path": "/r"}})";

TEST(OciSpec, CriContainerReadsBackEveryField) {
  Result<Spec> r = Spec::Load(TestdataPath("cri_container.json"));
  ASSERT_TRUE(r.ok()) << r.error().message();
  const Spec& spec = *r;

  EXPECT_EQ(spec.oci_version(), "1.1.0");

  ASSERT_TRUE(spec.process().has_value());
  const Process& p = *spec.process();
  EXPECT_FALSE(p.terminal);
  EXPECT_FALSE(p.console_size.has_value());
  EXPECT_EQ(p.user.uid, 101u);
  EXPECT_EQ(p.user.gid, 101u);
  EXPECT_FALSE(p.user.umask.has_value());
  EXPECT_EQ(p.user.additional_gids, (std::vector<uint32_t>{101, 2000}));
  EXPECT_EQ(p.args, (std::vector<std::string>{"nginx", "-g", "daemon off;"}));
  ASSERT_EQ(p.env.size(), 6u);
  EXPECT_EQ(p.env[0], "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin");
  EXPECT_EQ(p.Env("NGINX_VERSION"), "1.25.3");
  EXPECT_EQ(p.Env("EMPTY"), "");
  EXPECT_EQ(p.Env("PAT"), std::nullopt);
  EXPECT_EQ(p.Env("MISSING"), std::nullopt);
  EXPECT_EQ(p.cwd, "/");
  ASSERT_TRUE(p.capabilities.has_value());
  EXPECT_EQ(p.capabilities->bounding.size(), 14u);
  EXPECT_EQ(p.capabilities->bounding[0], "CAP_CHOWN");
  EXPECT_EQ(p.capabilities->effective.size(), 14u);
  EXPECT_EQ(p.capabilities->permitted.back(), "CAP_AUDIT_WRITE");
  EXPECT_TRUE(p.capabilities->inheritable.empty());
  EXPECT_TRUE(p.capabilities->ambient.empty());
  ASSERT_EQ(p.rlimits.size(), 1u);
  EXPECT_EQ(p.rlimits[0].type, "RLIMIT_NOFILE");
  EXPECT_EQ(p.rlimits[0].hard, 1048576u);
  EXPECT_EQ(p.rlimits[0].soft, 1048576u);
  EXPECT_TRUE(p.no_new_privileges);
  EXPECT_EQ(p.oom_score_adj, 968);
  EXPECT_EQ(p.apparmor_profile, "cri-containerd.apparmor.d");
  EXPECT_FALSE(p.selinux_label.has_value());

  EXPECT_EQ(spec.root().path, "rootfs");
  EXPECT_FALSE(spec.root().readonly);
  EXPECT_FALSE(spec.hostname().has_value());

  const std::vector<Mount>& mounts = spec.mounts();
  ASSERT_EQ(mounts.size(), 12u);
  EXPECT_EQ(mounts[0].destination, "/proc");
  EXPECT_EQ(mounts[0].type, "proc");
  EXPECT_EQ(mounts[0].source, "proc");
  EXPECT_EQ(mounts[0].options, (std::vector<std::string>{"nosuid", "noexec", "nodev"}));
  EXPECT_EQ(mounts[1].destination, "/dev");
  EXPECT_EQ(mounts[1].type, "tmpfs");
  EXPECT_EQ(mounts[1].options.back(), "size=65536k");
  EXPECT_EQ(mounts[4].destination, "/sys");
  EXPECT_EQ(mounts[4].type, "sysfs");
  EXPECT_EQ(mounts[4].options.back(), "ro");
  EXPECT_EQ(mounts[10].destination, "/dev/shm");
  EXPECT_EQ(mounts[10].type, "bind");
  EXPECT_EQ(mounts[10].source,
            "/run/containerd/io.containerd.grpc.v1.cri/sandboxes/" + kSandboxId + "/shm");
  EXPECT_EQ(mounts[11].options, (std::vector<std::string>{"rbind", "rprivate", "ro"}));

  EXPECT_EQ(spec.annotations().size(), 7u);
  EXPECT_EQ(spec.Annotation("io.kubernetes.cri.container-name"), "web");
  EXPECT_EQ(spec.Annotation("io.kubernetes.cri.image-name"), "docker.io/library/nginx:1.25.3");
  EXPECT_EQ(spec.Annotation("no.such.annotation"), std::nullopt);
  EXPECT_EQ(spec.ContainerType(), CriContainerType::kContainer);
  EXPECT_EQ(spec.SandboxId(), kSandboxId);

  ASSERT_TRUE(spec.linux_config().has_value());
  const LinuxConfig& l = *spec.linux_config();
  ASSERT_EQ(l.namespaces.size(), 5u);
  EXPECT_EQ(l.namespaces[0].type, NamespaceType::kPid);
  EXPECT_EQ(l.namespaces[0].path, "");
  EXPECT_EQ(l.namespaces[1].type, NamespaceType::kIpc);
  EXPECT_EQ(l.namespaces[1].path, "/proc/4242/ns/ipc");
  EXPECT_EQ(l.namespaces[2].type, NamespaceType::kUts);
  EXPECT_EQ(l.namespaces[3].type, NamespaceType::kMount);
  EXPECT_EQ(l.namespaces[4].type, NamespaceType::kNetwork);
  EXPECT_EQ(spec.NamespacePath(NamespaceType::kNetwork), "/proc/4242/ns/net");
  EXPECT_EQ(spec.NamespacePath(NamespaceType::kPid), std::nullopt);   // new, no path
  EXPECT_EQ(spec.NamespacePath(NamespaceType::kUser), std::nullopt);  // not listed
  EXPECT_EQ(l.FindNamespace(NamespaceType::kUser), nullptr);
  EXPECT_EQ(l.cgroups_path,
            "kubepods-burstable-pod0b6e7f1e_4c4e_4f0e_9a57_3f0f6f8f2a11.slice:cri-containerd:"
            "9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b");
  ASSERT_TRUE(l.resources.has_value());
  ASSERT_TRUE(l.resources->memory.has_value());
  EXPECT_EQ(l.resources->memory->limit, 134217728);
  EXPECT_EQ(l.resources->memory->swap, 134217728);
  EXPECT_FALSE(l.resources->memory->reservation.has_value());
  ASSERT_TRUE(l.resources->cpu.has_value());
  EXPECT_EQ(l.resources->cpu->shares, 512u);
  EXPECT_EQ(l.resources->cpu->quota, 50000);
  EXPECT_EQ(l.resources->cpu->period, 100000u);
  EXPECT_EQ(l.resources->cpu->cpus, "0-1");
  EXPECT_EQ(l.resources->cpu->mems, "");
  ASSERT_TRUE(l.resources->pids.has_value());
  EXPECT_EQ(l.resources->pids->limit, 4096);
  EXPECT_EQ(l.resources->unified.at("memory.oom.group"), "1");
  EXPECT_TRUE(l.uid_mappings.empty());
  EXPECT_TRUE(l.gid_mappings.empty());
  EXPECT_TRUE(l.sysctl.empty());
  EXPECT_EQ(l.masked_paths.size(), 9u);
  EXPECT_EQ(l.masked_paths[0], "/proc/acpi");
  EXPECT_EQ(l.readonly_paths.back(), "/proc/sysrq-trigger");
}

TEST(OciSpec, CriSandboxReadsBack) {
  Result<Spec> r = Spec::Load(TestdataPath("cri_sandbox.json"));
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_EQ(r->oci_version(), "1.0.2-dev");
  EXPECT_EQ(r->ContainerType(), CriContainerType::kSandbox);
  EXPECT_EQ(r->SandboxId(), kSandboxId);
  EXPECT_EQ(r->NamespacePath(NamespaceType::kNetwork),
            "/var/run/netns/cni-7e2f1c3a-5b4d-6e8f-9a0b-1c2d3e4f5a6b");
  EXPECT_EQ(r->hostname(), "web-7d9c5b6f4-x2x8k");
  EXPECT_TRUE(r->root().readonly);
  EXPECT_EQ(r->process()->user.uid, 65535u);
  EXPECT_TRUE(r->process()->user.additional_gids.empty());
  EXPECT_EQ(r->process()->oom_score_adj, -998);
  EXPECT_EQ(r->process()->args, (std::vector<std::string>{"/pause"}));
  const LinuxConfig& l = *r->linux_config();
  EXPECT_EQ(l.sysctl.size(), 2u);
  EXPECT_EQ(l.sysctl.at("net.ipv4.ping_group_range"), "0 2147483647");
  EXPECT_EQ(l.resources->cpu->shares, 2u);
  EXPECT_FALSE(l.resources->cpu->quota.has_value());
  EXPECT_FALSE(l.resources->memory.has_value());
  EXPECT_EQ(l.cgroups_path,
            "/kubepods/burstable/pod0b6e7f1e-4c4e-4f0e-9a57-3f0f6f8f2a11/" + kSandboxId);
}

TEST(OciSpec, MinimalSpecIsPlainContainerd) {
  Result<Spec> r = Spec::Parse(kMinimal);
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_FALSE(r->process().has_value());
  EXPECT_FALSE(r->linux_config().has_value());
  EXPECT_TRUE(r->mounts().empty());
  EXPECT_TRUE(r->annotations().empty());
  EXPECT_EQ(r->ContainerType(), CriContainerType::kNone);
  EXPECT_EQ(r->SandboxId(), std::nullopt);
  EXPECT_EQ(r->NamespacePath(NamespaceType::kNetwork), std::nullopt);
}

// Go's encoding/json treats null as absent; so do we for optional fields.
TEST(OciSpec, NullOptionalFieldsAreAbsent) {
  Result<Spec> r = Spec::Parse(R"({
    "ociVersion": "1.1.0", "root": {"path": "rootfs", "readonly": null},
    "process": {"user": {"uid": 0, "gid": 0, "additionalGids": null}, "args": ["sh"],
                "cwd": "/", "env": null, "capabilities": null},
    "mounts": null, "annotations": null, "hostname": null,
    "linux": {"namespaces": null, "resources": null, "cgroupsPath": null}})");
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_TRUE(r->process()->env.empty());
  EXPECT_FALSE(r->process()->capabilities.has_value());
  EXPECT_TRUE(r->mounts().empty());
  EXPECT_FALSE(r->hostname().has_value());
  EXPECT_FALSE(r->linux_config()->resources.has_value());
}

TEST(OciSpec, IdMappingsAndUmaskAndConsoleSize) {
  Result<Spec> r = Spec::Parse(R"({
    "ociVersion": "1.1.0", "root": {"path": "rootfs"},
    "process": {"terminal": true, "consoleSize": {"height": 24, "width": 80},
                "user": {"uid": 4294967295, "gid": 0, "umask": 18}, "args": ["sh"], "cwd": "/"},
    "linux": {"uidMappings": [{"containerID": 0, "hostID": 100000, "size": 65536}],
              "gidMappings": [{"containerID": 0, "hostID": 200000, "size": 1}],
              "namespaces": [{"type": "user"}, {"type": "cgroup"}, {"type": "time"}],
              "resources": {"memory": {"limit": -1, "reservation": 1024, "swap": -1,
                                       "swappiness": 60, "disableOOMKiller": false},
                            "cpu": {"quota": -1, "realtimeRuntime": 0, "idle": 1}}}})");
  ASSERT_TRUE(r.ok()) << r.error().message();
  const Process& p = *r->process();
  EXPECT_TRUE(p.terminal);
  EXPECT_EQ(p.console_size->height, 24u);
  EXPECT_EQ(p.console_size->width, 80u);
  EXPECT_EQ(p.user.uid, 4294967295u);
  EXPECT_EQ(p.user.umask, 18u);
  const LinuxConfig& l = *r->linux_config();
  ASSERT_EQ(l.uid_mappings.size(), 1u);
  EXPECT_EQ(l.uid_mappings[0].host_id, 100000u);
  EXPECT_EQ(l.uid_mappings[0].size, 65536u);
  EXPECT_EQ(l.gid_mappings[0].host_id, 200000u);
  EXPECT_EQ(l.namespaces[2].type, NamespaceType::kTime);
  EXPECT_EQ(l.resources->memory->limit, -1);
  EXPECT_EQ(l.resources->memory->reservation, 1024);
  EXPECT_EQ(l.resources->memory->swappiness, 60u);
  EXPECT_EQ(l.resources->memory->disable_oom_killer, false);
  EXPECT_EQ(l.resources->cpu->quota, -1);
  EXPECT_EQ(l.resources->cpu->idle, 1);
}

TEST(OciSpec, RoundTripKeepsUnknownFieldsAndKeyOrder) {
  for (const char* name : {"cri_container.json", "cri_sandbox.json"}) {
    SCOPED_TRACE(name);
    std::string text = ReadText(TestdataPath(name));
    Result<Spec> r = Spec::Parse(text);
    ASSERT_TRUE(r.ok()) << r.error().message();
    Json original = Json::parse(text);
    EXPECT_EQ(Json::parse(r->Dump()), original);
    EXPECT_EQ(r->Dump(), original.dump());  // same bytes: key order kept
    EXPECT_EQ(r->Dump(2), original.dump(2));
  }
  constexpr std::string_view kUnknowns = R"({
    "zeta": 1, "ociVersion": "1.1.0", "alpha": {"b": [1, {"c": null}], "a": 1.25},
    "root": {"path": "rootfs", "vendorFlag": true},
    "process": {"user": {"uid": 0, "gid": 0, "username": "x"}, "args": ["sh"], "cwd": "/",
                "ioPriority": {"class": "IOPRIO_CLASS_IDLE", "priority": 4}},
    "mounts": [{"destination": "/m", "uidMappings": [{"containerID": 0, "hostID": 1, "size": 1}]}],
    "hooks": {"createRuntime": [{"path": "/bin/true", "args": ["true"]}]},
    "linux": {"devices": [{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229}],
              "intelRdt": {"closID": "x"}, "personality": {"domain": "LINUX"}},
    "domainname": "example.org", "big": 18446744073709551615, "neg": -9223372036854775808
  })";
  Result<Spec> r = Spec::Parse(kUnknowns);
  ASSERT_TRUE(r.ok()) << r.error().message();
  EXPECT_EQ(r->Dump(), Json::parse(kUnknowns).dump());
  Json back = Json::parse(r->Dump());
  EXPECT_EQ(back.begin().key(), "zeta");
  EXPECT_EQ(back["process"]["ioPriority"]["priority"], 4);
  EXPECT_EQ(back["mounts"][0]["uidMappings"][0]["hostID"], 1);
  EXPECT_EQ(back["linux"]["devices"][0]["minor"], 229);
  EXPECT_EQ(back["big"].get<uint64_t>(), 18446744073709551615u);
}

TEST(OciSpec, MutationsKeepUnknownFields) {
  Result<Spec> r = Spec::Load(TestdataPath("cri_sandbox.json"));
  ASSERT_TRUE(r.ok()) << r.error().message();
  ASSERT_TRUE(r->SetRootPath("/run/peapod/containers/c1/rootfs").ok());
  ASSERT_TRUE(r->SetNamespace(NamespaceType::kNetwork).ok());
  ASSERT_TRUE(r->SetCgroupsPath("/peapod/c1").ok());
  Json expected = ReadJson("cri_sandbox.json");
  expected["root"]["path"] = "/run/peapod/containers/c1/rootfs";
  expected["linux"]["namespaces"][4].erase("path");
  expected["linux"]["cgroupsPath"] = "/peapod/c1";
  EXPECT_EQ(r->Dump(), expected.dump());
  EXPECT_EQ(r->doc()["x-peapod-test-unknown"]["kept"][4], "\u00e9t\u00e9");
}

struct BadCase {
  const char* name;
  std::function<void(Json&)> mutate;
  const char* message;  // the whole error message
};

class OciSpecBad : public testing::TestWithParam<BadCase> {};

TEST_P(OciSpecBad, NamesThePath) {
  const BadCase& c = GetParam();
  Result<Spec> r = Spec::Parse(Mutated(c.mutate));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Code::kInvalidArgument);
  EXPECT_EQ(r.error().message(), c.message);
}

const BadCase kBadCases[] = {
    {"NotAnObject",
     [](Json& d) {
       d = Json::array({1, 2});
     },
     "config.json: expected object, got array"},
    {"MissingOciVersion", [](Json& d) { d.erase("ociVersion"); },
     "config.json: ociVersion: missing (required)"},
    {"OciVersionNumber", [](Json& d) { d["ociVersion"] = 1; },
     "config.json: ociVersion: expected string, got number"},
    {"MissingRoot", [](Json& d) { d.erase("root"); }, "config.json: root: missing (required)"},
    {"MissingRootPath", [](Json& d) { d["root"].erase("path"); },
     "config.json: root.path: missing (required)"},
    {"EmptyRootPath", [](Json& d) { d["root"]["path"] = ""; },
     "config.json: root.path: expected non-empty string, got \"\""},
    {"RootReadonlyString", [](Json& d) { d["root"]["readonly"] = "yes"; },
     "config.json: root.readonly: expected boolean, got string"},
    {"ProcessNotObject", [](Json& d) { d["process"] = "sh"; },
     "config.json: process: expected object, got string"},
    {"ArgsNotArray", [](Json& d) { d["process"]["args"] = "nginx -g 'daemon off;'"; },
     "config.json: process.args: expected array, got string"},
    {"ArgsElementNotString", [](Json& d) { d["process"]["args"][2] = 3; },
     "config.json: process.args[2]: expected string, got number"},
    {"ArgsEmpty", [](Json& d) { d["process"]["args"] = Json::array(); },
     "config.json: process.args: expected non-empty array, got empty array"},
    {"ArgsMissing", [](Json& d) { d["process"].erase("args"); },
     "config.json: process.args: missing (required)"},
    {"ArgsNull", [](Json& d) { d["process"]["args"] = nullptr; },
     "config.json: process.args: expected array, got null"},
    {"CwdRelative", [](Json& d) { d["process"]["cwd"] = "tmp"; },
     "config.json: process.cwd: expected absolute path, got \"tmp\""},
    {"CwdMissing", [](Json& d) { d["process"].erase("cwd"); },
     "config.json: process.cwd: missing (required)"},
    {"CwdWithNul", [](Json& d) { d["process"]["cwd"] = std::string("/a\0b", 4); },
     "config.json: process.cwd: expected string without NUL bytes"},
    {"UserMissing", [](Json& d) { d["process"].erase("user"); },
     "config.json: process.user: missing (required)"},
    {"UidNegative", [](Json& d) { d["process"]["user"]["uid"] = -1; },
     "config.json: process.user.uid: expected integer in [0, 4294967295], got -1"},
    {"UidTooBig", [](Json& d) { d["process"]["user"]["uid"] = 4294967296u; },
     "config.json: process.user.uid: expected integer in [0, 4294967295], got 4294967296"},
    {"GidFloat", [](Json& d) { d["process"]["user"]["gid"] = 1.5; },
     "config.json: process.user.gid: expected integer, got 1.5"},
    {"AdditionalGidString", [](Json& d) { d["process"]["user"]["additionalGids"][1] = "wheel"; },
     "config.json: process.user.additionalGids[1]: expected integer, got string"},
    {"EnvWithoutEquals", [](Json& d) { d["process"]["env"][1] = "FOO"; },
     "config.json: process.env[1]: expected \"KEY=VALUE\", got \"FOO\""},
    {"EnvEmptyKey", [](Json& d) { d["process"]["env"][0] = "=x"; },
     "config.json: process.env[0]: expected \"KEY=VALUE\", got \"=x\""},
    {"TerminalString", [](Json& d) { d["process"]["terminal"] = "true"; },
     "config.json: process.terminal: expected boolean, got string"},
    {"OomScoreAdjOutOfRange", [](Json& d) { d["process"]["oomScoreAdj"] = 1001; },
     "config.json: process.oomScoreAdj: expected integer in [-1000, 1000], got 1001"},
    {"RlimitMissingHard", [](Json& d) { d["process"]["rlimits"][0].erase("hard"); },
     "config.json: process.rlimits[0].hard: missing (required)"},
    {"CapabilityNotString", [](Json& d) { d["process"]["capabilities"]["bounding"][0] = 0; },
     "config.json: process.capabilities.bounding[0]: expected string, got number"},
    {"UnknownNamespaceType", [](Json& d) { d["linux"]["namespaces"][1]["type"] = "net"; },
     "config.json: linux.namespaces[1].type: expected one of pid, network, mount, ipc, uts, user, "
     "cgroup, time, got \"net\""},
    {"DuplicateNamespace",
     [](Json& d) {
       d["linux"]["namespaces"].push_back(Json{{"type", "pid"}});
     },
     "config.json: linux.namespaces[5].type: namespace pid already listed at "
     "linux.namespaces[0]"},
    {"NamespaceRelativePath", [](Json& d) { d["linux"]["namespaces"][4]["path"] = "ns/net"; },
     "config.json: linux.namespaces[4].path: expected absolute path, got \"ns/net\""},
    {"MountWithoutDestination", [](Json& d) { d["mounts"][2].erase("destination"); },
     "config.json: mounts[2].destination: missing (required)"},
    {"MountRelativeDestination", [](Json& d) { d["mounts"][0]["destination"] = "proc"; },
     "config.json: mounts[0].destination: expected absolute path, got \"proc\""},
    {"MountOptionsNotArray", [](Json& d) { d["mounts"][3]["options"] = "nosuid,nodev"; },
     "config.json: mounts[3].options: expected array, got string"},
    {"MountsNotArray", [](Json& d) { d["mounts"] = Json::object(); },
     "config.json: mounts: expected array, got object"},
    {"MemoryLimitString", [](Json& d) { d["linux"]["resources"]["memory"]["limit"] = "128Mi"; },
     "config.json: linux.resources.memory.limit: expected integer, got string"},
    {"MemoryLimitTooBig",
     [](Json& d) { d["linux"]["resources"]["memory"]["limit"] = 9223372036854775808u; },
     "config.json: linux.resources.memory.limit: expected integer in [-9223372036854775808, "
     "9223372036854775807], got 9223372036854775808"},
    {"CpuSharesNegative", [](Json& d) { d["linux"]["resources"]["cpu"]["shares"] = -2; },
     "config.json: linux.resources.cpu.shares: expected integer in [0, 18446744073709551615], "
     "got -2"},
    {"PidsWithoutLimit", [](Json& d) { d["linux"]["resources"]["pids"] = Json::object(); },
     "config.json: linux.resources.pids.limit: missing (required)"},
    {"UnifiedValueNumber",
     [](Json& d) { d["linux"]["resources"]["unified"]["memory.oom.group"] = 1; },
     "config.json: linux.resources.unified[\"memory.oom.group\"]: expected string, got number"},
    {"UidMappingWithoutSize",
     [](Json& d) { d["linux"]["uidMappings"] = Json::parse(R"([{"containerID":0,"hostID":1}])"); },
     "config.json: linux.uidMappings[0].size: missing (required)"},
    {"SysctlValueNumber", [](Json& d) { d["linux"]["sysctl"]["net.core.somaxconn"] = 1024; },
     "config.json: linux.sysctl[\"net.core.somaxconn\"]: expected string, got number"},
    {"LinuxNotObject", [](Json& d) { d["linux"] = Json::array(); },
     "config.json: linux: expected object, got array"},
    {"AnnotationValueNotString",
     [](Json& d) { d["annotations"]["io.kubernetes.cri.image-name"] = 42; },
     "config.json: annotations[\"io.kubernetes.cri.image-name\"]: expected string, got number"},
    {"AnnotationsNotObject", [](Json& d) { d["annotations"] = Json::array({"a=b"}); },
     "config.json: annotations: expected object, got array"},
    {"UnknownCriContainerType",
     [](Json& d) { d["annotations"]["io.kubernetes.cri.container-type"] = "podsandbox"; },
     "config.json: annotations[\"io.kubernetes.cri.container-type\"]: expected \"sandbox\" or "
     "\"container\", got \"podsandbox\""},
    {"CriContainerWithoutSandboxId",
     [](Json& d) { d["annotations"].erase("io.kubernetes.cri.sandbox-id"); },
     "config.json: annotations[\"io.kubernetes.cri.sandbox-id\"]: missing (required when "
     "io.kubernetes.cri.container-type is \"container\")"},
    {"SandboxIdTraversal",
     [](Json& d) { d["annotations"]["io.kubernetes.cri.sandbox-id"] = "../../etc"; },
     "config.json: annotations[\"io.kubernetes.cri.sandbox-id\"]: expected a containerd "
     "identifier (letters and digits joined by single '.', '_' or '-', at most 76 characters), "
     "got \"../../etc\""},
};

INSTANTIATE_TEST_SUITE_P(Malformed, OciSpecBad, testing::ValuesIn(kBadCases),
                         [](const testing::TestParamInfo<BadCase>& info) {
                           return std::string(info.param.name);
                         });

TEST(OciSpec, InvalidJsonNamesLineAndColumn) {
  Result<Spec> r =
      Spec::Parse("{\n  \"ociVersion\": \"1.1.0\",\n  \"root\": {\"path\": rootfs}\n}");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Code::kInvalidArgument);
  EXPECT_EQ(r.error().message(),
            "config.json: line 3, column 20: syntax error while parsing value - invalid literal; "
            "last read: '\"path\": r'");
}

TEST(OciSpec, OtherSyntaxErrors) {
  struct {
    std::string text;
    std::string prefix;
  } cases[] = {
      {"", "config.json: line 1, column 1: syntax error"},
      {"{\"ociVersion\": \"1\"} trailing", "config.json: line 1, column 23: syntax error"},
      {"{\"ociVersion\": \"1\",\n}", "config.json: line 2, column 1: syntax error"},
      {"{\"a\": \"\xff\xfe\"}", "config.json: line 1, column 8: syntax error"},
      {std::string("{\"a\": \"\0\"}", 10), "config.json: line 1, column 8: syntax error"},
  };
  for (const auto& c : cases) {
    SCOPED_TRACE(c.text);
    Result<Spec> r = Spec::Parse(c.text);
    ASSERT_FALSE(r.ok());
    EXPECT_EQ(r.error().code(), Code::kInvalidArgument);
    EXPECT_EQ(r.error().message().substr(0, c.prefix.size()), c.prefix) << r.error().message();
    // The message may reach a gRPC status: no raw input bytes in it.
    EXPECT_TRUE(AllPrintableAscii(r.error().message())) << r.error().message();
  }
}

TEST(OciSpec, RejectsDeepNestingAndHugeInput) {
  auto nested = [](int depth) {
    std::string inner = std::string(depth, '[') + std::string(depth, ']');
    return fmt::format(R"({{"ociVersion": "1", "root": {{"path": "r"}}, "x": {}}})", inner);
  };
  EXPECT_TRUE(Spec::Parse(nested(kMaxNestingDepth - 1)).ok());
  Result<Spec> deep = Spec::Parse(nested(kMaxNestingDepth));
  ASSERT_FALSE(deep.ok());
  EXPECT_EQ(deep.error().message(), "config.json: nested deeper than 64 levels");
  // Far deeper than any stack could recurse through.
  Result<Spec> deeper = Spec::Parse(nested(100000));
  ASSERT_FALSE(deeper.ok());
  EXPECT_EQ(deeper.error().code(), Code::kInvalidArgument);

  std::string huge = std::string(kMinimal);
  huge.append(kMaxSpecBytes, ' ');
  Result<Spec> big = Spec::Parse(huge);
  ASSERT_FALSE(big.ok());
  EXPECT_EQ(big.error().code(), Code::kInvalidArgument);
}

TEST(OciSpec, LoadErrorsNameThePath) {
  std::string dir = testing::TempDir();
  std::string missing = dir + "/peapod-oci-no-such-config.json";
  Result<Spec> r = Spec::Load(missing);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().code(), Code::kNotFound);
  EXPECT_NE(r.error().message().find(missing), std::string::npos) << r.error().message();

  Result<Spec> d = Spec::Load(dir);
  ASSERT_FALSE(d.ok());
  EXPECT_EQ(d.error().code(), Code::kInvalidArgument);
  EXPECT_NE(d.error().message().find("not a regular file"), std::string::npos);

  std::string bad = dir + "/peapod-oci-bad-config.json";
  {
    std::ofstream out(bad, std::ios::binary | std::ios::trunc);
    out << Mutated([](Json& doc) { doc["process"]["args"][2] = 3; });
  }
  Result<Spec> b = Spec::Load(bad);
  ASSERT_FALSE(b.ok());
  EXPECT_EQ(b.error().code(), Code::kInvalidArgument);
  EXPECT_EQ(b.error().message(), bad + ": process.args[2]: expected string, got number");
  std::remove(bad.c_str());
}

TEST(OciSpec, SetRootPath) {
  Result<Spec> r = Spec::Parse(ReadText(TestdataPath("cri_container.json")));
  ASSERT_TRUE(r.ok());
  ASSERT_TRUE(r->SetRootPath("/run/peapod/c/rootfs").ok());
  EXPECT_EQ(r->root().path, "/run/peapod/c/rootfs");
  EXPECT_EQ(r->doc()["root"]["path"], "/run/peapod/c/rootfs");

  Result<void> empty = r->SetRootPath("");
  ASSERT_FALSE(empty.ok());
  EXPECT_EQ(empty.error().code(), Code::kInvalidArgument);
  EXPECT_EQ(empty.error().message(), "config.json: root.path: expected non-empty string, got \"\"");
  EXPECT_EQ(r->root().path, "/run/peapod/c/rootfs");  // unchanged on error

  Result<void> not_utf8 = r->SetRootPath("/run/\xff");
  ASSERT_FALSE(not_utf8.ok());
  EXPECT_EQ(not_utf8.error().message(), "config.json: root.path: expected UTF-8 string");
}

TEST(OciSpec, SetNamespaceReplacesOrAdds) {
  Result<Spec> r = Spec::Parse(ReadText(TestdataPath("cri_container.json")));
  ASSERT_TRUE(r.ok());
  // Replace: same position, new path.
  ASSERT_TRUE(r->SetNamespace(NamespaceType::kNetwork, "/proc/1/ns/net").ok());
  EXPECT_EQ(r->NamespacePath(NamespaceType::kNetwork), "/proc/1/ns/net");
  EXPECT_EQ(r->linux_config()->namespaces.size(), 5u);
  EXPECT_EQ(r->doc()["linux"]["namespaces"][4]["path"], "/proc/1/ns/net");
  // Add a new one with a path, and one to create.
  ASSERT_TRUE(r->SetNamespace(NamespaceType::kCgroup, "/proc/1/ns/cgroup").ok());
  ASSERT_TRUE(r->SetNamespace(NamespaceType::kTime).ok());
  ASSERT_EQ(r->linux_config()->namespaces.size(), 7u);
  EXPECT_EQ(r->linux_config()->namespaces[5].type, NamespaceType::kCgroup);
  EXPECT_EQ(r->NamespacePath(NamespaceType::kCgroup), "/proc/1/ns/cgroup");
  EXPECT_EQ(r->doc()["linux"]["namespaces"][6], Json::parse(R"({"type": "time"})"));
  // Empty path turns "join" into "create new".
  ASSERT_TRUE(r->SetNamespace(NamespaceType::kIpc).ok());
  EXPECT_EQ(r->NamespacePath(NamespaceType::kIpc), std::nullopt);
  EXPECT_FALSE(r->doc()["linux"]["namespaces"][1].contains("path"));

  Result<void> rel = r->SetNamespace(NamespaceType::kUts, "proc/1/ns/uts");
  ASSERT_FALSE(rel.ok());
  EXPECT_EQ(rel.error().message(),
            "config.json: linux.namespaces[2].path: expected absolute path, got "
            "\"proc/1/ns/uts\"");
  EXPECT_EQ(r->NamespacePath(NamespaceType::kUts), "/proc/4242/ns/uts");
}

TEST(OciSpec, SetNamespaceAndCgroupsPathCreateLinux) {
  Result<Spec> r = Spec::Parse(kMinimal);
  ASSERT_TRUE(r.ok());
  ASSERT_TRUE(r->SetNamespace(NamespaceType::kNetwork, "/var/run/netns/x").ok());
  ASSERT_TRUE(r->SetCgroupsPath("/peapod/pod1/c1").ok());
  ASSERT_TRUE(r->linux_config().has_value());
  EXPECT_EQ(r->linux_config()->cgroups_path, "/peapod/pod1/c1");
  EXPECT_EQ(r->NamespacePath(NamespaceType::kNetwork), "/var/run/netns/x");
  EXPECT_EQ(r->Dump(), R"({"ociVersion":"1.1.0","root":{"path":"/r"},"linux":{"namespaces":)"
                       R"([{"type":"network","path":"/var/run/netns/x"}],)"
                       R"("cgroupsPath":"/peapod/pod1/c1"}})");
}

TEST(OciSpec, RemoveNamespace) {
  Result<Spec> r = Spec::Load(TestdataPath("cri_container.json"));
  ASSERT_TRUE(r.ok());
  ASSERT_TRUE(r->RemoveNamespace(NamespaceType::kNetwork).ok());
  EXPECT_EQ(r->linux_config()->FindNamespace(NamespaceType::kNetwork), nullptr);
  EXPECT_EQ(r->linux_config()->namespaces.size(), 4u);
  EXPECT_EQ(r->doc()["linux"]["namespaces"].size(), 4u);
  ASSERT_TRUE(r->RemoveNamespace(NamespaceType::kNetwork).ok());  // absent: no-op
  Result<Spec> minimal = Spec::Parse(kMinimal);
  ASSERT_TRUE(minimal->RemoveNamespace(NamespaceType::kPid).ok());
  EXPECT_EQ(minimal->Dump(), Json::parse(kMinimal).dump());
}

TEST(OciSpec, EditRevalidatesAndIsAllOrNothing) {
  Result<Spec> r = Spec::Load(TestdataPath("cri_container.json"));
  ASSERT_TRUE(r.ok());
  ASSERT_TRUE(r->Edit([](Json& doc) {
                 doc["mounts"][6]["source"] = "/run/peapod/shared/etc-hosts";
                 doc["process"].erase("apparmorProfile");
               }).ok());
  EXPECT_EQ(r->mounts()[6].source, "/run/peapod/shared/etc-hosts");
  EXPECT_FALSE(r->process()->apparmor_profile.has_value());

  std::string before = r->Dump();
  Result<void> bad = r->Edit([](Json& doc) {
    doc["hostname"] = "changed";
    doc["process"]["args"] = Json::array();
  });
  ASSERT_FALSE(bad.ok());
  // Errors after Load keep naming the file.
  EXPECT_EQ(bad.error().message(), TestdataPath("cri_container.json") +
                                       ": process.args: expected non-empty array, got empty array");
  EXPECT_EQ(r->Dump(), before);
  EXPECT_FALSE(r->hostname().has_value());

  // An nlohmann exception inside the edit is caught at the library boundary.
  Result<void> threw = r->Edit([](Json& doc) { doc.at("no-such-key") = 1; });
  ASSERT_FALSE(threw.ok());
  EXPECT_EQ(threw.error().code(), Code::kInternal);
  EXPECT_EQ(r->Dump(), before);
}

TEST(OciSpec, FromJsonValidates) {
  Result<Spec> r = Spec::FromJson(Json::parse(R"({"ociVersion": "1", "root": {}})"), "bundle");
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().message(), "bundle: root.path: missing (required)");
}

TEST(OciSpec, ParseProcessForExec) {
  Result<Process> p = ParseProcess(R"({"terminal": true, "user": {"uid": 0, "gid": 0},
      "args": ["sh", "-c", "echo hi"], "env": ["A=1"], "cwd": "/work", "unknown": [1]})");
  ASSERT_TRUE(p.ok()) << p.error().message();
  EXPECT_TRUE(p->terminal);
  EXPECT_EQ(p->args.size(), 3u);
  EXPECT_EQ(p->cwd, "/work");
  EXPECT_EQ(p->Env("A"), "1");

  Result<Process> bad = ParseProcess(R"({"user": {"uid": 0, "gid": 0}, "args": ["sh"]})");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.error().code(), Code::kInvalidArgument);
  EXPECT_EQ(bad.error().message(), "process: cwd: missing (required)");

  Result<Process> not_obj = ParseProcess("[]", "exec e1");
  ASSERT_FALSE(not_obj.ok());
  EXPECT_EQ(not_obj.error().message(), "exec e1: expected object, got array");

  Result<Process> syntax = ParseProcess("{", "exec e1");
  ASSERT_FALSE(syntax.ok());
  EXPECT_EQ(syntax.error().message().rfind("exec e1: line 1, column 2: ", 0), 0u)
      << syntax.error().message();
}

TEST(OciSpec, NamespaceTypeNames) {
  for (NamespaceType t :
       {NamespaceType::kPid, NamespaceType::kNetwork, NamespaceType::kMount, NamespaceType::kIpc,
        NamespaceType::kUts, NamespaceType::kUser, NamespaceType::kCgroup, NamespaceType::kTime}) {
    EXPECT_EQ(ParseNamespaceType(NamespaceTypeName(t)), t);
  }
  EXPECT_EQ(NamespaceTypeName(NamespaceType::kNetwork), "network");
  EXPECT_EQ(ParseNamespaceType("net"), std::nullopt);
}

}  // namespace
}  // namespace peapod::oci
