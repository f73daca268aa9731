#include "common/oci/spec.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <limits>
#include <utility>

namespace peapod::oci {
namespace {

constexpr size_t kMaxShownChars = 80;
constexpr size_t kMaxIdentifierLength = 76;  // containerd's identifiers.Validate

constexpr std::array<std::pair<NamespaceType, std::string_view>, 8> kNamespaceNames = {{
    {NamespaceType::kPid, "pid"},
    {NamespaceType::kNetwork, "network"},
    {NamespaceType::kMount, "mount"},
    {NamespaceType::kIpc, "ipc"},
    {NamespaceType::kUts, "uts"},
    {NamespaceType::kUser, "user"},
    {NamespaceType::kCgroup, "cgroup"},
    {NamespaceType::kTime, "time"},
}};

// Error text may end up in a gRPC status, which must be valid UTF-8 and should stay short: keep
// printable ASCII, escape the rest.
std::string Sanitize(std::string_view s, size_t max = 240) {
  std::string out;
  for (unsigned char c : s) {
    if (out.size() >= max) {
      out += "...";
      break;
    }
    if (c >= 0x20 && c < 0x7f) {
      out += static_cast<char>(c);
    } else {
      out += fmt::format("\\x{:02x}", c);
    }
  }
  return out;
}

// A value as JSON text, ASCII-only and bounded (the document is untrusted).
std::string Show(const Json& v) {
  std::string text = v.dump(-1, ' ', /*ensure_ascii=*/true, Json::error_handler_t::replace);
  if (text.size() > kMaxShownChars) {
    text.resize(kMaxShownChars);
    text += "...";
  }
  return text;
}

std::string Quote(std::string_view s) { return Show(Json(std::string(s))); }

std::string Field(std::string_view path, std::string_view key) {
  if (path.empty()) return std::string(key);
  return fmt::format("{}.{}", path, key);
}
std::string Index(std::string_view path, size_t i) { return fmt::format("{}[{}]", path, i); }
std::string Key(std::string_view path, std::string_view key) {
  return fmt::format("{}[{}]", path, Quote(key));
}

template <typename... Args>
Error Fail(std::string_view path, fmt::format_string<Args...> f, Args&&... args) {
  std::string what = fmt::format(f, std::forward<Args>(args)...);
  if (path.empty()) return Error(Code::kInvalidArgument, std::move(what));
  return Error(Code::kInvalidArgument, fmt::format("{}: {}", path, what));
}

Error Mismatch(std::string_view path, std::string_view expected, const Json& v) {
  return Fail(path, "expected {}, got {}", expected, v.type_name());
}

bool ValidUtf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    auto c = static_cast<unsigned char>(s[i]);
    size_t len;
    uint32_t cp;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xe0) == 0xc0) {
      len = 2;
      cp = c & 0x1f;
    } else if ((c & 0xf0) == 0xe0) {
      len = 3;
      cp = c & 0x0f;
    } else if ((c & 0xf8) == 0xf0) {
      len = 4;
      cp = c & 0x07;
    } else {
      return false;
    }
    if (i + len > s.size()) return false;
    for (size_t k = 1; k < len; ++k) {
      auto cc = static_cast<unsigned char>(s[i + k]);
      if ((cc & 0xc0) != 0x80) return false;
      cp = (cp << 6) | (cc & 0x3f);
    }
    // Overlong encodings, surrogates and values past U+10FFFF.
    if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) ||
        (cp >= 0xd800 && cp <= 0xdfff) || cp > 0x10ffff) {
      return false;
    }
    i += len;
  }
  return true;
}

// Null counts as absent, as Go's encoding/json (and so runc) treats it.
const Json* Get(const Json& obj, const char* key) {
  auto it = obj.find(key);
  if (it == obj.end() || it->is_null()) return nullptr;
  return &*it;
}

Result<void> ExpectObject(const Json& v, std::string_view path) {
  if (!v.is_object()) return Mismatch(path, "object", v);
  return Ok();
}

Result<void> ExpectArray(const Json& v, std::string_view path) {
  if (!v.is_array()) return Mismatch(path, "array", v);
  return Ok();
}

