#include "sandboxer/network.h"

#include <fcntl.h>
#include <linux/if_ether.h>
#include <linux/if_tun.h>
#include <linux/pkt_cls.h>
#include <linux/rtnetlink.h>
#include <net/if.h>
#include <net/if_arp.h>
#include <netlink/netlink.h>
#include <netlink/route/act/mirred.h>
#include <netlink/route/addr.h>
#include <netlink/route/classifier.h>
#include <netlink/route/cls/u32.h>
#include <netlink/route/link.h>
#include <netlink/route/qdisc.h>
#include <netlink/route/route.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <cstring>
#include <functional>
#include <memory>
#include <thread>

#include <spdlog/spdlog.h>

#include "common/base/unique_fd.h"

namespace peapod::sandboxer {

namespace v1 = peapod::agent::v1;

namespace {

Error NlError(const std::string& what, int err) {
  return Error(Code::kInternal, what + ": " + nl_geterror(err));
}

// A connected rtnetlink socket, in the netns of the thread that makes it.
struct Sock {
  nl_sock* sk = nl_socket_alloc();
  ~Sock() {
    if (sk) nl_socket_free(sk);
  }
  Result<void> Connect() {
    if (!sk) return Error::Internal("nl_socket_alloc failed");
    if (int e = nl_connect(sk, NETLINK_ROUTE); e < 0) return NlError("netlink connect", e);
    return Ok();
  }
};

template <typename T, void (*Free)(T*)>
struct NlPtr {
  T* p = nullptr;
  ~NlPtr() {
    if (p) Free(p);
  }
};
void FreeCache(nl_cache* c) { nl_cache_free(c); }
void PutLink(rtnl_link* l) { rtnl_link_put(l); }
void PutQdisc(rtnl_qdisc* q) { rtnl_qdisc_put(q); }
void PutCls(rtnl_cls* c) { rtnl_cls_put(c); }

std::string AddrStr(nl_addr* a) {
  char buf[128];
  return nl_addr2str(a, buf, sizeof(buf));
}

// Reads the CNI interface: eth0 if present, else the first Ethernet link that is not lo.
Result<void> ReadCniInterface(PodNetwork& net) {
  Sock s;
  PP_TRY(s.Connect());
  NlPtr<nl_cache, FreeCache> links, addrs, routes;
  if (int e = rtnl_link_alloc_cache(s.sk, AF_UNSPEC, &links.p); e < 0) {
    return NlError("list links", e);
  }
  rtnl_link* chosen = nullptr;
  for (nl_object* o = nl_cache_get_first(links.p); o; o = nl_cache_get_next(o)) {
    auto* l = reinterpret_cast<rtnl_link*>(o);
    if (rtnl_link_get_arptype(l) != ARPHRD_ETHER) continue;
    std::string name = rtnl_link_get_name(l);
    if (name.rfind("pp", 0) == 0) continue;  // our own TAP, after a restart
    if (!chosen || name == "eth0") chosen = l;
    if (name == "eth0") break;
  }
  if (!chosen) {
    return Error::NotFound("netns {} has no Ethernet interface (did CNI set it up?)", net.netns);
  }
  int index = rtnl_link_get_ifindex(chosen);
  net.cni_ifname = rtnl_link_get_name(chosen);
  net.mac = AddrStr(rtnl_link_get_addr(chosen));
  net.mtu = rtnl_link_get_mtu(chosen);
  auto* itf = net.guest.add_interfaces();
  itf->set_name("eth0");
  itf->set_mac(net.mac);
  itf->set_mtu(net.mtu);

  if (int e = rtnl_addr_alloc_cache(s.sk, &addrs.p); e < 0) return NlError("list addresses", e);
  for (nl_object* o = nl_cache_get_first(addrs.p); o; o = nl_cache_get_next(o)) {
    auto* a = reinterpret_cast<rtnl_addr*>(o);
    if (rtnl_addr_get_ifindex(a) != index) continue;
    if (rtnl_addr_get_scope(a) != RT_SCOPE_UNIVERSE) continue;  // not link-local
    itf->add_addresses(AddrStr(rtnl_addr_get_local(a)));
  }
  if (int e = rtnl_route_alloc_cache(s.sk, AF_UNSPEC, 0, &routes.p); e < 0) {
    return NlError("list routes", e);
  }
  for (nl_object* o = nl_cache_get_first(routes.p); o; o = nl_cache_get_next(o)) {
    auto* r = reinterpret_cast<rtnl_route*>(o);
    // The guest makes the connected (kernel) routes itself when the addresses are added.
    if (rtnl_route_get_table(r) != RT_TABLE_MAIN || rtnl_route_get_type(r) != RTN_UNICAST ||
        rtnl_route_get_protocol(r) == RTPROT_KERNEL || rtnl_route_get_nnexthops(r) < 1) {
      continue;
    }
    rtnl_nexthop* nh = rtnl_route_nexthop_n(r, 0);
    if (rtnl_route_nh_get_ifindex(nh) != index) continue;
    v1::Route route;
    nl_addr* dst = rtnl_route_get_dst(r);
    if (dst && nl_addr_get_prefixlen(dst) > 0) route.set_destination(AddrStr(dst));
    if (nl_addr* gw = rtnl_route_nh_get_gateway(nh)) route.set_gateway(AddrStr(gw));
    route.set_device("eth0");
    if (nl_addr* src = rtnl_route_get_pref_src(r)) route.set_source(AddrStr(src));
    // IPv6 routes of the kernel's own (fe80::/64, multicast) are not ours to copy.
    if (route.destination().rfind("fe80:", 0) == 0 || route.destination().rfind("ff00:", 0) == 0) {
      continue;
    }
    *net.guest.add_routes() = route;
  }
  return Ok();
}

Result<int> IfIndex(Sock& s, const std::string& name) {
  NlPtr<rtnl_link, PutLink> link;
  if (int e = rtnl_link_get_kernel(s.sk, 0, name.c_str(), &link.p); e < 0) {
    return NlError("find interface " + name, e);
  }
  return rtnl_link_get_ifindex(link.p);
}

Result<void> AddIngress(Sock& s, int ifindex, const std::string& name) {
  NlPtr<rtnl_qdisc, PutQdisc> q{rtnl_qdisc_alloc()};
  rtnl_tc_set_ifindex(TC_CAST(q.p), ifindex);
  rtnl_tc_set_parent(TC_CAST(q.p), TC_H_INGRESS);
  rtnl_tc_set_handle(TC_CAST(q.p), TC_HANDLE(0xffff, 0));
  if (int e = rtnl_tc_set_kind(TC_CAST(q.p), "ingress"); e < 0) return NlError("ingress qdisc", e);
  if (int e = rtnl_qdisc_add(s.sk, q.p, NLM_F_CREATE | NLM_F_REPLACE); e < 0) {
    return NlError("add ingress qdisc on " + name, e);
  }
  return Ok();
}

// Every frame arriving on `from` leaves through `to`.
Result<void> Redirect(Sock& s, int from, int to, const std::string& what) {
  NlPtr<rtnl_cls, PutCls> c{rtnl_cls_alloc()};
  rtnl_tc_set_ifindex(TC_CAST(c.p), from);
  rtnl_tc_set_parent(TC_CAST(c.p), TC_HANDLE(0xffff, 0));
  // u32 with an all-zero key matches every frame. (matchall would say it more plainly, but
  // not every kernel has cls_matchall; u32 is everywhere.)
  if (int e = rtnl_tc_set_kind(TC_CAST(c.p), "u32"); e < 0) return NlError("u32", e);
  rtnl_cls_set_protocol(c.p, ETH_P_ALL);
  rtnl_cls_set_prio(c.p, 1);
  if (int e = rtnl_u32_add_key_uint32(c.p, 0, 0, 0, 0); e < 0) return NlError("u32 key", e);
  // Terminal: a match runs the action (without it, u32 only moves on to the next table).
  if (int e = rtnl_u32_set_cls_terminal(c.p); e < 0) return NlError("u32 terminal", e);
  rtnl_act* act = rtnl_act_alloc();
  rtnl_tc_set_kind(TC_CAST(act), "mirred");
  rtnl_mirred_set_action(act, TCA_EGRESS_REDIR);
  rtnl_mirred_set_policy(act, TC_ACT_STOLEN);
  rtnl_mirred_set_ifindex(act, static_cast<uint32_t>(to));
  int e = rtnl_u32_add_action(c.p, act);
  rtnl_act_put(act);
  if (e < 0) return NlError("mirred action", e);
  if (int e2 = rtnl_cls_add(s.sk, c.p, NLM_F_CREATE | NLM_F_EXCL); e2 < 0) {
    return NlError("add tc redirect " + what, e2);
  }
  return Ok();
}

}  // namespace

Result<void> InNetns(const std::string& path, const std::function<Result<void>()>& fn) {
  Result<void> result = Ok();
  std::thread t([&] {
    UniqueFd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
    if (!fd) {
      result = Error::Errno("open netns " + path);
      return;
    }
    if (::setns(fd.get(), CLONE_NEWNET) < 0) {
      result = Error::Errno("enter netns " + path);
      return;
    }
    result = fn();
  });
  t.join();
  return result;
}

std::string TapName(const std::string& pod_id) {
  // IFNAMSIZ is 16: "pp" + 12 hex digits of a hash of the id.
  uint64_t h = 1469598103934665603ull;
  for (char ch : pod_id) h = (h ^ static_cast<unsigned char>(ch)) * 1099511628211ull;
  char buf[16];
  std::snprintf(buf, sizeof(buf), "pp%012llx",
                static_cast<unsigned long long>(h & 0xffffffffffffull));
  return buf;
}

Result<PodNetwork> ReadPodNetwork(const std::string& netns) {
  PodNetwork net;
  net.netns = netns;
  PP_TRY(InNetns(netns, [&] { return ReadCniInterface(net); }));
  return net;
}

Result<void> CreateTap(const std::string& tap) {
  // A persistent TAP in our netns for libvirt to open (managed='no'); removed by RemoveTap.
  RemoveTap(tap, "");
  UniqueFd tun(::open("/dev/net/tun", O_RDWR | O_CLOEXEC));
  if (!tun) return Error::Errno("open /dev/net/tun");
  ifreq ifr{};
  std::strncpy(ifr.ifr_name, tap.c_str(), IFNAMSIZ - 1);
  ifr.ifr_flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
  if (::ioctl(tun.get(), TUNSETIFF, &ifr) < 0) return Error::Errno("create TAP " + tap);
  if (::ioctl(tun.get(), TUNSETPERSIST, 1) < 0) return Error::Errno("persist TAP " + tap);
  return Ok();
}

Result<PodNetwork> PrepareTap(const std::string& pod_id, const std::string& netns) {
  PP_ASSIGN_OR_RETURN(PodNetwork net, ReadPodNetwork(netns));
  net.tap = TapName(pod_id);
  PP_TRY(CreateTap(net.tap));
  spdlog::info("pod {}: TAP {} for CNI interface {} ({}, {} addresses, {} routes)", pod_id, net.tap,
               net.cni_ifname, net.mac, net.guest.interfaces(0).addresses_size(),
               net.guest.routes_size());
  return net;
}

Result<void> AttachTap(const PodNetwork& net) {
  {
    Sock s;
    PP_TRY(s.Connect());
    UniqueFd ns(::open(net.netns.c_str(), O_RDONLY | O_CLOEXEC));
    if (!ns) return Error::Errno("open netns " + net.netns);
    NlPtr<rtnl_link, PutLink> old, change{rtnl_link_alloc()};
    if (int e = rtnl_link_get_kernel(s.sk, 0, net.tap.c_str(), &old.p); e < 0) {
      return NlError("find TAP " + net.tap, e);
    }
    rtnl_link_set_ns_fd(change.p, ns.get());
    if (int e = rtnl_link_change(s.sk, old.p, change.p, 0); e < 0) {
      return NlError("move TAP " + net.tap + " into " + net.netns, e);
    }
  }
  return InNetns(net.netns, [&]() -> Result<void> {
    Sock s;
    PP_TRY(s.Connect());
    PP_ASSIGN_OR_RETURN(int tap, IfIndex(s, net.tap));
    PP_ASSIGN_OR_RETURN(int cni, IfIndex(s, net.cni_ifname));
    NlPtr<rtnl_link, PutLink> old, change{rtnl_link_alloc()};
    if (int e = rtnl_link_get_kernel(s.sk, tap, nullptr, &old.p); e < 0) {
      return NlError("find TAP in netns", e);
    }
    rtnl_link_set_flags(change.p, IFF_UP);
    if (net.mtu) rtnl_link_set_mtu(change.p, net.mtu);
    if (int e = rtnl_link_change(s.sk, old.p, change.p, 0); e < 0) {
      return NlError("bring TAP " + net.tap + " up", e);
    }
    PP_TRY(AddIngress(s, cni, net.cni_ifname));
    PP_TRY(AddIngress(s, tap, net.tap));
    PP_TRY(Redirect(s, cni, tap, net.cni_ifname + " -> " + net.tap));
    PP_TRY(Redirect(s, tap, cni, net.tap + " -> " + net.cni_ifname));
    return Ok();
  });
}

void RemoveTap(const std::string& tap, const std::string& netns) {
  auto del = [&]() -> Result<void> {
    Sock s;
    PP_TRY(s.Connect());
    NlPtr<rtnl_link, PutLink> link;
    if (rtnl_link_get_kernel(s.sk, 0, tap.c_str(), &link.p) < 0) return Ok();
    if (int e = rtnl_link_delete(s.sk, link.p); e < 0) return NlError("delete " + tap, e);
    return Ok();
  };
  if (auto r = del(); !r.ok()) spdlog::warn("network: {}", r.error().ToString());
  if (!netns.empty() && ::access(netns.c_str(), F_OK) == 0) {
    if (auto r = InNetns(netns, del); !r.ok()) spdlog::warn("network: {}", r.error().ToString());
  }
}

}  // namespace peapod::sandboxer
