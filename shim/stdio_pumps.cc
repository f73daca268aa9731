#include "shim/stdio_pumps.h"

#include <fcntl.h>
#include <sys/epoll.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include <spdlog/spdlog.h>

#include "shim/pacing.h"

namespace peapod::shim {

namespace {

namespace v1 = peapod::agent::v1;

class OutputPump : public std::enable_shared_from_this<OutputPump> {
 public:
  OutputPump(EventLoop* loop, agentapi::AgentClient agent, StreamOf stream, bool err, UniqueFd out,
             std::function<void()> done)
      : loop_(loop),
        agent_(std::move(agent)),
        stream_(std::move(stream)),
        err_(err),
        out_(std::move(out)),
        done_(std::move(done)) {
    // A FIFO is written without blocking the loop: a full one is waited for with epoll.
    if (out_) ::fcntl(out_.get(), F_SETFL, ::fcntl(out_.get(), F_GETFL) | O_NONBLOCK);
  }

  void Read() {
    if (stopped_) return;
    v1::ReadStreamRequest req;
    req.set_container_id(stream_.container_id);
    req.set_exec_id(stream_.exec_id);
    req.set_max_bytes(1 << 20);
    req.set_offset(offset_);
    auto on_answer = [self = shared_from_this()](Result<v1::ReadStreamResponse> r) {
      self->OnAnswer(std::move(r));
    };
    if (err_) {
      agent_.ReadStderr(req, std::move(on_answer));
    } else {
      agent_.ReadStdout(req, std::move(on_answer));
    }
  }

 private:
  void OnAnswer(Result<v1::ReadStreamResponse> r) {
    if (stopped_) return;
    if (!r.ok()) {
      spdlog::warn("shim: {} {} stream ends: {}", stream_.container_id, err_ ? "stderr" : "stdout",
                   r.error().ToString());
      return Finish();
    }
    offset_ += r->data().size();
    eof_ = r->eof();
    empty_ = r->data().empty();
    pending_ = std::move(*r->mutable_data());
    written_ = 0;
    Flush();
  }

  // Writes what is pending; then asks for more (or ends at EOF).
  void Flush() {
    while (out_ && written_ < pending_.size()) {
      ssize_t n = ::write(out_.get(), pending_.data() + written_, pending_.size() - written_);
      if (n > 0) {
        written_ += static_cast<size_t>(n);
      } else if (n < 0 && errno == EINTR) {
        continue;
      } else if (n < 0 && errno == EAGAIN) {
        auto w = loop_->Watch(out_.get(), EPOLLOUT, [self = shared_from_this()](uint32_t) {
          self->loop_->Unwatch(std::exchange(self->watch_, 0));
          self->Flush();
        });
        if (w.ok()) {
          watch_ = *w;
          return;
        }
        spdlog::warn("shim: {}: cannot wait on its output: {}", stream_.container_id,
                     w.error().ToString());
        out_.Reset();
      } else {
        spdlog::warn("shim: {}: writing its output: {}; the rest is dropped", stream_.container_id,
                     std::strerror(errno));
        out_.Reset();
      }
    }
    pending_.clear();
    if (eof_) return Finish();
    // An answer with no data and no EOF is legal but useless; in a row, they are waited out
    // (the agent is the guest's: it must not make the shim spin).
    if (auto wait = backoff_.Next(empty_); wait.count() > 0) {
      loop_->AddTimer(wait, [self = shared_from_this()] { self->Read(); });
      return;
    }
    Read();
  }

  void Finish() {
    if (auto done = std::move(done_)) done();
    done_ = nullptr;
  }

 public:
  // containerd deleted the process while its output still flowed (children that hold it, a
  // FIFO nobody drains): stop, and close our end so containerd's reader sees EOF.
  void Stop() {
    if (stopped_) return;
    stopped_ = true;
    if (watch_) loop_->Unwatch(std::exchange(watch_, 0));
    out_.Reset();
    pending_.clear();
    Finish();
  }

