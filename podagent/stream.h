// A process's stdio inside the agent: output pulled by the host, input pushed by it.
//
// Back-pressure: an OutputStream buffers at most kMaxBuffered bytes, then stops reading its
// pipe until the host has pulled some. A container that writes faster than its shim reads
// blocks in write(2), like on a full pipe, instead of filling the guest's memory or the channel
// that every other container's stdio shares.
//
// Nothing written before exit is lost: EOF is reported only once the pipe (or pty) is closed by
// every writer and the buffer is empty.
#pragma once

#include <cstddef>
#include <deque>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

#include "common/base/result.h"
#include "common/base/unique_fd.h"
#include "common/loop/event_loop.h"

namespace peapod::agent {

class OutputStream {
 public:
  static constexpr size_t kMaxBuffered = 1 << 20;
  static constexpr size_t kMaxRead = 256 << 10;

  struct Reader {
    // False once the caller no longer waits (deadline passed, connection gone): the data is
    // then kept for the next reader instead of being handed to nobody.
    std::function<bool()> waiting;
    // data is valid only during the call.
    std::function<void(std::string_view data, bool eof)> deliver;
  };

  // fd: the read end of a pipe, or a pty master (where EIO means the other side closed).
  OutputStream(EventLoop* loop, UniqueFd fd, bool pty);
  ~OutputStream();
  OutputStream(const OutputStream&) = delete;
  OutputStream& operator=(const OutputStream&) = delete;

  Result<void> Start();
  // Answers as soon as there is data (at most max bytes) or EOF. Without an offset, what is
  // handed out is dropped. With one (the bytes of the stream the reader already has), what
  // precedes it is dropped and the answer starts there; what is handed out stays buffered
  // (counted against kMaxBuffered) until a later offset passes it, so a reader that lost an
  // answer reads it again. An offset before the oldest byte kept or past the newest one
  // handed out is an error, and nothing changes.
  Result<void> Read(size_t max, std::optional<uint64_t> offset, Reader reader);
  bool eof() const { return closed_ && buf_.empty(); }
  size_t buffered() const { return buf_.size(); }

 private:
  void OnReadable();
  void Serve();
  void UpdateWatch();

  EventLoop* loop_;
  UniqueFd fd_;
  bool pty_;
  EventLoop::WatchId watch_ = 0;
  bool watching_in_ = false;
  bool closed_ = false;
  // The bytes kept: a window [begin, end) of one block allocated at the first read and left
  // uninitialised (read(2) fills it; a std::string would be zeroed on every resize, one more
  // pass over the data, and every pass is emulated work under TCG). Dropping from the front
  // moves an index; the window slides back to the block's start when it reaches the end.
  class Window {
   public:
    size_t size() const { return end_ - begin_; }
    bool empty() const { return end_ == begin_; }
    std::string_view view() const { return {data_.get() + begin_, size()}; }
    void DropFront(size_t n);
    void clear() { begin_ = end_ = 0; }
    // Room after the window (the window moved to the start first if it is at the end).
    std::pair<char*, size_t> Room();
    void Grow(size_t n) { end_ += n; }

   private:
    std::unique_ptr<char[]> data_;
    size_t begin_ = 0;
    size_t end_ = 0;
  };
  Window buf_;
  uint64_t base_ = 0;    // stream offset of buf_[0]
  uint64_t handed_ = 0;  // stream offset past the last byte handed out
  struct Pending {
    size_t max;
    bool keep;  // an offset reader: leave what it gets in buf_
    Reader reader;
  };
  std::deque<Pending> readers_;
};

class InputStream {
 public:
  // fd: the write end of a pipe, or a dup of a pty master, or a socket (half_close: Close()
  // shuts down its sending side, so the peer sees EOF even while another fd reads from it).
  InputStream(EventLoop* loop, UniqueFd fd, bool half_close = false);
  ~InputStream();
  InputStream(const InputStream&) = delete;
  InputStream& operator=(const InputStream&) = delete;

  // Writes data, waiting while the pipe is full; answers how much was written (all of it,
  // unless the reader went away, which is an error). With an offset (where data starts in the
  // stream), bytes already taken by an earlier write are skipped, so a write re-sent after a
  // lost answer is taken once; a gap is an error.
  void Write(std::string data, std::function<void(Result<uint32_t>)> done,
             std::optional<uint64_t> offset = std::nullopt);
  // Closes the fd once queued writes are done, so the process sees EOF.
  void Close();
  bool closed() const { return !fd_ && pending_.empty(); }

 private:
  void Flush();
  void Fail(const Error& e);

  EventLoop* loop_;
  UniqueFd fd_;
  EventLoop::WatchId watch_ = 0;
  bool half_close_ = false;
  bool close_requested_ = false;
  uint64_t taken_ = 0;  // bytes of the stream accepted so far
  struct Pending {
    std::string data;
    size_t written = 0;
    std::function<void(Result<uint32_t>)> done;
  };
  std::deque<Pending> pending_;
};

}  // namespace peapod::agent