// Typed strings reach syscalls and crun: no NUL bytes, and valid UTF-8 so Dump never mangles them
// (the parser guarantees UTF-8, mutators do not).
Result<std::string> ReadString(const Json& v, const std::string& path) {
  if (!v.is_string()) return Mismatch(path, "string", v);
  const auto& s = v.get_ref<const std::string&>();
  if (s.find('\0') != std::string::npos) return Fail(path, "expected string without NUL bytes");
  if (!ValidUtf8(s)) return Fail(path, "expected UTF-8 string");
  return s;
}

Result<std::string> ReadNonEmpty(const Json& v, const std::string& path) {
  PP_ASSIGN_OR_RETURN(std::string s, ReadString(v, path));
  if (s.empty()) return Fail(path, "expected non-empty string, got \"\"");
  return s;
}

Result<std::string> ReadAbsPath(const Json& v, const std::string& path) {
  PP_ASSIGN_OR_RETURN(std::string s, ReadString(v, path));
  if (s.empty() || s[0] != '/') return Fail(path, "expected absolute path, got {}", Show(v));
  return s;
}

Result<bool> ReadBool(const Json& v, const std::string& path) {
  if (!v.is_boolean()) return Mismatch(path, "boolean", v);
  return v.get<bool>();
}

Result<int64_t> ReadInt(const Json& v, const std::string& path, int64_t min, int64_t max) {
  if (v.is_number_unsigned()) {
    uint64_t u = v.get<uint64_t>();
    if (u <= static_cast<uint64_t>(max)) return static_cast<int64_t>(u);
  } else if (v.is_number_integer()) {
    int64_t i = v.get<int64_t>();
    if (i >= min && i <= max) return i;
  } else if (v.is_number_float()) {
    return Fail(path, "expected integer, got {}", Show(v));
  } else {
    return Mismatch(path, "integer", v);
  }
  return Fail(path, "expected integer in [{}, {}], got {}", min, max, Show(v));
}

Result<uint64_t> ReadUint(const Json& v, const std::string& path, uint64_t max) {
  if (v.is_number_unsigned()) {
    uint64_t u = v.get<uint64_t>();
    if (u <= max) return u;
  } else if (v.is_number_integer()) {
    int64_t i = v.get<int64_t>();
    if (i >= 0 && static_cast<uint64_t>(i) <= max) return static_cast<uint64_t>(i);
  } else if (v.is_number_float()) {
    return Fail(path, "expected integer, got {}", Show(v));
  } else {
    return Mismatch(path, "integer", v);
  }
  return Fail(path, "expected integer in [0, {}], got {}", max, Show(v));
}

Result<uint32_t> ReadU32(const Json& v, const std::string& path) {
  PP_ASSIGN_OR_RETURN(uint64_t u, ReadUint(v, path, std::numeric_limits<uint32_t>::max()));
  return static_cast<uint32_t>(u);
}
Result<uint64_t> ReadU64(const Json& v, const std::string& path) {
  return ReadUint(v, path, std::numeric_limits<uint64_t>::max());
}
Result<int64_t> ReadI64(const Json& v, const std::string& path) {
  return ReadInt(v, path, std::numeric_limits<int64_t>::min(), std::numeric_limits<int64_t>::max());
}

template <typename T, typename Read>
Result<std::vector<T>> ReadArray(const Json& v, const std::string& path, Read read) {
  PP_TRY(ExpectArray(v, path));
  std::vector<T> out;
  out.reserve(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    PP_ASSIGN_OR_RETURN(T item, read(v[i], Index(path, i)));
    out.push_back(std::move(item));
  }
  return out;
}

Result<std::vector<std::string>> ReadStrings(const Json& v, const std::string& path) {
  return ReadArray<std::string>(v, path, ReadString);
}

Result<std::vector<uint32_t>> ReadU32s(const Json& v, const std::string& path) {
  return ReadArray<uint32_t>(v, path, ReadU32);
}

