// A single-threaded epoll event loop with one-shot timers and cross-thread Post().
//
// The thread that calls Run() owns everything registered on the loop; other threads hand it
// work with Post() instead of sharing state under locks. Callbacks may add or remove any
// registration, including their own, while being dispatched.
#pragma once

#include <sys/epoll.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

#include "common/base/result.h"
#include "common/base/unique_fd.h"

namespace peapod {

class EventLoop {
 public:
  using Clock = std::chrono::steady_clock;
  using FdCallback = std::function<void(uint32_t events)>;
  using Task = std::function<void()>;
  using WatchId = uint64_t;
  using TimerId = uint64_t;

  static Result<std::unique_ptr<EventLoop>> Create();
  ~EventLoop();
  EventLoop(const EventLoop&) = delete;
  EventLoop& operator=(const EventLoop&) = delete;

  // Watches fd for events (EPOLLIN, EPOLLOUT...; level-triggered). The fd stays owned by the
  // caller and must outlive the watch. Loop thread only.
  Result<WatchId> Watch(int fd, uint32_t events, FdCallback cb);
  Result<void> Modify(WatchId id, uint32_t events);
  // Stops watching; pending events for this watch in the current batch are dropped.
  void Unwatch(WatchId id);

  // Runs cb once after delay. Loop thread only.
  TimerId AddTimer(std::chrono::nanoseconds delay, Task cb);
  void CancelTimer(TimerId id);

  // Thread-safe: runs task on the loop thread, in order of posting.
  void Post(Task task);
  // Thread-safe: makes Run() return after the current iteration.
  void Stop();

  // Runs until Stop(). Posted tasks that arrive before Stop() are executed.
  void Run();
  // One iteration: waits at most timeout for events (negative = until something happens).
  void RunOnce(std::chrono::milliseconds timeout);
  bool InLoopThread() const;

 private:
  struct Watcher {
    int fd;
    FdCallback cb;
  };

  EventLoop(UniqueFd epfd, UniqueFd wakefd);
  void DrainPosted();
  int NextTimeoutMs() const;
  void FireTimers();

  UniqueFd epfd_;
  UniqueFd wakefd_;  // eventfd that Post()/Stop() write to
  WatchId next_watch_ = 1;
  std::unordered_map<WatchId, std::shared_ptr<Watcher>> watchers_;

  TimerId next_timer_ = 1;
  std::multimap<Clock::time_point, TimerId> timer_queue_;
  std::unordered_map<TimerId, std::pair<Clock::time_point, Task>> timers_;

  std::mutex mu_;
  std::vector<Task> posted_;  // guarded by mu_
  std::atomic<bool> stop_{false};
  std::atomic<std::thread::id> owner_{};
};

}  // namespace peapod
