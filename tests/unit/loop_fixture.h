// Runs an EventLoop on a background thread for tests that drive it from the test thread.
#pragma once

#include <future>
#include <memory>
#include <thread>

#include <gtest/gtest.h>

#include "common/loop/event_loop.h"

namespace peapod::testing {

class LoopThread {
 public:
  LoopThread() {
    auto loop = EventLoop::Create();
    if (!loop.ok()) throw std::runtime_error(loop.error().ToString());
    loop_ = std::move(loop).value();
    thread_ = std::thread([this] { loop_->Run(); });
  }
  ~LoopThread() {
    loop_->Stop();
    thread_.join();
  }
  EventLoop* loop() { return loop_.get(); }

  // Runs fn on the loop thread and returns its result.
  template <typename Fn>
  auto Sync(Fn fn) -> decltype(fn()) {
    using R = decltype(fn());
    std::promise<R> p;
    auto f = p.get_future();
    loop_->Post([&] {
      if constexpr (std::is_void_v<R>) {
        fn();
        p.set_value();
      } else {
        p.set_value(fn());
      }
    });
    return f.get();
  }

 private:
  std::unique_ptr<EventLoop> loop_;
  std::thread thread_;
};

}  // namespace peapod::testing