Result<StringMap> ReadStringMap(const Json& v, const std::string& path) {
  PP_TRY(ExpectObject(v, path));
  StringMap out;
  for (const auto& item : v.items()) {
    PP_ASSIGN_OR_RETURN(std::string value, ReadString(item.value(), Key(path, item.key())));
    out.insert_or_assign(item.key(), std::move(value));
  }
  return out;
}

// obj[key] into *out when present; absent or null leaves *out alone.
template <typename T, typename Read>
Result<void> ReadIfPresent(const Json& obj, const char* key, const std::string& path, Read read,
                           T* out) {
  const Json* v = Get(obj, key);
  if (v == nullptr) return Ok();
  PP_ASSIGN_OR_RETURN(*out, read(*v, Field(path, key)));
  return Ok();
}

template <typename T, typename Read>
Result<void> ReadOptional(const Json& obj, const char* key, const std::string& path, Read read,
                          std::optional<T>* out) {
  const Json* v = Get(obj, key);
  if (v == nullptr) return Ok();
  PP_ASSIGN_OR_RETURN(*out, read(*v, Field(path, key)));
  return Ok();
}

// A null required field reports "expected X, got null": it was written, just wrongly.
template <typename T, typename Read>
Result<void> ReadRequired(const Json& obj, const char* key, const std::string& path, Read read,
                          T* out) {
  auto it = obj.find(key);
  if (it == obj.end()) return Fail(Field(path, key), "missing (required)");
  PP_ASSIGN_OR_RETURN(*out, read(*it, Field(path, key)));
  return Ok();
}

Result<User> ReadUser(const Json& v, const std::string& path) {
  PP_TRY(ExpectObject(v, path));
  User u;
  PP_TRY(ReadRequired(v, "uid", path, ReadU32, &u.uid));
  PP_TRY(ReadRequired(v, "gid", path, ReadU32, &u.gid));
  PP_TRY(ReadOptional(v, "umask", path, ReadU32, &u.umask));
  PP_TRY(ReadIfPresent(v, "additionalGids", path, ReadU32s, &u.additional_gids));
  return u;
}

Result<ConsoleSize> ReadConsoleSize(const Json& v, const std::string& path) {
  PP_TRY(ExpectObject(v, path));
  ConsoleSize c;
  PP_TRY(ReadRequired(v, "height", path, ReadU32, &c.height));
  PP_TRY(ReadRequired(v, "width", path, ReadU32, &c.width));
  return c;
}

Result<Capabilities> ReadCapabilities(const Json& v, const std::string& path) {
  PP_TRY(ExpectObject(v, path));
  Capabilities c;
  PP_TRY(ReadIfPresent(v, "bounding", path, ReadStrings, &c.bounding));
  PP_TRY(ReadIfPresent(v, "effective", path, ReadStrings, &c.effective));
  PP_TRY(ReadIfPresent(v, "inheritable", path, ReadStrings, &c.inheritable));
  PP_TRY(ReadIfPresent(v, "permitted", path, ReadStrings, &c.permitted));
  PP_TRY(ReadIfPresent(v, "ambient", path, ReadStrings, &c.ambient));
  return c;
}

Result<Rlimit> ReadRlimit(const Json& v, const std::string& path) {
  PP_TRY(ExpectObject(v, path));
  Rlimit r;
  PP_TRY(ReadRequired(v, "type", path, ReadNonEmpty, &r.type));
  PP_TRY(ReadRequired(v, "hard", path, ReadU64, &r.hard));
  PP_TRY(ReadRequired(v, "soft", path, ReadU64, &r.soft));
  return r;
}

Result<std::vector<std::string>> ReadArgs(const Json& v, const std::string& path) {
  PP_ASSIGN_OR_RETURN(auto args, ReadStrings(v, path));
  if (args.empty()) return Fail(path, "expected non-empty array, got empty array");
  return args;
}

// runc refuses the same: an entry without '=' or with an empty name.
Result<std::vector<std::string>> ReadEnv(const Json& v, const std::string& path) {
  PP_ASSIGN_OR_RETURN(auto env, ReadStrings(v, path));
  for (size_t i = 0; i < env.size(); ++i) {
    size_t eq = env[i].find('=');
    if (eq == std::string::npos || eq == 0) {
      return Fail(Index(path, i), "expected \"KEY=VALUE\", got {}", Quote(env[i]));
    }
  }
  return env;
}

