#include "common/ttrpc/connection.h"

#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <cstring>

namespace peapod::ttrpc {

namespace {
constexpr size_t kReadChunk = 64 * 1024;
constexpr int kMaxIov = 64;

Error TooLarge(size_t payload) {
  return Error::Make(Code::kResourceExhausted,
                     "message of {} bytes exceeds the ttrpc limit of {} bytes", payload,
                     kMaxMessageSize);
}
}  // namespace

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
  std::string_view parts[] = {payload};
  return SendParts(stream_id, type, flags, parts);
}

Result<void> Connection::CanQueue(size_t frame_bytes) const {
  if (frame_bytes - kHeaderSize > kMaxMessageSize) return TooLarge(frame_bytes - kHeaderSize);
  if (closed_ || close_after_flush_) {
    return Error(Code::kUnavailable, "ttrpc connection is closed");
  }
  if (max_queued_ != kNoQueueCap && queued_bytes() + frame_bytes > max_queued_) {
    // The peer is not reading: refuse rather than hold its backlog without bound.
    return Error::Make(Code::kResourceExhausted,
                       "ttrpc peer is not reading: {} bytes queued, a frame of {} would pass the "
                       "limit of {}",
                       queued_bytes(), frame_bytes, max_queued_);
  }
  return Ok();
}

Result<void> Connection::SendFrame(uint32_t stream_id, uint8_t type, uint8_t flags,
                                   std::string frame) {
  if (frame.size() < kHeaderSize) return Error::Invalid("a ttrpc frame needs its header's room");
  size_t payload = frame.size() - kHeaderSize;
  PP_TRY(CanQueue(frame.size()));
  EncodeHeader(FrameHeader{static_cast<uint32_t>(payload), stream_id, type, flags}, frame.data());
  queued_ += frame.size();
  out_.push_back(std::move(frame));
  Flush();
  // A write that finds the peer gone closes the connection inside Flush, after the close
  // callbacks ran: the caller must learn it here, or a client would wait for an answer that
  // nothing will deliver (a shim's call to a sandboxer killed a moment ago hung for minutes).
  if (closed_) return Error(Code::kUnavailable, "ttrpc connection closed while sending");
  return Ok();
}

Result<void> Connection::SendParts(uint32_t stream_id, uint8_t type, uint8_t flags,
                                   std::span<const std::string_view> parts) {
  if (parts.size() + 1 > static_cast<size_t>(kMaxIov)) {
    return Error::Invalid("a ttrpc frame in {} parts: at most {}", parts.size(), kMaxIov - 1);
  }
  size_t payload = 0;
  for (auto p : parts) payload += p.size();
  PP_TRY(CanQueue(kHeaderSize + payload));
  // The frame as pieces: the header with the small parts that follow it copied behind it (a
  // virtio-serial port queues each piece of a writev as a buffer of its own, with a
  // notification each), then the caller's other parts; `done` bytes of it are written.
  constexpr size_t kSmall = 64;
  char head[kHeaderSize + 4 * kSmall];
  EncodeHeader(FrameHeader{static_cast<uint32_t>(payload), stream_id, type, flags}, head);
  size_t head_size = kHeaderSize;
  auto part = parts.begin();
  for (; part != parts.end() && part->size() <= kSmall && head_size + part->size() <= sizeof(head);
       ++part) {
    if (!part->empty()) std::memcpy(head + head_size, part->data(), part->size());
    head_size += part->size();
  }
  std::string_view pieces[kMaxIov];
  size_t count = 0;
  pieces[count++] = std::string_view(head, head_size);
  for (; part != parts.end(); ++part) {
    if (!part->empty()) pieces[count++] = *part;
  }
  size_t total = kHeaderSize + payload;
  size_t done = 0;
  // Calls fn with each piece's bytes from `done` on.
  auto rest_of_frame = [&](auto fn) {
    size_t skip = done;
    for (size_t i = 0; i < count; ++i) {
      if (skip >= pieces[i].size()) {
        skip -= pieces[i].size();
        continue;
      }
      fn(pieces[i].substr(skip));
      skip = 0;
    }
  };
  // Behind queued frames it waits its turn; otherwise the fd takes what it can now.
  while (out_.empty() && done < total) {
    iovec iov[kMaxIov];
    int iovcnt = 0;
    rest_of_frame([&](std::string_view p) {
      iov[iovcnt++] = iovec{const_cast<char*>(p.data()), p.size()};
    });
    auto n = WriteSome(iov, iovcnt);
    if (!n) return Error(Code::kUnavailable, "ttrpc connection closed while sending");
    if (*n == 0) break;
    done += *n;
  }
  if (done < total) {
    std::string rest;
    rest.reserve(total - done);
    rest_of_frame([&](std::string_view p) { rest.append(p); });
    queued_ += rest.size();
    out_.push_back(std::move(rest));
  }
  Flush();
  if (closed_) return Error(Code::kUnavailable, "ttrpc connection closed while sending");
  return Ok();
}

