#include "podagent/network.h"

#include <arpa/inet.h>
#include <linux/if_addr.h>
#include <linux/if_link.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <net/if.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <set>

#include <spdlog/spdlog.h>

#include "common/base/unique_fd.h"

namespace peapod::agent {

namespace v1 = peapod::agent::v1;
namespace fs = std::filesystem;

namespace {

// One rtnetlink request: header, fixed body, attributes.
class NlRequest {
 public:
  NlRequest(uint16_t type, uint16_t flags, size_t body_len) : buf_(NLMSG_SPACE(body_len), 0) {
    hdr()->nlmsg_len = static_cast<uint32_t>(NLMSG_LENGTH(body_len));
    hdr()->nlmsg_type = type;
    hdr()->nlmsg_flags = static_cast<uint16_t>(NLM_F_REQUEST | NLM_F_ACK | flags);
  }
  nlmsghdr* hdr() { return reinterpret_cast<nlmsghdr*>(buf_.data()); }
  template <typename T>
  T* body() {
    return reinterpret_cast<T*>(NLMSG_DATA(hdr()));
  }
  void Attr(uint16_t type, const void* data, size_t len) {
    size_t off = NLMSG_ALIGN(hdr()->nlmsg_len);
    buf_.resize(off + RTA_SPACE(len), 0);
    auto* rta = reinterpret_cast<rtattr*>(buf_.data() + off);
    rta->rta_type = type;
    rta->rta_len = static_cast<unsigned short>(RTA_LENGTH(len));
    std::memcpy(RTA_DATA(rta), data, len);
    hdr()->nlmsg_len = static_cast<uint32_t>(off + RTA_SPACE(len));
  }
  void Attr32(uint16_t type, uint32_t v) { Attr(type, &v, sizeof(v)); }
  void AttrString(uint16_t type, const std::string& s) { Attr(type, s.c_str(), s.size() + 1); }
  const char* data() const { return buf_.data(); }
  size_t size() const { return buf_.size(); }

 private:
  std::vector<char> buf_;
};

// Sends the request and waits for its acknowledgement.
Result<void> Transact(NlRequest& req, const std::string& what) {
  UniqueFd fd(::socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE));
  if (!fd) return Error::Errno("netlink socket");
  static uint32_t seq = 0;
  req.hdr()->nlmsg_seq = ++seq;
  if (::send(fd.get(), req.data(), req.hdr()->nlmsg_len, 0) < 0) {
    return Error::Errno("netlink send: " + what);
  }
  char buf[8192];
  for (;;) {
    ssize_t n = ::recv(fd.get(), buf, sizeof(buf), 0);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return Error::Errno("netlink recv: " + what);
    int len = static_cast<int>(n);
    for (auto* h = reinterpret_cast<nlmsghdr*>(buf); NLMSG_OK(h, len); h = NLMSG_NEXT(h, len)) {
      if (h->nlmsg_seq != seq || h->nlmsg_type != NLMSG_ERROR) continue;
      auto* err = reinterpret_cast<nlmsgerr*>(NLMSG_DATA(h));
      if (err->error == 0) return Ok();
      return Error::Errno(what, -err->error);
    }
  }
}

struct Prefix {
  int family = AF_UNSPEC;
  unsigned char addr[16] = {};
  size_t len = 0;  // bytes of addr used
  unsigned prefix = 0;
};

Result<Prefix> ParseAddress(const std::string& text, bool need_prefix) {
  Prefix p;
  std::string ip = text;
  auto slash = text.find('/');
  if (slash != std::string::npos) ip = text.substr(0, slash);
  if (::inet_pton(AF_INET, ip.c_str(), p.addr) == 1) {
    p.family = AF_INET;
    p.len = 4;
  } else if (::inet_pton(AF_INET6, ip.c_str(), p.addr) == 1) {
    p.family = AF_INET6;
    p.len = 16;
  } else {
    return Error::Invalid("'{}' is not an IPv4 or IPv6 address", text);
  }
  p.prefix = static_cast<unsigned>(p.len * 8);
  if (slash != std::string::npos) {
    try {
      size_t used = 0;
      int v = std::stoi(text.substr(slash + 1), &used);
      if (used != text.size() - slash - 1 || v < 0 || v > static_cast<int>(p.len * 8)) throw 0;
      p.prefix = static_cast<unsigned>(v);
    } catch (...) {
      return Error::Invalid("'{}': bad prefix length", text);
    }
  } else if (need_prefix) {
    return Error::Invalid("'{}': expected CIDR notation (address/prefix)", text);
  }
  return p;
}

std::string ReadSysNet(const std::string& name, const char* file) {
  std::ifstream f("/sys/class/net/" + name + "/" + file);
  std::string s;
  std::getline(f, s);
  return s;
}

Result<std::pair<int, std::string>> FindByMac(std::string mac) {
  std::transform(mac.begin(), mac.end(), mac.begin(), ::tolower);
  std::error_code ec;
  for (const auto& e : fs::directory_iterator("/sys/class/net", ec)) {
    std::string name = e.path().filename();
    if (ReadSysNet(name, "address") == mac) {
      return std::pair{std::stoi(ReadSysNet(name, "ifindex")), name};
    }
  }
  return Error::NotFound("no network interface with MAC {} in the guest", mac);
}

Result<void> SetLink(int index, const std::string& what, unsigned flags, unsigned change,
                     const std::string& new_name = "", uint32_t mtu = 0) {
  NlRequest req(RTM_NEWLINK, 0, sizeof(ifinfomsg));
  auto* ifi = req.body<ifinfomsg>();
  ifi->ifi_family = AF_UNSPEC;
  ifi->ifi_index = index;
  ifi->ifi_flags = flags;
  ifi->ifi_change = change;
  if (!new_name.empty()) req.AttrString(IFLA_IFNAME, new_name);
  if (mtu) req.Attr32(IFLA_MTU, mtu);
  return Transact(req, what);
}

Result<std::array<uint8_t, 6>> ParseMac(const std::string& mac) {
  std::array<uint8_t, 6> b{};
  unsigned v[6];
  char extra;
  if (std::sscanf(mac.c_str(), "%x:%x:%x:%x:%x:%x%c", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5],
                  &extra) != 6) {
    return Error::Invalid("'{}' is not a MAC address (aa:bb:cc:dd:ee:ff)", mac);
  }
  for (int i = 0; i < 6; ++i) {
    if (v[i] > 0xff) return Error::Invalid("'{}' is not a MAC address", mac);
    b[i] = static_cast<uint8_t>(v[i]);
  }
  return b;
}