Result<int> ReadOomScoreAdj(const Json& v, const std::string& path) {
  PP_ASSIGN_OR_RETURN(int64_t i, ReadInt(v, path, -1000, 1000));  // the kernel's range
  return static_cast<int>(i);
}

Result<Process> ReadProcess(const Json& v, const std::string& path) {
  PP_TRY(ExpectObject(v, path));
  Process p;
  PP_TRY(ReadIfPresent(v, "terminal", path, ReadBool, &p.terminal));
  PP_TRY(ReadOptional(v, "consoleSize", path, ReadConsoleSize, &p.console_size));
  PP_TRY(ReadRequired(v, "user", path, ReadUser, &p.user));
  PP_TRY(ReadRequired(v, "args", path, ReadArgs, &p.args));
  PP_TRY(ReadIfPresent(v, "env", path, ReadEnv, &p.env));
  PP_TRY(ReadRequired(v, "cwd", path, ReadAbsPath, &p.cwd));
  PP_TRY(ReadOptional(v, "capabilities", path, ReadCapabilities, &p.capabilities));
  if (const Json* rl = Get(v, "rlimits")) {
    PP_ASSIGN_OR_RETURN(p.rlimits, ReadArray<Rlimit>(*rl, Field(path, "rlimits"), ReadRlimit));
  }
  PP_TRY(ReadIfPresent(v, "noNewPrivileges", path, ReadBool, &p.no_new_privileges));
  PP_TRY(ReadOptional(v, "oomScoreAdj", path, ReadOomScoreAdj, &p.oom_score_adj));
  PP_TRY(ReadOptional(v, "apparmorProfile", path, ReadString, &p.apparmor_profile));
  PP_TRY(ReadOptional(v, "selinuxLabel", path, ReadString, &p.selinux_label));
  return p;
}

Result<Root> ReadRoot(const Json& v, const std::string& path) {
  PP_TRY(ExpectObject(v, path));
  Root r;
  PP_TRY(ReadRequired(v, "path", path, ReadNonEmpty, &r.path));
  PP_TRY(ReadIfPresent(v, "readonly", path, ReadBool, &r.readonly));
  return r;
}

Result<Mount> ReadMount(const Json& v, const std::string& path) {
  PP_TRY(ExpectObject(v, path));
  Mount m;
  PP_TRY(ReadRequired(v, "destination", path, ReadAbsPath, &m.destination));
  PP_TRY(ReadIfPresent(v, "type", path, ReadString, &m.type));
  PP_TRY(ReadIfPresent(v, "source", path, ReadString, &m.source));
  PP_TRY(ReadIfPresent(v, "options", path, ReadStrings, &m.options));
  return m;
}

std::string KnownNamespaceTypes() {
  std::string out;
  for (const auto& [type, name] : kNamespaceNames) {
    if (!out.empty()) out += ", ";
    out += name;
  }
  return out;
}

Result<NamespaceType> ReadNamespaceType(const Json& v, const std::string& path) {
  PP_ASSIGN_OR_RETURN(std::string name, ReadString(v, path));
  std::optional<NamespaceType> type = ParseNamespaceType(name);
  if (!type) return Fail(path, "expected one of {}, got {}", KnownNamespaceTypes(), Show(v));
  return *type;
}

Result<Namespace> ReadNamespace(const Json& v, const std::string& path) {
  PP_TRY(ExpectObject(v, path));
  Namespace ns;
  PP_TRY(ReadRequired(v, "type", path, ReadNamespaceType, &ns.type));
  // Some generators write "path": "" for "create new"; runc accepts it, so do we.
  PP_TRY(ReadIfPresent(v, "path", path, ReadString, &ns.path));
  if (!ns.path.empty() && ns.path[0] != '/') {
    return Fail(Field(path, "path"), "expected absolute path, got {}", Quote(ns.path));
  }
  return ns;
}