 private:
  EventLoop* loop_;
  agentapi::AgentClient agent_;
  StreamOf stream_;
  bool err_;
  UniqueFd out_;
  std::function<void()> done_;
  uint64_t offset_ = 0;  // what we have: the agent keeps the rest until we say so
  std::string pending_;
  size_t written_ = 0;
  bool eof_ = false;
  bool empty_ = false;
  EventLoop::WatchId watch_ = 0;
  EmptyAnswerBackoff backoff_;
  bool stopped_ = false;
};

class InputPump : public std::enable_shared_from_this<InputPump> {
 public:
  InputPump(EventLoop* loop, agentapi::AgentClient agent, StreamOf stream, UniqueFd in)
      : loop_(loop), agent_(std::move(agent)), stream_(std::move(stream)), in_(std::move(in)) {}

  void Arm() {
    if (stopped_) return;
    auto w = loop_->Watch(in_.get(), EPOLLIN,
                          [self = shared_from_this()](uint32_t) { self->OnReadable(); });
    if (!w.ok()) {
      spdlog::warn("shim: {}: cannot wait on its stdin: {}", stream_.container_id,
                   w.error().ToString());
      return;
    }
    watch_ = *w;
  }

  void Stop() {
    if (stopped_) return;
    stopped_ = true;
    if (watch_) loop_->Unwatch(std::exchange(watch_, 0));
    in_.Reset();
  }

 private:
  void OnReadable() {
    ssize_t n = ::read(in_.get(), buf_, sizeof buf_);
    if (n < 0 && (errno == EAGAIN || errno == EINTR)) return;  // level-triggered: again later
    loop_->Unwatch(std::exchange(watch_, 0));
    if (n <= 0) return Close();  // EOF: every writer is gone, ours (CloseIO, exit) too
    v1::WriteStreamRequest w;
    w.set_container_id(stream_.container_id);
    w.set_exec_id(stream_.exec_id);
    w.set_data(buf_, static_cast<size_t>(n));
    w.set_offset(offset_);
    agent_.WriteStdin(w, [self = shared_from_this(), n](Result<v1::WriteStreamResponse> r) {
      if (self->stopped_) return;
      if (!r.ok()) {
        spdlog::warn("shim: {}: stdin ends: {}", self->stream_.container_id, r.error().ToString());
        return;
      }
      self->offset_ += static_cast<uint64_t>(n);
      self->Arm();  // (not once stopped)
    });
  }

  void Close() {
    v1::ProcessRequest c;
    c.set_container_id(stream_.container_id);
    c.set_exec_id(stream_.exec_id);
    agent_.CloseStdin(c, [self = shared_from_this()](Result<agentapi::Empty> r) {
      if (!r.ok() && r.error().code() != Code::kNotFound) {
        spdlog::warn("shim: {}: close stdin: {}", self->stream_.container_id, r.error().ToString());
      }
    });
  }

  EventLoop* loop_;
  agentapi::AgentClient agent_;
  StreamOf stream_;
  UniqueFd in_;
  EventLoop::WatchId watch_ = 0;
  uint64_t offset_ = 0;  // a write re-sent after a lost answer is taken once
  bool stopped_ = false;
  char buf_[32768];
};

}  // namespace

StopPump PumpOutput(EventLoop* loop, agentapi::AgentClient agent, StreamOf stream,
                    bool stderr_stream, UniqueFd out, std::function<void()> done) {
  auto pump = std::make_shared<OutputPump>(loop, std::move(agent), std::move(stream), stderr_stream,
                                           std::move(out), std::move(done));
  pump->Read();
  return [weak = std::weak_ptr<OutputPump>(pump)] {
    if (auto p = weak.lock()) p->Stop();
  };
}

StopPump PumpInput(EventLoop* loop, agentapi::AgentClient agent, StreamOf stream, UniqueFd in) {
  auto pump = std::make_shared<InputPump>(loop, std::move(agent), std::move(stream), std::move(in));
  pump->Arm();
  return [weak = std::weak_ptr<InputPump>(pump)] {
    if (auto p = weak.lock()) p->Stop();
  };
}

}  // namespace peapod::shim