std::optional<size_t> Connection::WriteSome(iovec* iov, int iovcnt) {
  for (;;) {
    ssize_t n = WriteV(iov, iovcnt);
    if (n >= 0) return static_cast<size_t>(n);
    if (errno == EINTR) continue;
    if (errno == EAGAIN) return 0;
    Close(Error::Errno("ttrpc write"));
    return std::nullopt;
  }
}

ssize_t Connection::WriteV(iovec* iov, int iovcnt) {
  // sendmsg(MSG_NOSIGNAL): a peer that went away is an error on this connection, not a
  // SIGPIPE for the whole process. Channels that are not sockets (a virtio-serial port)
  // take writev().
  if (is_socket_) {
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = static_cast<size_t>(iovcnt);
    ssize_t n = ::sendmsg(fd_.get(), &msg, MSG_NOSIGNAL);
    if (n >= 0 || errno != ENOTSOCK) return n;
    is_socket_ = false;
  }
  return ::writev(fd_.get(), iov, iovcnt);
}

void Connection::Flush() {
  bool wrote = false;
  while (!closed_ && !out_.empty()) {
    // Several frames per call; the queue holds one string per frame, freed as it is written,
    // so memory follows queued_bytes() and not the connection's history.
    iovec iov[kMaxIov];
    int iovcnt = 0;
    size_t skip = out_pos_;
    for (auto it = out_.begin(); it != out_.end() && iovcnt < kMaxIov; ++it) {
      iov[iovcnt].iov_base = const_cast<char*>(it->data()) + skip;
      iov[iovcnt].iov_len = it->size() - skip;
      ++iovcnt;
      skip = 0;
    }
    auto n = WriteSome(iov, iovcnt);
    if (!n) return;
    if (*n == 0) break;
    Consume(*n);
    wrote = true;
  }
  if (closed_) return;
  if (out_.empty()) {
    if (close_after_flush_) {
      Close(Error(Code::kCancelled, "connection closed after flush"));
      return;
    }
  }
  UpdateInterest();
  if (wrote && on_drain_ && below_low_water()) {
    auto self = weak_from_this().lock();  // the callback may drop the last outside reference
    on_drain_();
  }
}

void Connection::Consume(size_t n) {
  queued_ -= n;
  while (n > 0) {
    size_t left = out_.front().size() - out_pos_;
    if (n < left) {
      out_pos_ += n;
      return;
    }
    n -= left;
    out_.pop_front();
    out_pos_ = 0;
  }
}

void Connection::UpdateInterest() {
  uint32_t want = 0;
  // Paused, not even EPOLLRDHUP: level-triggered, it would fire on every wait while the
  // unread input stays. EPOLLHUP and EPOLLERR are reported regardless.
  if (reading_ && !paused_) want |= EPOLLIN | EPOLLRDHUP;
  if (!out_.empty()) want |= EPOLLOUT;
  if (want == interest_) return;
  interest_ = want;
  (void)loop_->Modify(watch_, want);
}

void Connection::OnEvents(uint32_t events) {
  auto self = shared_from_this();  // callbacks below may drop the last outside reference
  if (events & EPOLLOUT) Flush();
  if (closed_) return;
  if (events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
    if (reading_ && !paused_) {
      ReadSome();
    } else if (events & (EPOLLHUP | EPOLLERR)) {
      Close(Error(Code::kUnavailable, "peer hung up"));
    }
  }
}

void Connection::ReadSome() {
  char buf[kReadChunk];
  // Bounded number of reads per wakeup so one busy peer cannot hog the loop.
  for (int i = 0; i < 16 && Receiving(); ++i) {
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
    while (Receiving()) {
      std::optional<Frame> f = decoder_.Next();
      if (!f) break;
      on_frame_(std::move(*f));
    }
    if (static_cast<size_t>(n) < sizeof(buf)) return;
  }
}

void Connection::PauseReading() {
  if (closed_ || paused_) return;
  paused_ = true;
  UpdateInterest();
}

void Connection::ResumeReading() {
  if (closed_ || !paused_) return;
  paused_ = false;
  UpdateInterest();
  // Frames decoded before the pause are still in the decoder; the fd may never be readable
  // again to flush them out, so deliver them from the loop (not from inside the caller, which
  // may be in the middle of handling another connection's event).
  if (decoder_.buffered() >= kHeaderSize) {
    std::weak_ptr<Connection> weak = weak_from_this();
    loop_->Post([weak] {
      if (auto self = weak.lock()) self->DeliverBuffered();
    });
  }
}

void Connection::DeliverBuffered() {
  while (Receiving()) {
    std::optional<Frame> f = decoder_.Next();
    if (!f) break;
    on_frame_(std::move(*f));
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
  queued_ = 0;
  on_drain_ = nullptr;
  if (auto cb = std::move(on_close_)) cb(reason);
  on_frame_ = nullptr;
}

}  // namespace peapod::ttrpc