Result<std::vector<Namespace>> ReadNamespaces(const Json& v, const std::string& path) {
  PP_ASSIGN_OR_RETURN(auto list, ReadArray<Namespace>(v, path, ReadNamespace));
  for (size_t i = 0; i < list.size(); ++i) {
    for (size_t j = 0; j < i; ++j) {
      if (list[i].type == list[j].type) {
        return Fail(Field(Index(path, i), "type"), "namespace {} already listed at {}",
                    NamespaceTypeName(list[i].type), Index(path, j));
      }
    }
  }
  return list;
}

Result<IdMapping> ReadIdMapping(const Json& v, const std::string& path) {
  PP_TRY(ExpectObject(v, path));
  IdMapping m;
  PP_TRY(ReadRequired(v, "containerID", path, ReadU32, &m.container_id));
  PP_TRY(ReadRequired(v, "hostID", path, ReadU32, &m.host_id));
  PP_TRY(ReadRequired(v, "size", path, ReadU32, &m.size));
  return m;
}

Result<std::vector<IdMapping>> ReadIdMappings(const Json& v, const std::string& path) {
  return ReadArray<IdMapping>(v, path, ReadIdMapping);
}

Result<MemoryResources> ReadMemory(const Json& v, const std::string& path) {
  PP_TRY(ExpectObject(v, path));
  MemoryResources m;
  PP_TRY(ReadOptional(v, "limit", path, ReadI64, &m.limit));
  PP_TRY(ReadOptional(v, "reservation", path, ReadI64, &m.reservation));
  PP_TRY(ReadOptional(v, "swap", path, ReadI64, &m.swap));
  PP_TRY(ReadOptional(v, "kernel", path, ReadI64, &m.kernel));
  PP_TRY(ReadOptional(v, "kernelTCP", path, ReadI64, &m.kernel_tcp));
  PP_TRY(ReadOptional(v, "swappiness", path, ReadU64, &m.swappiness));
  PP_TRY(ReadOptional(v, "disableOOMKiller", path, ReadBool, &m.disable_oom_killer));
  return m;
}

Result<CpuResources> ReadCpu(const Json& v, const std::string& path) {
  PP_TRY(ExpectObject(v, path));
  CpuResources c;
  PP_TRY(ReadOptional(v, "shares", path, ReadU64, &c.shares));
  PP_TRY(ReadOptional(v, "quota", path, ReadI64, &c.quota));
  PP_TRY(ReadOptional(v, "burst", path, ReadU64, &c.burst));
  PP_TRY(ReadOptional(v, "period", path, ReadU64, &c.period));
  PP_TRY(ReadOptional(v, "realtimeRuntime", path, ReadI64, &c.realtime_runtime));
  PP_TRY(ReadOptional(v, "realtimePeriod", path, ReadU64, &c.realtime_period));
  PP_TRY(ReadIfPresent(v, "cpus", path, ReadString, &c.cpus));
  PP_TRY(ReadIfPresent(v, "mems", path, ReadString, &c.mems));
  PP_TRY(ReadOptional(v, "idle", path, ReadI64, &c.idle));
  return c;
}

Result<PidsResources> ReadPids(const Json& v, const std::string& path) {
  PP_TRY(ExpectObject(v, path));
  PidsResources p;
  PP_TRY(ReadRequired(v, "limit", path, ReadI64, &p.limit));
  return p;
}

Result<Resources> ReadResources(const Json& v, const std::string& path) {
  PP_TRY(ExpectObject(v, path));
  Resources r;
  PP_TRY(ReadOptional(v, "memory", path, ReadMemory, &r.memory));
  PP_TRY(ReadOptional(v, "cpu", path, ReadCpu, &r.cpu));
  PP_TRY(ReadOptional(v, "pids", path, ReadPids, &r.pids));
  PP_TRY(ReadIfPresent(v, "unified", path, ReadStringMap, &r.unified));
  return r;
}

