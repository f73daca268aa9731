// libFuzzer target for everything a ttrpc peer can make us parse: the frame decoder fed in
// arbitrary chunks, the Request protobuf, and a real Server reading the bytes from a socket.
// Any crash, sanitizer report, hang or unbounded buffering is a bug.
#include <sys/socket.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <string>

#include "common/loop/event_loop.h"
#include "common/ttrpc/frame.h"
#include "common/ttrpc/server.h"
#include "ttrpc/request.pb.h"

using namespace peapod;
using namespace peapod::ttrpc;

namespace {

void FuzzDecoder(const uint8_t* data, size_t size) {
  if (size == 0) return;
  // The first byte picks the chunk size, so splits across reads get exercised too.
  size_t chunk = (data[0] % 17) + 1;
  FrameDecoder d;
  for (size_t off = 1; off < size; off += chunk) {
    size_t n = std::min(chunk, size - off);
    d.Feed(reinterpret_cast<const char*>(data + off), n);
    while (auto f = d.Next()) {
      if (f->oversized) continue;
      if (f->payload.size() > kMaxMessageSize) __builtin_trap();
      ::ttrpc::Request req;
      (void)req.ParseFromString(f->payload);
    }
    if (d.buffered() > kMaxMessageSize + kHeaderSize + chunk) __builtin_trap();
  }
}

void FuzzServer(const uint8_t* data, size_t size) {
  auto loop = EventLoop::Create();
  if (!loop.ok()) return;
  auto pair = SocketPair();
  if (!pair.ok()) return;
  Server server(loop->get());
  server.Register("peapod.test.Echo", "Echo",
                  [](const CallContext&, std::string p, Responder r) { r(std::move(p)); });
  server.Register("peapod.test.Echo", "Never", [](const CallContext&, std::string, Responder) {});
  if (!server.ServeConnection(std::move(pair->first)).ok()) return;
  int fd = pair->second.get();
  (void)SetNonBlocking(fd);
  size_t off = 0;
  bool half_closed = false;
  char sink[65536];
  // Pump until the server has read everything and closed, bounded so a bug shows as a hang
  // report rather than an endless run.
  for (int i = 0; i < 10000 && server.connection_count() > 0; ++i) {
    if (off < size) {
      ssize_t n = ::write(fd, data + off, size - off);
      if (n > 0) off += static_cast<size_t>(n);
    }
    if (off == size && !half_closed) {
      ::shutdown(fd, SHUT_WR);
      half_closed = true;
    }
    while (::read(fd, sink, sizeof(sink)) > 0) {
    }
    (*loop)->RunOnce(std::chrono::milliseconds(0));
  }
  if (off == size && server.connection_count() > 0) {
    // Every byte was delivered and the peer half-closed: the server must have hung up.
    __builtin_trap();
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzDecoder(data, size);
  FuzzServer(data, size);
  return 0;
}