// IPv6 on the NIC: the kernel made its per-interface state (no state without the module, or
// with IPv6 off for the whole guest).
bool HasIpv6(const std::string& name) {
  return ::access(("/proc/sys/net/ipv6/conf/" + name).c_str(), F_OK) == 0;
}

// One attribute, padded, as bytes: the payload of an attribute that nests it.
std::vector<char> PackAttr(uint16_t type, const void* data, size_t len) {
  std::vector<char> out(RTA_SPACE(len), 0);
  auto* rta = reinterpret_cast<rtattr*>(out.data());
  rta->rta_type = type;
  rta->rta_len = static_cast<unsigned short>(RTA_LENGTH(len));
  std::memcpy(RTA_DATA(rta), data, len);
  return out;
}

// How the kernel makes the NIC's IPv6 link-local address when the link comes up:
// IN6_ADDR_GEN_MODE_EUI64 from its MAC, or IN6_ADDR_GEN_MODE_NONE, none at all.
Result<void> SetAddrGenMode(int index, const std::string& name, uint8_t mode) {
  // IFLA_AF_SPEC { AF_INET6 { IFLA_INET6_ADDR_GEN_MODE: u8 } }.
  auto gen = PackAttr(IFLA_INET6_ADDR_GEN_MODE, &mode, sizeof(mode));
  auto af = PackAttr(AF_INET6, gen.data(), gen.size());
  NlRequest req(RTM_NEWLINK, 0, sizeof(ifinfomsg));
  auto* ifi = req.body<ifinfomsg>();
  ifi->ifi_family = AF_UNSPEC;
  ifi->ifi_index = index;
  req.Attr(IFLA_AF_SPEC, af.data(), af.size());
  return Transact(req, fmt::format("set {} IPv6 address generation mode {}", name, mode));
}

