// A few threads for blocking work (libvirt, mkfs, the filesystem), so the control loop never
// blocks.
#pragma once

#include <condition_variable>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace peapod::sandboxer {

class WorkerPool {
 public:
  explicit WorkerPool(size_t threads);
  // Finishes the queued jobs, then joins.
  ~WorkerPool();
  void Run(std::function<void()> job);

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> jobs_;
  bool quit_ = false;
  std::vector<std::thread> threads_;
};

}  // namespace peapod::sandboxer
