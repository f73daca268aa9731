#include "podagent/stream.h"

#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>

#include <spdlog/spdlog.h>

namespace peapod::agent {

OutputStream::OutputStream(EventLoop* loop, UniqueFd fd, bool pty)
    : loop_(loop), fd_(std::move(fd)), pty_(pty) {}

OutputStream::~OutputStream() {
  if (watch_) loop_->Unwatch(watch_);
  // The process is being removed: whoever still reads gets what is left and EOF, not silence.
  auto readers = std::move(readers_);
  for (auto& p : readers) {
    if (!p.reader.waiting()) continue;
    size_t from = p.keep ? static_cast<size_t>(handed_ - base_) : 0;
    handed_ = base_ + buf_.size();
    p.reader.deliver(buf_.view().substr(from), true);
    if (!p.keep) buf_.clear();
  }
}

Result<void> OutputStream::Start() {
  PP_TRY(SetNonBlocking(fd_.get()));
  PP_ASSIGN_OR_RETURN(watch_, loop_->Watch(fd_.get(), EPOLLIN, [this](uint32_t) { OnReadable(); }));
  watching_in_ = true;
  return Ok();
}

void OutputStream::OnReadable() {
  while (!closed_ && buf_.size() < kMaxBuffered) {
    // Straight into the buffer: under TCG every copy of a stream's bytes is emulated work.
    auto [room, room_size] = buf_.Room();
    ssize_t n = ::read(fd_.get(), room, room_size);
    if (n > 0) {
      buf_.Grow(static_cast<size_t>(n));
      continue;
    }
    if (n < 0 && errno == EINTR) continue;
    if (n < 0 && errno == EAGAIN) break;
    // 0 is EOF on a pipe; a pty master reads EIO once the last slave fd is closed; a socket
    // whose peer aborted reads ECONNRESET.
    if (n < 0 && !(pty_ && errno == EIO) && errno != ECONNRESET) {
      spdlog::warn("agent: reading a stream: {}", std::strerror(errno));
    }
    closed_ = true;
    loop_->Unwatch(watch_);
    watch_ = 0;
    fd_.Reset();
  }
  UpdateWatch();
  Serve();
}

Result<void> OutputStream::Read(size_t max, std::optional<uint64_t> offset, Reader reader) {
  if (offset) {
    if (*offset < base_ || *offset > handed_) {
      return Error::Invalid(
          "read at offset {} of a stream that keeps bytes {} to {}: the reader lost its place",
          *offset, base_, handed_);
    }
    buf_.DropFront(*offset - base_);
    base_ = *offset;
    handed_ = base_;  // what follows is handed out again
  }
  readers_.push_back({std::clamp<size_t>(max, 1, kMaxRead), offset.has_value(), std::move(reader)});
  Serve();
  return Ok();
}

void OutputStream::Serve() {
  while (!readers_.empty()) {
    Pending& p = readers_.front();
    if (!p.reader.waiting()) {
      readers_.pop_front();
      continue;
    }
    // An offset reader gets what follows the bytes already handed out; a plain one, the head.
    size_t from = p.keep ? static_cast<size_t>(handed_ - base_) : 0;
    size_t avail = buf_.size() - from;
    if (avail == 0 && !closed_) break;
    size_t n = std::min(p.max, avail);
    bool eof = closed_ && from + n == buf_.size();
    auto deliver = std::move(p.reader.deliver);
    bool keep = p.keep;
    readers_.pop_front();
    // The reader copies the bytes out of buf_ during the call; only then are they dropped.
    deliver(buf_.view().substr(from, n), eof);
    if (keep) {
      handed_ += n;
    } else {
      buf_.DropFront(n);
      base_ += n;
      handed_ = std::max(handed_, base_);
    }
  }
  UpdateWatch();
}

void OutputStream::Window::DropFront(size_t n) {
  begin_ += n;
  if (begin_ == end_) begin_ = end_ = 0;
}

std::pair<char*, size_t> OutputStream::Window::Room() {
  if (!data_) data_ = std::make_unique_for_overwrite<char[]>(kMaxBuffered);
  if (end_ == kMaxBuffered && begin_ > 0) {
    std::memmove(data_.get(), data_.get() + begin_, size());
    end_ -= begin_;
    begin_ = 0;
  }
  return {data_.get() + end_, kMaxBuffered - end_};
}

void OutputStream::UpdateWatch() {
  if (!watch_) return;
  bool want = buf_.size() < kMaxBuffered;
  if (want == watching_in_) return;
  if (auto r = loop_->Modify(watch_, want ? uint32_t{EPOLLIN} : 0u); r.ok()) watching_in_ = want;
}

InputStream::InputStream(EventLoop* loop, UniqueFd fd, bool half_close)
    : loop_(loop), fd_(std::move(fd)), half_close_(half_close) {
  (void)SetNonBlocking(fd_.get());
}

InputStream::~InputStream() {
  if (watch_) loop_->Unwatch(watch_);
  Fail(Error::Make(Code::kUnavailable, "stdin closed: the process is gone"));
}

void InputStream::Write(std::string data, std::function<void(Result<uint32_t>)> done,
                        std::optional<uint64_t> offset) {
  const auto len = static_cast<uint32_t>(data.size());
  if (offset) {
    if (*offset > taken_) {
      done(Error::Invalid("write at offset {} of a stream that has taken {} bytes: a gap", *offset,
                          taken_));
      return;
    }
    uint64_t dup = std::min<uint64_t>(taken_ - *offset, data.size());
    if (dup == data.size()) {  // all of it was taken before (a re-sent write)
      done(len);
      return;
    }
    data.erase(0, dup);
  }
  if (!fd_ || close_requested_) {
    done(Error::Make(Code::kFailedPrecondition, "stdin is closed"));
    return;
  }
  taken_ += data.size();
  pending_.push_back({std::move(data), 0, [done = std::move(done), len](Result<uint32_t> n) {
                        if (!n.ok()) return done(std::move(n).error());
                        done(len);
                      }});
  Flush();
}

void InputStream::Close() {
  close_requested_ = true;
  Flush();
}

void InputStream::Flush() {
  while (fd_ && !pending_.empty()) {
    Pending& p = pending_.front();
    while (p.written < p.data.size()) {
      ssize_t n = ::write(fd_.get(), p.data.data() + p.written, p.data.size() - p.written);
      if (n > 0) {
        p.written += static_cast<size_t>(n);
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && errno == EAGAIN) {
        if (!watch_) {
          auto w = loop_->Watch(fd_.get(), EPOLLOUT, [this](uint32_t) { Flush(); });
          if (!w.ok()) return Fail(w.error());
          watch_ = *w;
        }
        return;
      }
      return Fail(Error::Errno("write to process stdin"));
    }
    auto done = std::move(p.done);
    uint32_t len = static_cast<uint32_t>(p.written);
    pending_.pop_front();
    done(len);
  }
  if (watch_) {
    loop_->Unwatch(watch_);
    watch_ = 0;
  }
  if (close_requested_ && pending_.empty() && fd_) {
    if (half_close_) ::shutdown(fd_.get(), SHUT_WR);
    fd_.Reset();
  }
}

void InputStream::Fail(const Error& e) {
  if (watch_) {
    loop_->Unwatch(watch_);
    watch_ = 0;
  }
  fd_.Reset();
  auto pending = std::move(pending_);
  pending_.clear();
  for (auto& p : pending) p.done(e);
}

}  // namespace peapod::agent