Result<LinuxConfig> ReadLinux(const Json& v, const std::string& path) {
  PP_TRY(ExpectObject(v, path));
  LinuxConfig l;
  PP_TRY(ReadIfPresent(v, "namespaces", path, ReadNamespaces, &l.namespaces));
  PP_TRY(ReadIfPresent(v, "cgroupsPath", path, ReadString, &l.cgroups_path));
  PP_TRY(ReadOptional(v, "resources", path, ReadResources, &l.resources));
  PP_TRY(ReadIfPresent(v, "uidMappings", path, ReadIdMappings, &l.uid_mappings));
  PP_TRY(ReadIfPresent(v, "gidMappings", path, ReadIdMappings, &l.gid_mappings));
  PP_TRY(ReadIfPresent(v, "sysctl", path, ReadStringMap, &l.sysctl));
  PP_TRY(ReadIfPresent(v, "maskedPaths", path, ReadStrings, &l.masked_paths));
  PP_TRY(ReadIfPresent(v, "readonlyPaths", path, ReadStrings, &l.readonly_paths));
  return l;
}

// Dump and operator== recurse; the parser and destructor do not. Walk with an explicit stack.
Result<void> CheckDepth(const Json& doc) {
  std::vector<std::pair<const Json*, int>> stack = {{&doc, 1}};
  while (!stack.empty()) {
    auto [node, depth] = stack.back();
    stack.pop_back();
    if (depth > kMaxNestingDepth) {
      return Error::Invalid("nested deeper than {} levels", kMaxNestingDepth);
    }
    for (const Json& child : *node) {
      if (child.is_structured()) stack.emplace_back(&child, depth + 1);
    }
  }
  return Ok();
}

// containerd's identifiers.Validate: the sandbox id names directories and sockets on the host.
bool IsIdentifier(std::string_view id) {
  if (id.empty() || id.size() > kMaxIdentifierLength) return false;
  auto alnum = [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
  };
  bool prev_sep = true;  // the first character must be alphanumeric
  for (char c : id) {
    if (alnum(c)) {
      prev_sep = false;
    } else if (c == '.' || c == '_' || c == '-') {
      if (prev_sep) return false;
      prev_sep = true;
    } else {
      return false;
    }
  }
  return !prev_sep;
}

Result<void> CheckCriAnnotations(const StringMap& annotations) {
  auto type = annotations.find(kAnnotationContainerType);
  auto id = annotations.find(kAnnotationSandboxId);
  if (type != annotations.end() && type->second != "sandbox" && type->second != "container") {
    return Fail(Key("annotations", kAnnotationContainerType),
                "expected \"sandbox\" or \"container\", got {}", Quote(type->second));
  }
  if (id != annotations.end() && !IsIdentifier(id->second)) {
    return Fail(Key("annotations", kAnnotationSandboxId),
                "expected a containerd identifier (letters and digits joined by single '.', '_' "
                "or '-', at most {} characters), got {}",
                kMaxIdentifierLength, Quote(id->second));
  }
  if (type != annotations.end() && type->second == "container" && id == annotations.end()) {
    return Fail(Key("annotations", kAnnotationSandboxId),
                "missing (required when {} is \"container\")", kAnnotationContainerType);
  }
  return Ok();
}

Result<Json> ParseJson(std::string_view text, std::string_view source) {
  if (text.size() > kMaxSpecBytes) {
    return Error::Invalid("{}: {} bytes, more than the {} allowed", source, text.size(),
                          kMaxSpecBytes);
  }
  try {
    return Json::parse(text.begin(), text.end());
  } catch (const Json::parse_error& e) {
    // Position from the byte offset; the rest of nlohmann's text after "parse error at ...: ".
    size_t end = std::min<size_t>(e.byte, text.size());
    std::string_view before = text.substr(0, end);
    size_t line = 1 + std::count(before.begin(), before.end(), '\n');
    size_t nl = before.rfind('\n');
    size_t column = nl == std::string_view::npos ? std::max<size_t>(e.byte, 1) : e.byte - nl - 1;
    std::string_view what = e.what();
    size_t at = what.find("parse error");
    size_t colon = at == std::string_view::npos ? at : what.find(": ", at);
    if (colon != std::string_view::npos) what.remove_prefix(colon + 2);
    return Error::Invalid("{}: line {}, column {}: {}", source, line, column, Sanitize(what));
  } catch (const Json::exception& e) {
    return Error::Invalid("{}: {}", source, Sanitize(e.what()));
  }
}

