// VM templates: one VM booted until its agent answers, saved (device state and memory) to a
// file, and every later pod and pool VM restored from that file instead of booted. See
// docs/sandboxer.md ("Templates") for the files, the checks and the limits.
#pragma once

#include <sys/stat.h>

#include <cstdint>
#include <string>

#include <nlohmann/json_fwd.hpp>

#include "common/base/result.h"
#include "sandboxer/vm_backend.h"

namespace peapod::sandboxer {

// What a restore needs of a template that passed its checks.
struct TemplateInfo {
  std::string key;    // hex SHA-256 of its inputs (TemplateKey)
  std::string state;  // the saved state file
  std::string mac;    // the NIC's MAC in the saved guest: a restored VM's agent re-MACs from it
  // The state file as it was hashed (FileIdentity): a restore refuses a file that changed.
  std::string identity;
  uint64_t generation = 0;  // which load of the sandboxer's this is (PodManager counts them)
};

// Device, inode, size and change time: a file written, truncated or replaced since has another
// (ctime cannot be set back without changing the clock).
std::string FileIdentity(const struct stat& st);

// The inputs a template is valid for: kernel and initrd (their bytes), command line, VM size,
// accelerator, translation cache, the devices (NIC, scratch disk and its size, how the share
// is served), the QEMU binary (path, size, mtime) and the agent protocol. Blocking: hashes
// the kernel and initrd (a few tens of MiB).
Result<std::string> TemplateKey(const VmSpec& spec, uint64_t scratch_size_mib,
                                const std::string& qemu_binary);

// <dir>/manifest.json and <dir>/state: the manifest must name key and the state's exact size
// and SHA-256 (the file opened once, without following symlinks: what is hashed is what the
// identity names). Any mismatch (a changed input, a truncated or corrupt file) is an error that
// says which.
Result<TemplateInfo> LoadTemplate(const std::string& dir, const std::string& key);

// Writes <dir>/manifest.json for the state file <dir>/state (hashing it, as LoadTemplate
// does), atomically; returns the template as LoadTemplate would find it.
Result<TemplateInfo> WriteTemplateManifest(const std::string& dir, const std::string& key,
                                           const std::string& mac);

// A string member of a JSON object, or "": for documents that are read, not trusted to have
// the expected shape (a template's manifest, QEMU's monitor answers).
std::string JsonString(const nlohmann::json& j, const char* key);

// n bytes from the host's CSPRNG (getrandom).
Result<std::string> HostRandomBytes(size_t n);

}  // namespace peapod::sandboxer
