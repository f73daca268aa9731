// A hostile guest channel for tests: sits where QEMU's agent port would be (the socket the
// sandboxer connects to), runs the real peapod-agent behind it and forwards whole ttrpc frames
// both ways, so a pod starts and works as usual. Once the file named by --attack-file appears,
// it reads the attack from it and turns on the host:
//
//   flood    frames of 4 MiB as fast as the host takes them: stream data on the last request
//            the host sent (the mux routes data frames to the caller), responses to ids nobody
//            asked, requests, and some frames announcing more than the ttrpc limit
//   types    frames of every type and flag combination, on random stream ids
//   silent   stops forwarding the host's requests to the agent: nothing is ever answered
//
// Usage: hostile-agent --attack-file F -- <peapod-agent command with --listen SOCKET ...>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "common/base/unique_fd.h"
#include "common/ttrpc/frame.h"

namespace {

using peapod::UniqueFd;
namespace ttrpc = peapod::ttrpc;

// Bytes read from one side, handed on in whole frames.
struct Framer {
  std::string buf;
  // The next whole frame, if one is buffered.
  bool Next(std::string* frame) {
    if (buf.size() < ttrpc::kHeaderSize) return false;
    auto h = ttrpc::DecodeHeader(buf.data());
    size_t total = ttrpc::kHeaderSize + h.length;
    if (buf.size() < total) return false;
    *frame = buf.substr(0, total);
    buf.erase(0, total);
    return true;
  }
};

std::string Frame(uint32_t length, uint32_t stream, uint8_t type, uint8_t flags,
                  size_t payload_bytes) {
  ttrpc::FrameHeader h{length, stream, type, flags};
  std::string out(ttrpc::kHeaderSize, '\0');
  ttrpc::EncodeHeader(h, out.data());
  out.append(payload_bytes, '\x5a');
  return out;
}

// Writes all of data; false if the peer went away.
bool WriteAll(int fd, const std::string& data) {
  size_t off = 0;
  while (off < data.size()) {
    ssize_t n = ::write(fd, data.data() + off, data.size() - off);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    off += static_cast<size_t>(n);
  }
  return true;
}

std::string ReadAttack(const std::string& file) {
  std::ifstream f(file);
  std::string word;
  f >> word;
  return word;
}

}  // namespace

int main(int argc, char** argv) {
  std::string attack_file;
  std::vector<std::string> agent;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    if (a == "--attack-file" && i + 1 < argc) {
      attack_file = argv[++i];
    } else if (a == "--") {
      for (++i; i < argc; ++i) agent.push_back(argv[i]);
    }
  }
  std::string outer;
  for (size_t i = 0; i + 1 < agent.size(); ++i) {
    if (agent[i] == "--listen") {
      outer = agent[i + 1];
      agent[i + 1] = outer + ".inner";
    }
  }
  if (attack_file.empty() || outer.empty()) {
    std::fprintf(stderr, "usage: hostile-agent --attack-file F -- AGENT --listen SOCK ...\n");
    return 2;
  }
  pid_t child = ::fork();
  if (child == 0) {
    std::vector<char*> args;
    for (auto& s : agent) args.push_back(s.data());
    args.push_back(nullptr);
    ::execv(args[0], args.data());
    ::_exit(127);
  }
  // The agent's own socket, once it listens.
  UniqueFd inner;
  for (int i = 0; i < 3000 && !inner; ++i) {
    auto c = peapod::ConnectUnix(outer + ".inner");
    if (c.ok()) {
      inner = std::move(*c);
    } else {
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }
  if (!inner) return 3;
  Framer from_host, from_agent;
  auto listener = peapod::ListenUnix(outer, 1);
  if (!listener.ok()) return 4;
  ::signal(SIGPIPE, SIG_IGN);
  // Like QEMU's chardev: one host connection at a time; a new one after the last went away
  // (the sandboxer's readiness probe connects and leaves first).
  UniqueFd host(::accept4(listener->get(), nullptr, nullptr, SOCK_CLOEXEC));
  if (!host) return 5;
  auto reconnect = [&]() -> bool {
    host.Reset();
    host = UniqueFd(::accept4(listener->get(), nullptr, nullptr, SOCK_CLOEXEC));
    from_host.buf.clear();
    return host.valid();
  };

  std::string attack;
  std::mt19937 rng(42);
  uint32_t next_type = 0;
  uint32_t last_request = 1;
  char buf[65536];
  for (;;) {
    if (attack.empty() && ::access(attack_file.c_str(), F_OK) == 0) {
      attack = ReadAttack(attack_file);
      std::fprintf(stderr, "hostile-agent: attack %s\n", attack.c_str());
    }
    pollfd fds[2] = {{host.get(), POLLIN, 0}, {inner.get(), POLLIN, 0}};
    int timeout = attack == "flood" || attack == "types" ? 0 : 50;
    if (::poll(fds, 2, timeout) < 0 && errno != EINTR) break;
    if (fds[0].revents & (POLLIN | POLLHUP)) {
      ssize_t n = ::read(host.get(), buf, sizeof(buf));
      if (n <= 0) {
        if (!reconnect()) break;
        continue;
      }
      from_host.buf.append(buf, static_cast<size_t>(n));
      std::string f;
      while (from_host.Next(&f)) {
        last_request = ttrpc::DecodeHeader(f.data()).stream_id;
        // Under a flood nothing is answered either: the callers' calls stay open, so the
        // stream data aimed at them is routed to them.
        if (attack != "silent" && attack != "flood" && !WriteAll(inner.get(), f)) return 6;
      }
    }
    if (fds[1].revents & (POLLIN | POLLHUP)) {
      ssize_t n = ::read(inner.get(), buf, sizeof(buf));
      if (n <= 0) break;
      from_agent.buf.append(buf, static_cast<size_t>(n));
      std::string f;
      while (from_agent.Next(&f)) {
        if (!WriteAll(host.get(), f) && !reconnect()) return 0;
      }
    }
    // Between whole frames: the attack's next frame. Writes block when the host stops reading,
    // which is what back-pressure looks like from here.
    if (attack == "flood") {
      std::string f;
      switch (rng() % 16 == 0 ? 3 : rng() % 3) {
        case 0:  // data for the last caller: routed to it while its call is open
          f = Frame(4u << 20, last_request, ttrpc::kTypeData, 0, 4u << 20);
          break;
        case 1:  // an answer to nobody
          f = Frame(4u << 20, rng() | 1u, ttrpc::kTypeResponse, 0, 4u << 20);
          break;
        case 2:  // a request to the host, which serves none
          f = Frame(4u << 20, rng() | 1u, ttrpc::kTypeRequest, 0, 4u << 20);
          break;
        default:  // more than the limit announced: the host must skip it, not buffer it
          f = Frame(64u << 20, rng() | 1u, ttrpc::kTypeResponse, 0, 64u << 20);
          break;
      }
      if (!WriteAll(host.get(), f) && !reconnect()) return 0;
    } else if (attack == "types") {
      uint8_t type = static_cast<uint8_t>(next_type & 0xff);
      uint8_t flags = static_cast<uint8_t>(next_type >> 8);
      ++next_type;
      if (!WriteAll(host.get(), Frame(64, rng(), type, flags, 64)) && !reconnect()) return 0;
    }
  }
  ::kill(child, SIGKILL);
  ::waitpid(child, nullptr, 0);
  return 0;
}