// Runs a validation, prefixing its error with the source. The readers check types before every
// access; the catch is a backstop so no nlohmann exception ever leaves the library.
template <typename F>
auto Guarded(std::string_view source, F&& validate) -> decltype(validate()) {
  try {
    auto r = validate();
    if (!r.ok()) return std::move(r).error().Wrap(source);
    return r;
  } catch (const Json::exception& e) {
    return Error::Internal("{}: validating: {}", source, Sanitize(e.what()));
  }
}

class FdCloser {
 public:
  explicit FdCloser(int fd) : fd_(fd) {}
  FdCloser(const FdCloser&) = delete;
  FdCloser& operator=(const FdCloser&) = delete;
  ~FdCloser() { close(fd_); }

 private:
  int fd_;
};

Result<std::string> ReadFileBounded(const std::string& path) {
  // O_NONBLOCK so a FIFO planted at the path cannot hang us in open().
  int fd = open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
  if (fd < 0) return Error::Errno(fmt::format("open {}", path));
  FdCloser closer(fd);
  struct stat st;
  if (fstat(fd, &st) != 0) return Error::Errno(fmt::format("stat {}", path));
  if (!S_ISREG(st.st_mode)) return Error::Invalid("{}: not a regular file", path);
  std::string data;
  char buf[64 * 1024];
  while (true) {
    ssize_t n = read(fd, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Error::Errno(fmt::format("read {}", path));
    if (n == 0) break;
    if (data.size() + static_cast<size_t>(n) > kMaxSpecBytes) {
      return Error::Invalid("{}: larger than the {} bytes allowed", path, kMaxSpecBytes);
    }
    data.append(buf, static_cast<size_t>(n));
  }
  return data;
}

}  // namespace

std::string_view NamespaceTypeName(NamespaceType type) {
  for (const auto& [t, name] : kNamespaceNames) {
    if (t == type) return name;
  }
  return "unknown";
}

std::optional<NamespaceType> ParseNamespaceType(std::string_view name) {
  for (const auto& [t, n] : kNamespaceNames) {
    if (n == name) return t;
  }
  return std::nullopt;
}

std::optional<std::string> Process::Env(std::string_view key) const {
  std::optional<std::string> found;
  for (const std::string& kv : env) {
    if (kv.size() > key.size() && kv[key.size()] == '=' && kv.compare(0, key.size(), key) == 0) {
      found = kv.substr(key.size() + 1);
    }
  }
  return found;
}

const Namespace* LinuxConfig::FindNamespace(NamespaceType type) const {
  for (const Namespace& ns : namespaces) {
    if (ns.type == type) return &ns;
  }
  return nullptr;
}

Result<Spec> Spec::Parse(std::string_view json_text, std::string_view source) {
  PP_ASSIGN_OR_RETURN(Json doc, ParseJson(json_text, source));
  return FromJson(std::move(doc), source);
}

Result<Spec> Spec::Load(const std::string& path) {
  PP_ASSIGN_OR_RETURN(std::string text, ReadFileBounded(path));
  return Parse(text, path);
}

Result<Spec> Spec::FromJson(Json doc, std::string_view source) {
  Spec spec;
  spec.source_ = std::string(source);
  PP_TRY(spec.Commit(std::move(doc)));
  return spec;
}

Result<void> Spec::ReadViews(const Json& doc) {
  PP_TRY(CheckDepth(doc));
  PP_TRY(ExpectObject(doc, ""));
  PP_TRY(ReadRequired(doc, "ociVersion", "", ReadNonEmpty, &oci_version_));
  PP_TRY(ReadOptional(doc, "process", "", ReadProcess, &process_));
  PP_TRY(ReadRequired(doc, "root", "", ReadRoot, &root_));
  PP_TRY(ReadOptional(doc, "hostname", "", ReadString, &hostname_));
  if (const Json* mounts = Get(doc, "mounts")) {
    PP_ASSIGN_OR_RETURN(mounts_, ReadArray<Mount>(*mounts, "mounts", ReadMount));
  }
  PP_TRY(ReadIfPresent(doc, "annotations", "", ReadStringMap, &annotations_));
  PP_TRY(CheckCriAnnotations(annotations_));
  PP_TRY(ReadOptional(doc, "linux", "", ReadLinux, &linux_));
  return Ok();
}