Result<void> AddAddress(int index, const std::string& label, const std::string& cidr, bool nodad) {
  PP_ASSIGN_OR_RETURN(auto p, ParseAddress(cidr, true));
  NlRequest req(RTM_NEWADDR, NLM_F_CREATE | NLM_F_REPLACE, sizeof(ifaddrmsg));
  auto* ifa = req.body<ifaddrmsg>();
  ifa->ifa_family = static_cast<unsigned char>(p.family);
  ifa->ifa_prefixlen = static_cast<unsigned char>(p.prefix);
  ifa->ifa_index = static_cast<unsigned>(index);
  bool link_local = p.family == AF_INET6 && p.addr[0] == 0xfe && (p.addr[1] & 0xc0) == 0x80;
  ifa->ifa_scope = link_local ? RT_SCOPE_LINK : RT_SCOPE_UNIVERSE;
  req.Attr(IFA_LOCAL, p.addr, p.len);
  req.Attr(IFA_ADDRESS, p.addr, p.len);
  if (p.family == AF_INET6 && nodad) req.Attr32(IFA_FLAGS, IFA_F_NODAD);
  return Transact(req, "add address " + cidr + " to " + label);
}

// The link-local address the kernel gives a NIC of this MAC (EUI-64, RFC 4291 appendix A).
std::string LinkLocalOf(const std::array<uint8_t, 6>& m) {
  return fmt::format("fe80::{:x}:{:x}:{:x}:{:x}/64", ((m[0] ^ 0x02) << 8) | m[1],
                     (m[2] << 8) | 0xff, (0xfe << 8) | m[3], (m[4] << 8) | m[5]);
}

bool LinkIsUp(const std::string& name) {
  std::string flags = ReadSysNet(name, "flags");
  return !flags.empty() && (std::stoul(flags, nullptr, 16) & IFF_UP) != 0;
}

// NICs brought up on standby (a pool VM's), by index: they have no link-local address yet.
std::set<int>& StandbyLinks() {
  static std::set<int> links;
  return links;
}

Result<void> ConfigureInterface(const v1::Interface& itf) {
  auto t0 = std::chrono::steady_clock::now();
  std::string marks;
  auto mark = [&](const char* what) {
    auto t = std::chrono::steady_clock::now();
    marks +=
        fmt::format(" {} {:.1f}", what, std::chrono::duration<double, std::milli>(t - t0).count());
    t0 = t;
  };
  bool remac = !itf.current_mac().empty() && itf.current_mac() != itf.mac();
  PP_ASSIGN_OR_RETURN(auto found, FindByMac(remac ? itf.current_mac() : itf.mac()));
  auto [index, name] = found;
  std::string label = itf.name().empty() ? name : itf.name();
  mark("find");
  bool ipv6 = HasIpv6(name);
  if (itf.standby()) {
    // Up before its pod exists, so the pod's start does not wait for the link: no addresses,
    // and no link-local address made from a MAC the pod will not have.
    if (!itf.addresses().empty() || remac || !itf.name().empty()) {
      return Error::Invalid("a standby interface takes no addresses, name or new MAC");
    }
    // Noted before the first change: whatever of it fails, the pod's call turns address
    // generation back on.
    StandbyLinks().insert(index);
    if (ipv6) PP_TRY(SetAddrGenMode(index, name, IN6_ADDR_GEN_MODE_NONE));
    PP_TRY(SetLink(index, "bring " + name + " up on standby", IFF_UP, IFF_UP));
    spdlog::info("agent: interface {} ({}) up on standby", name, itf.mac());
    return Ok();
  }
  bool rename = !itf.name().empty() && itf.name() != name;
  if (rename && itf.name().size() >= IFNAMSIZ) {
    return Error::Invalid("interface name '{}' is longer than {} bytes", itf.name(), IFNAMSIZ - 1);
  }
  std::optional<std::array<uint8_t, 6>> mac;
  if (remac) {
    PP_ASSIGN_OR_RETURN(mac, ParseMac(itf.mac()));
  }
  bool standby = StandbyLinks().count(index) > 0;
  bool up = LinkIsUp(name);
  // A link on standby keeps running through its new MAC (virtio-net changes it live); anything
  // else takes it down first.
  bool live = false;
  if (mac) {
    NlRequest req(RTM_NEWLINK, 0, sizeof(ifinfomsg));
    auto* ifi = req.body<ifinfomsg>();
    ifi->ifi_family = AF_UNSPEC;
    ifi->ifi_index = index;
    req.Attr(IFLA_ADDRESS, mac->data(), mac->size());
    if (up && standby && !rename) {
      auto r = Transact(req, "set " + name + " MAC " + itf.mac() + " live");
      if (!r.ok()) spdlog::info("agent: {}; taking the link down for it", r.error().ToString());
      live = r.ok();
      mark("mac_live");
    }
    if (!live) {
      // The pod's MAC (the CNI interface's): frames the tc redirect hands over are addressed to
      // it.
      if (up) PP_TRY(SetLink(index, "set " + name + " down", 0, IFF_UP));
      up = false;
      PP_TRY(Transact(req, "set " + name + " MAC " + itf.mac()));
      mark("mac");
    }
  }
  if (rename) {
    if (up) PP_TRY(SetLink(index, "set " + name + " down", 0, IFF_UP));
    up = false;
    PP_TRY(SetLink(index, "rename " + name + " to " + itf.name(), 0, 0, itf.name()));
  }
  if (itf.mtu())
    PP_TRY(SetLink(index, fmt::format("set {} mtu {}", label, itf.mtu()), 0, 0, "", itf.mtu()));
  mark("name_mtu");
  if (standby && ipv6) {
    // The kernel makes the link-local address again from here on; one that stays up gets it
    // from the agent, as the kernel would have made it from the new MAC.
    PP_TRY(SetAddrGenMode(index, label, IN6_ADDR_GEN_MODE_EUI64));
    if (up) {
      std::array<uint8_t, 6> now{};
      if (mac) {
        now = *mac;
      } else {
        PP_ASSIGN_OR_RETURN(now, ParseMac(itf.mac()));
      }
      PP_TRY(AddAddress(index, label, LinkLocalOf(now), /*nodad=*/false));
    }
  }
  StandbyLinks().erase(index);
  if (!up) PP_TRY(SetLink(index, "bring " + label + " up", IFF_UP, IFF_UP));
  mark("up");
  // The host already owns these addresses: no DAD delay.
  for (const auto& a : itf.addresses()) PP_TRY(AddAddress(index, label, a, /*nodad=*/true));
  mark("addresses");
  spdlog::info("agent: interface {} ({}) up with {} addresses{}; ms:{}", label, itf.mac(),
               itf.addresses_size(), live ? ", its MAC changed live" : "", marks);
  return Ok();
}

