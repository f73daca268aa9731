// A framed ttrpc byte stream on an EventLoop: non-blocking reads into a FrameDecoder and a
// write queue flushed when the fd is writable. Works on any stream fd: unix sockets,
// socketpairs, virtio-serial ports. Loop thread only.
//
// The write queue is bounded: Send refuses a frame that would take it past a hard cap, and a
// producer that forwards someone else's data (AgentMux) watches the high-water mark, pauses
// its source, and goes on once OnDrain says the queue is below the low-water mark again.
#pragma once

#include <sys/uio.h>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>

#include "common/base/result.h"
#include "common/base/unique_fd.h"
#include "common/loop/event_loop.h"
#include "common/ttrpc/frame.h"

namespace peapod::ttrpc {

// Write queue bounds, in bytes of encoded frames. A ttrpc message is at most 4 MiB
// (kMaxMessageSize): the high-water mark is two of them, the hard cap four, so a producer that
// stops at the high-water mark never reaches the cap with one more frame.
constexpr size_t kQueueHighWater = 8u << 20;
constexpr size_t kQueueLowWater = 2u << 20;
constexpr size_t kQueueHardCap = 16u << 20;
// For a connection whose queue is fed only by its own process (the guest agent's answers to
// the host, which pauses reading while one of its clients is slow): never refuse a frame.
constexpr size_t kNoQueueCap = SIZE_MAX;

class Connection : public std::enable_shared_from_this<Connection> {
 public:
  using FrameCallback = std::function<void(Frame&&)>;
  // Called once when the connection is closed, by either side or by an I/O error.
  using CloseCallback = std::function<void(const Error&)>;

  static Result<std::shared_ptr<Connection>> Create(EventLoop* loop, UniqueFd fd,
                                                    FrameCallback on_frame, CloseCallback on_close);
  ~Connection();

  // Sends one frame: written at once as far as the fd takes it, the rest queued. A payload over
  // kMaxMessageSize, or a frame that would take the queue past max_queued_bytes(), is refused
  // with kResourceExhausted and nothing is sent; a closed connection gives kUnavailable.
  Result<void> Send(uint32_t stream_id, uint8_t type, uint8_t flags, std::string_view payload);
  // The same for a payload in pieces the caller owns, valid only during the call: with nothing
  // queued, the frame goes to the fd straight from them (writev), and only what the fd did not
  // take is copied into the queue (stream data: every copy costs the guest's emulated CPU
  // under TCG).
  Result<void> SendParts(uint32_t stream_id, uint8_t type, uint8_t flags,
                         std::span<const std::string_view> parts);
  // The same for a frame the caller already laid out in a string: kHeaderSize bytes this fills
  // in, then the payload; the string itself is queued.
  Result<void> SendFrame(uint32_t stream_id, uint8_t type, uint8_t flags, std::string frame);
  // Closes now; queued output is dropped. on_close runs with the given reason.
  void Close(Error reason = Error(Code::kCancelled, "connection closed locally"));
  // Stops reading, flushes what is queued, then closes.
  void CloseAfterFlush();

  bool closed() const { return closed_; }
  size_t queued_bytes() const { return queued_; }
  bool over_high_water() const { return queued_bytes() >= kQueueHighWater; }
  bool below_low_water() const { return queued_bytes() < kQueueLowWater; }

  // The hard cap on queued bytes (kQueueHardCap unless set; kNoQueueCap for none).
  void set_max_queued_bytes(size_t n) { max_queued_ = n; }
  size_t max_queued_bytes() const { return max_queued_; }

  // Runs after queued bytes were written and the queue is below the low-water mark, i.e.
  // whenever a paused producer may look again. It may run inside Send (which flushes at once)
  // and must not close this connection.
  void SetOnDrain(std::function<void()> cb) { on_drain_ = std::move(cb); }

  // Back-pressure on the peer: stop reading (the fd is no longer watched for input, so the
  // peer's writes stay in the kernel's buffers and then block it) and go on later. Frames
  // already decoded but not delivered are delivered after ResumeReading, from the loop, in
  // order. A paused connection still notices a peer that hangs up.
  void PauseReading();
  void ResumeReading();
  bool reading_paused() const { return paused_; }

 private:
  Connection(EventLoop* loop, UniqueFd fd, FrameCallback on_frame, CloseCallback on_close);
  void OnEvents(uint32_t events);
  void ReadSome();
  void Flush();
  // One writev (sendmsg on a socket, so that a peer gone is not a SIGPIPE); -1 with errno.
  ssize_t WriteV(iovec* iov, int iovcnt);
  // WriteV until it writes or cannot now: the bytes written, 0 when the fd takes none now,
  // nullopt when the write failed and the connection is closed.
  std::optional<size_t> WriteSome(iovec* iov, int iovcnt);
  Result<void> CanQueue(size_t frame_bytes) const;
  void UpdateInterest();
  void Consume(size_t n);  // n bytes of the queue were written
  void DeliverBuffered();
  bool Receiving() const { return !closed_ && reading_ && !paused_; }

  EventLoop* loop_;
  UniqueFd fd_;
  EventLoop::WatchId watch_ = 0;
  FrameCallback on_frame_;
  CloseCallback on_close_;
  std::function<void()> on_drain_;
  FrameDecoder decoder_;
  std::deque<std::string> out_;  // one encoded frame each
  size_t out_pos_ = 0;           // bytes of out_.front() already written
  size_t queued_ = 0;            // bytes in out_ not yet written
  bool closed_ = false;
  bool reading_ = true;
  bool close_after_flush_ = false;
  bool paused_ = false;
  size_t max_queued_ = kQueueHardCap;
  bool is_socket_ = true;                     // until sendmsg() says ENOTSOCK
  uint32_t interest_ = EPOLLIN | EPOLLRDHUP;  // what the watch is armed for
};

}  // namespace peapod::ttrpc
