// A framed ttrpc byte stream on an EventLoop: non-blocking reads into a FrameDecoder and a
// write queue flushed when the fd is writable. Works on any stream fd: unix sockets,
// socketpairs, virtio-serial ports. Loop thread only.
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "common/base/result.h"
#include "common/base/unique_fd.h"
#include "common/loop/event_loop.h"
#include "common/ttrpc/frame.h"

namespace peapod::ttrpc {

class Connection : public std::enable_shared_from_this<Connection> {
 public:
  using FrameCallback = std::function<void(Frame&&)>;
  // Called once when the connection is closed, by either side or by an I/O error.
  using CloseCallback = std::function<void(const Error&)>;

  static Result<std::shared_ptr<Connection>> Create(EventLoop* loop, UniqueFd fd,
                                                    FrameCallback on_frame, CloseCallback on_close);
  ~Connection();

  // Queues one frame. A payload over kMaxMessageSize is refused with kResourceExhausted and
  // nothing is sent; a closed connection gives kUnavailable.
  Result<void> Send(uint32_t stream_id, uint8_t type, uint8_t flags, std::string_view payload);
  // Closes now; queued output is dropped. on_close runs with the given reason.
  void Close(Error reason = Error(Code::kCancelled, "connection closed locally"));
  // Stops reading, flushes what is queued, then closes.
  void CloseAfterFlush();

  bool closed() const { return closed_; }
  size_t queued_bytes() const { return out_.size() - out_pos_; }

 private:
  Connection(EventLoop* loop, UniqueFd fd, FrameCallback on_frame, CloseCallback on_close);
  void OnEvents(uint32_t events);
  void ReadSome();
  void Flush();
  void UpdateInterest();

  EventLoop* loop_;
  UniqueFd fd_;
  EventLoop::WatchId watch_ = 0;
  FrameCallback on_frame_;
  CloseCallback on_close_;
  FrameDecoder decoder_;
  std::string out_;
  size_t out_pos_ = 0;
  bool closed_ = false;
  bool reading_ = true;
  bool close_after_flush_ = false;
  bool is_socket_ = true;                     // until send() says ENOTSOCK
  uint32_t interest_ = EPOLLIN | EPOLLRDHUP;  // what the watch is armed for
};

}  // namespace peapod::ttrpc
