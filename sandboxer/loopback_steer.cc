#include "sandboxer/loopback_steer.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/bpf.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

namespace peapod::sandboxer {

namespace {

long Bpf(int cmd, bpf_attr* attr) { return ::syscall(__NR_bpf, cmd, attr, sizeof(*attr)); }

bpf_insn Insn(uint8_t code, uint8_t dst, uint8_t src, int16_t off, int32_t imm) {
  bpf_insn i{};
  i.code = code;
  i.dst_reg = dst & 0xf;
  i.src_reg = src & 0xf;
  i.off = off;
  i.imm = imm;
  return i;
}

// The program, by hand (it is 23 instructions; no compiler or libbpf needed at build or run
// time). In C it would read:
//
//   if (ctx->family != AF_INET || ctx->protocol != IPPROTO_TCP ||
//       ctx->local_ip4 != htonl(INADDR_LOOPBACK)) return SK_PASS;
//   u32 key = 0;
//   struct bpf_sock* sk = bpf_map_lookup_elem(&listener_map, &key);
//   if (!sk) return SK_PASS;
//   bpf_sk_assign(ctx, sk, 0);
//   bpf_sk_release(sk);
//   return SK_PASS;
//
// SK_PASS with no socket assigned is the kernel's ordinary lookup, so anything else in the netns
// (other addresses, UDP, IPv6) is untouched.
std::vector<bpf_insn> Program(int map_fd) {
  constexpr uint8_t kMovX = BPF_ALU64 | BPF_MOV | BPF_X, kMovK = BPF_ALU64 | BPF_MOV | BPF_K;
  constexpr uint8_t kLdxW = BPF_LDX | BPF_MEM | BPF_W, kJneK = BPF_JMP | BPF_JNE | BPF_K;
  constexpr uint8_t kCall = BPF_JMP | BPF_CALL;
  constexpr int16_t kPass = 21;  // index of the final "r0 = SK_PASS"
  std::vector<bpf_insn> p;
  auto jump_to_pass = [&] { return static_cast<int16_t>(kPass - static_cast<int>(p.size()) - 1); };
  p.push_back(Insn(kMovX, 6, 1, 0, 0));  // r6 = ctx
  p.push_back(Insn(kLdxW, 2, 6, offsetof(bpf_sk_lookup, family), 0));
  p.push_back(Insn(kJneK, 2, 0, jump_to_pass(), AF_INET));
  p.push_back(Insn(kLdxW, 2, 6, offsetof(bpf_sk_lookup, protocol), 0));
  p.push_back(Insn(kJneK, 2, 0, jump_to_pass(), IPPROTO_TCP));
  p.push_back(Insn(kLdxW, 2, 6, offsetof(bpf_sk_lookup, local_ip4), 0));
  // local_ip4 is in network byte order: compare with the loopback address as it lies in memory.
  p.push_back(Insn(kJneK, 2, 0, jump_to_pass(), static_cast<int32_t>(htonl(INADDR_LOOPBACK))));
  p.push_back(Insn(BPF_ST | BPF_MEM | BPF_W, 10, 0, -4, 0));  // key = 0 on the stack
  p.push_back(Insn(kMovX, 2, 10, 0, 0));
  p.push_back(Insn(BPF_ALU64 | BPF_ADD | BPF_K, 2, 0, 0, -4));                    // r2 = &key
  p.push_back(Insn(BPF_LD | BPF_DW | BPF_IMM, 1, BPF_PSEUDO_MAP_FD, 0, map_fd));  // r1 = map
  p.push_back(Insn(0, 0, 0, 0, 0));                                               // (64-bit imm)
  p.push_back(Insn(kCall, 0, 0, 0, BPF_FUNC_map_lookup_elem));
  p.push_back(Insn(BPF_JMP | BPF_JEQ | BPF_K, 0, 0, jump_to_pass(), 0));  // no listener
  p.push_back(Insn(kMovX, 7, 0, 0, 0));                                   // r7 = sk
  p.push_back(Insn(kMovX, 1, 6, 0, 0));
  p.push_back(Insn(kMovX, 2, 7, 0, 0));
  p.push_back(Insn(kMovK, 3, 0, 0, 0));
  p.push_back(Insn(kCall, 0, 0, 0, BPF_FUNC_sk_assign));
  p.push_back(Insn(kMovX, 1, 7, 0, 0));
  p.push_back(Insn(kCall, 0, 0, 0, BPF_FUNC_sk_release));
  p.push_back(Insn(kMovK, 0, 0, 0, SK_PASS));  // index kPass
  p.push_back(Insn(BPF_JMP | BPF_EXIT, 0, 0, 0, 0));
  return p;
}

}  // namespace

Result<LoopbackSteering> SteerLoopback(const std::string& netns_path, int listener) {
  LoopbackSteering s;
  bpf_attr attr{};
  attr.map_type = BPF_MAP_TYPE_SOCKMAP;
  attr.key_size = 4;
  attr.value_size = 4;
  attr.max_entries = 1;
  s.map = UniqueFd(static_cast<int>(Bpf(BPF_MAP_CREATE, &attr)));
  if (!s.map) {
    return Error::Errno(
        "create a BPF sockmap for port forwarding (needs CAP_BPF and CAP_NET_ADMIN)");
  }
  uint32_t key = 0;
  uint32_t value = static_cast<uint32_t>(listener);
  attr = {};
  attr.map_fd = static_cast<uint32_t>(s.map.get());
  attr.key = reinterpret_cast<uintptr_t>(&key);
  attr.value = reinterpret_cast<uintptr_t>(&value);
  attr.flags = BPF_ANY;
  if (Bpf(BPF_MAP_UPDATE_ELEM, &attr) < 0) {
    return Error::Errno("put the port-forward listener into its BPF sockmap");
  }

  auto insns = Program(s.map.get());
  static const char kLicense[] = "GPL";
  std::string log(64 << 10, '\0');
  attr = {};
  attr.prog_type = BPF_PROG_TYPE_SK_LOOKUP;
  attr.expected_attach_type = BPF_SK_LOOKUP;
  attr.insns = reinterpret_cast<uintptr_t>(insns.data());
  attr.insn_cnt = static_cast<uint32_t>(insns.size());
  attr.license = reinterpret_cast<uintptr_t>(kLicense);
  attr.log_buf = reinterpret_cast<uintptr_t>(log.data());
  attr.log_size = static_cast<uint32_t>(log.size());
  attr.log_level = 1;
  std::strncpy(attr.prog_name, "peapod_pf", sizeof(attr.prog_name) - 1);
  s.prog = UniqueFd(static_cast<int>(Bpf(BPF_PROG_LOAD, &attr)));
  if (!s.prog) {
    int err = errno;
    log.resize(std::strlen(log.c_str()));
    return Error::Errno(
        "load the port-forward sk_lookup program (Linux 5.9+ needed); verifier: " + log, err);
  }

  UniqueFd ns(::open(netns_path.c_str(), O_RDONLY | O_CLOEXEC));
  if (!ns) return Error::Errno("open netns " + netns_path);
  attr = {};
  attr.link_create.prog_fd = static_cast<uint32_t>(s.prog.get());
  attr.link_create.target_fd = static_cast<uint32_t>(ns.get());
  attr.link_create.attach_type = BPF_SK_LOOKUP;
  s.link = UniqueFd(static_cast<int>(Bpf(BPF_LINK_CREATE, &attr)));
  if (!s.link) return Error::Errno("attach the port-forward program to netns " + netns_path);
  return s;
}

}  // namespace peapod::sandboxer
