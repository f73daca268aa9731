#include "common/ttrpc/connection.h"

#include <sys/socket.h>
#include <unistd.h>

namespace peapod::ttrpc {

namespace {
constexpr size_t kReadChunk = 64 * 1024;
}

Result<std::shared_ptr<Connection>> Connection::Create(EventLoop* loop, UniqueFd fd,
                                                       FrameCallback on_frame,
                                                       CloseCallback on_close) {
  PP_TRY_CTX(SetNonBlocking(fd.get()), "ttrpc connection");
  std::shared_ptr<Connection> c(
      new Connection(loop, std::move(fd), std::move(on_frame), std::move(on_close)));
  std::weak_ptr<Connection> weak = c;
  PP_ASSIGN_OR_RETURN(c->watch_,
                      loop->Watch(c->fd_.get(), EPOLLIN | EPOLLRDHUP, [weak](uint32_t events) {
                        if (auto self = weak.lock()) self->OnEvents(events);
                      }));
  return c;
}

Connection::Connection(EventLoop* loop, UniqueFd fd, FrameCallback on_frame, CloseCallback on_close)
    : loop_(loop),
      fd_(std::move(fd)),
      on_frame_(std::move(on_frame)),
      on_close_(std::move(on_close)) {}

Connection::~Connection() {
  if (watch_ != 0) loop_->Unwatch(watch_);
}

Result<void> Connection::Send(uint32_t stream_id, uint8_t type, uint8_t flags,
                              std::string_view payload) {
  if (payload.size() > kMaxMessageSize) {
    return Error::Make(Code::kResourceExhausted,
                       "message of {} bytes exceeds the ttrpc limit of {} bytes", payload.size(),
                       kMaxMessageSize);
  }
  if (closed_ || close_after_flush_) {
    return Error(Code::kUnavailable, "ttrpc connection is closed");
  }
  char header[kHeaderSize];
  EncodeHeader(FrameHeader{static_cast<uint32_t>(payload.size()), stream_id, type, flags}, header);
  if (out_pos_ == out_.size()) {
    out_.clear();
    out_pos_ = 0;
  }
  out_.append(header, kHeaderSize);
  out_.append(payload);
  Flush();
  return Ok();
}

void Connection::Flush() {
  while (!closed_ && out_pos_ < out_.size()) {
    // send(MSG_NOSIGNAL): a peer that went away is an error on this connection, not a
    // SIGPIPE for the whole process. Channels that are not sockets (a virtio-serial port)
    // take write().
    const char* data = out_.data() + out_pos_;
    size_t len = out_.size() - out_pos_;
    ssize_t n =
        is_socket_ ? ::send(fd_.get(), data, len, MSG_NOSIGNAL) : ::write(fd_.get(), data, len);
    if (n < 0 && is_socket_ && errno == ENOTSOCK) {
      is_socket_ = false;
      continue;
    }
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) break;
      Close(Error::Errno("ttrpc write"));
      return;
    }
    out_pos_ += static_cast<size_t>(n);
  }
  if (closed_) return;
  if (out_pos_ == out_.size()) {
    out_.clear();
    out_pos_ = 0;
    if (close_after_flush_) {
      Close(Error(Code::kCancelled, "connection closed after flush"));
      return;
    }
  }
  UpdateInterest();
}

void Connection::UpdateInterest() {
  uint32_t want = 0;
  if (reading_) want |= EPOLLIN | EPOLLRDHUP;
  if (out_pos_ < out_.size()) want |= EPOLLOUT;
  if (want == interest_) return;
  interest_ = want;
  (void)loop_->Modify(watch_, want);
}

void Connection::OnEvents(uint32_t events) {
  auto self = shared_from_this();  // callbacks below may drop the last outside reference
  if (events & EPOLLOUT) Flush();
  if (closed_) return;
  if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
    if (reading_) {
      ReadSome();
    } else if (events & (EPOLLHUP | EPOLLERR)) {
      Close(Error(Code::kUnavailable, "peer hung up"));
    }
  }
}

void Connection::ReadSome() {
  char buf[kReadChunk];
  // Bounded number of reads per wakeup so one busy peer cannot hog the loop.
  for (int i = 0; i < 16 && !closed_ && reading_; ++i) {
    ssize_t n = ::read(fd_.get(), buf, sizeof(buf));
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN) return;
      Close(Error::Errno("ttrpc read"));
      return;
    }
    if (n == 0) {
      if (decoder_.in_frame()) {
        Close(Error::Make(Code::kUnavailable,
                          "peer closed the connection in the middle of a frame ({} bytes pending)",
                          decoder_.buffered()));
      } else {
        Close(Error(Code::kUnavailable, "peer closed the connection"));
      }
      return;
    }
    decoder_.Feed(buf, static_cast<size_t>(n));
    while (!closed_ && reading_) {
      std::optional<Frame> f = decoder_.Next();
      if (!f) break;
      on_frame_(std::move(*f));
    }
    if (static_cast<size_t>(n) < sizeof(buf)) return;
  }
}

void Connection::CloseAfterFlush() {
  if (closed_) return;
  close_after_flush_ = true;
  reading_ = false;
  Flush();
}

void Connection::Close(Error reason) {
  if (closed_) return;
  closed_ = true;
  auto self = weak_from_this().lock();  // keep alive through the callback if shared
  if (watch_ != 0) {
    loop_->Unwatch(watch_);
    watch_ = 0;
  }
  fd_.Reset();
  out_.clear();
  out_pos_ = 0;
  if (auto cb = std::move(on_close_)) cb(reason);
  on_frame_ = nullptr;
}

}  // namespace peapod::ttrpc