Result<void> AddRoute(const v1::Route& r) {
  std::string what =
      fmt::format("add route {} via '{}' dev '{}'",
                  r.destination().empty() ? "default" : r.destination(), r.gateway(), r.device());
  Prefix dst;
  if (!r.destination().empty() && r.destination() != "default") {
    PP_ASSIGN_OR_RETURN(dst, ParseAddress(r.destination(), false));
  }
  Prefix gw;
  if (!r.gateway().empty()) {
    PP_ASSIGN_OR_RETURN(gw, ParseAddress(r.gateway(), false));
  }
  int family = dst.family != AF_UNSPEC ? dst.family : gw.family;
  if (family == AF_UNSPEC) return Error::Invalid("{}: needs a destination or a gateway", what);
  if (gw.family != AF_UNSPEC && gw.family != family) {
    return Error::Invalid("{}: destination and gateway are different address families", what);
  }
  NlRequest req(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_REPLACE, sizeof(rtmsg));
  auto* rt = req.body<rtmsg>();
  rt->rtm_family = static_cast<unsigned char>(family);
  rt->rtm_dst_len = static_cast<unsigned char>(dst.family == AF_UNSPEC ? 0 : dst.prefix);
  rt->rtm_table = RT_TABLE_MAIN;
  rt->rtm_protocol = RTPROT_BOOT;
  rt->rtm_type = RTN_UNICAST;
  unsigned scope = gw.family == AF_UNSPEC ? unsigned{RT_SCOPE_LINK} : unsigned{RT_SCOPE_UNIVERSE};
  if (r.scope()) scope = r.scope();
  rt->rtm_scope = static_cast<unsigned char>(scope);
  if (dst.family != AF_UNSPEC) req.Attr(RTA_DST, dst.addr, dst.len);
  if (gw.family != AF_UNSPEC) req.Attr(RTA_GATEWAY, gw.addr, gw.len);
  if (!r.device().empty()) {
    unsigned index = ::if_nametoindex(r.device().c_str());
    if (index == 0) return Error::NotFound("{}: no interface {} in the guest", what, r.device());
    req.Attr32(RTA_OIF, index);
  }
  if (!r.source().empty()) {
    PP_ASSIGN_OR_RETURN(auto src, ParseAddress(r.source(), false));
    req.Attr(RTA_PREFSRC, src.addr, src.len);
  }
  return Transact(req, what);
}

}  // namespace

Result<void> ConfigureNetwork(const v1::ConfigureNetworkRequest& req) {
  for (const auto& itf : req.interfaces()) {
    PP_TRY_CTX(ConfigureInterface(itf), "interface " + itf.mac());
  }
  for (const auto& r : req.routes()) PP_TRY(AddRoute(r));
  return Ok();
}

}  // namespace peapod::agent
