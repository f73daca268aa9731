#include "common/loop/event_loop.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <thread>
#include <vector>

#include "loop_fixture.h"

namespace peapod {
namespace {

using namespace std::chrono_literals;

std::unique_ptr<EventLoop> NewLoop() {
  auto loop = EventLoop::Create();
  EXPECT_TRUE(loop.ok());
  return std::move(loop).value();
}

TEST(EventLoop, FdReadiness) {
  auto loop = NewLoop();
  auto pair = SocketPair();
  ASSERT_TRUE(pair.ok());
  auto& [a, b] = *pair;
  std::string got;
  auto id = loop->Watch(b.get(), EPOLLIN, [&](uint32_t) {
    char buf[16];
    ssize_t n = ::read(b.get(), buf, sizeof(buf));
    got.append(buf, static_cast<size_t>(n));
    loop->Stop();
  });
  ASSERT_TRUE(id.ok());
  ASSERT_TRUE(WriteAll(a.get(), "ping", 4).ok());
  loop->Run();
  EXPECT_EQ(got, "ping");
}

TEST(EventLoop, TimersFireInOrderAndCancel) {
  auto loop = NewLoop();
  std::vector<int> order;
  loop->AddTimer(30ms, [&] {
    order.push_back(3);
    loop->Stop();
  });
  loop->AddTimer(10ms, [&] { order.push_back(1); });
  auto cancelled = loop->AddTimer(20ms, [&] { order.push_back(2); });
  loop->AddTimer(0ms, [&] { order.push_back(0); });
  loop->CancelTimer(cancelled);
  auto start = EventLoop::Clock::now();
  loop->Run();
  EXPECT_EQ(order, (std::vector<int>{0, 1, 3}));
  EXPECT_GE(EventLoop::Clock::now() - start, 30ms);
}

TEST(EventLoop, PostFromManyThreadsRunsEverything) {
  testing::LoopThread lt;
  std::atomic<int> count{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 1000; ++i) lt.loop()->Post([&] { count++; });
    });
  }
  for (auto& t : threads) t.join();
  // Sync posts behind everything already queued.
  lt.Sync([] {});
  EXPECT_EQ(count.load(), 4000);
}

TEST(EventLoop, PostedTasksRunOnLoopThread) {
  testing::LoopThread lt;
  bool in_loop = lt.Sync([&] { return lt.loop()->InLoopThread(); });
  EXPECT_TRUE(in_loop);
  EXPECT_FALSE(lt.loop()->InLoopThread());
}

TEST(EventLoop, CallbackMayRemoveAnotherWatchInSameBatch) {
  auto loop = NewLoop();
  auto p1 = SocketPair();
  auto p2 = SocketPair();
  ASSERT_TRUE(p1.ok() && p2.ok());
  ASSERT_TRUE(WriteAll(p1->first.get(), "x", 1).ok());
  ASSERT_TRUE(WriteAll(p2->first.get(), "y", 1).ok());
  int calls = 0;
  EventLoop::WatchId w1 = 0, w2 = 0;
  // Whichever runs first removes the other; the other must not run.
  w1 = *loop->Watch(p1->second.get(), EPOLLIN, [&](uint32_t) {
    calls++;
    loop->Unwatch(w2);
    loop->Unwatch(w1);
  });
  w2 = *loop->Watch(p2->second.get(), EPOLLIN, [&](uint32_t) {
    calls++;
    loop->Unwatch(w1);
    loop->Unwatch(w2);
  });
  loop->RunOnce(100ms);
  loop->RunOnce(10ms);
  EXPECT_EQ(calls, 1);
}

TEST(EventLoop, HangupIsReported) {
  auto loop = NewLoop();
  auto pair = SocketPair();
  ASSERT_TRUE(pair.ok());
  uint32_t seen = 0;
  ASSERT_TRUE(loop->Watch(pair->second.get(), EPOLLIN | EPOLLRDHUP,
                          [&](uint32_t ev) {
                            seen = ev;
                            loop->Stop();
                          })
                  .ok());
  pair->first.Reset();
  loop->Run();
  EXPECT_TRUE(seen & (EPOLLRDHUP | EPOLLHUP));
}

}  // namespace
}  // namespace peapod