Result<void> Spec::Commit(Json doc) {
  Spec next;
  PP_TRY(Guarded(source_, [&] { return next.ReadViews(doc); }));
  next.source_ = std::move(source_);
  next.doc_ = std::move(doc);
  *this = std::move(next);
  return Ok();
}

std::string Spec::Dump(int indent) const {
  return doc_.dump(indent, ' ', /*ensure_ascii=*/false, Json::error_handler_t::replace);
}

std::optional<std::string> Spec::Annotation(std::string_view key) const {
  auto it = annotations_.find(key);
  if (it == annotations_.end()) return std::nullopt;
  return it->second;
}

CriContainerType Spec::ContainerType() const {
  std::optional<std::string> type = Annotation(kAnnotationContainerType);
  if (!type) return CriContainerType::kNone;
  // Commit allows no other value.
  return *type == "sandbox" ? CriContainerType::kSandbox : CriContainerType::kContainer;
}

std::optional<std::string> Spec::SandboxId() const { return Annotation(kAnnotationSandboxId); }

std::optional<std::string> Spec::NamespacePath(NamespaceType type) const {
  if (!linux_) return std::nullopt;
  const Namespace* ns = linux_->FindNamespace(type);
  if (ns == nullptr || ns->path.empty()) return std::nullopt;
  return ns->path;
}

Result<void> Spec::SetRootPath(std::string_view path) {
  return Edit([&](Json& doc) { doc["root"]["path"] = std::string(path); });
}

Result<void> Spec::SetNamespace(NamespaceType type, std::string_view path) {
  return Edit([&](Json& doc) {
    Json& linux_doc = doc["linux"];
    if (linux_doc.is_null()) linux_doc = Json::object();
    Json& list = linux_doc["namespaces"];
    if (list.is_null()) list = Json::array();
    const std::string name(NamespaceTypeName(type));
    Json* entry = nullptr;
    for (Json& ns : list) {
      auto t = ns.find("type");
      if (t != ns.end() && *t == name) entry = &ns;
    }
    if (entry == nullptr) {
      list.push_back(Json{{"type", name}});
      entry = &list.back();
    }
    if (path.empty()) {
      entry->erase("path");
    } else {
      (*entry)["path"] = std::string(path);
    }
  });
}

Result<void> Spec::RemoveNamespace(NamespaceType type) {
  if (!linux_ || linux_->FindNamespace(type) == nullptr) return Ok();
  return Edit([&](Json& doc) {
    Json& list = doc["linux"]["namespaces"];
    const std::string name(NamespaceTypeName(type));
    for (size_t i = 0; i < list.size(); ++i) {
      auto t = list[i].find("type");
      if (t != list[i].end() && *t == name) {
        list.erase(i);
        return;
      }
    }
  });
}

Result<void> Spec::SetCgroupsPath(std::string_view path) {
  return Edit([&](Json& doc) {
    Json& linux_doc = doc["linux"];
    if (linux_doc.is_null()) linux_doc = Json::object();
    linux_doc["cgroupsPath"] = std::string(path);
  });
}

Result<void> Spec::Edit(const std::function<void(Json& doc)>& edit) {
  Json next = doc_;
  try {
    edit(next);
  } catch (const Json::exception& e) {
    return Error::Internal("{}: edit: {}", source_, Sanitize(e.what()));
  }
  return Commit(std::move(next));
}

Result<Process> ProcessFromJson(const Json& doc, std::string_view source) {
  return Guarded(source, [&]() -> Result<Process> {
    PP_TRY(CheckDepth(doc));
    return ReadProcess(doc, "");
  });
}

Result<Process> ParseProcess(std::string_view json_text, std::string_view source) {
  PP_ASSIGN_OR_RETURN(Json doc, ParseJson(json_text, source));
  return ProcessFromJson(doc, source);
}

}  // namespace peapod::oci
