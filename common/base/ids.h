// Names that become file names, socket paths and libvirt domain names: container, exec and
// pod ids from requests.
#pragma once

#include <string_view>

namespace peapod {

// What IsValidId accepts, for error messages.
inline constexpr char kIdRule[] = "1-128 of [A-Za-z0-9_.-], starting alphanumeric";

// True for 1-128 characters of [A-Za-z0-9_.-] starting alphanumeric: safe as one path
// component (never "." or "..", no "/"), as a socket name and as part of a domain name.
bool IsValidId(std::string_view id);

}  // namespace peapod
