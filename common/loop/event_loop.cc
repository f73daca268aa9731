#include "common/loop/event_loop.h"

#include <sys/eventfd.h>
#include <unistd.h>

#include <algorithm>
#include <climits>

namespace peapod {

namespace {
// epoll data value of the wake eventfd; watch ids start at 1.
constexpr uint64_t kWakeId = 0;
constexpr int kMaxEvents = 64;
}  // namespace

Result<std::unique_ptr<EventLoop>> EventLoop::Create() {
  UniqueFd epfd(::epoll_create1(EPOLL_CLOEXEC));
  if (!epfd) return Error::Errno("epoll_create1");
  UniqueFd wakefd(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!wakefd) return Error::Errno("eventfd");
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.u64 = kWakeId;
  if (::epoll_ctl(epfd.get(), EPOLL_CTL_ADD, wakefd.get(), &ev) < 0) {
    return Error::Errno("epoll_ctl(ADD eventfd)");
  }
  return std::unique_ptr<EventLoop>(new EventLoop(std::move(epfd), std::move(wakefd)));
}

EventLoop::EventLoop(UniqueFd epfd, UniqueFd wakefd)
    : epfd_(std::move(epfd)), wakefd_(std::move(wakefd)) {}

EventLoop::~EventLoop() = default;

bool EventLoop::InLoopThread() const {
  std::thread::id owner = owner_.load();
  // Before Run() the creating thread sets things up.
  return owner == std::thread::id() || owner == std::this_thread::get_id();
}

Result<EventLoop::WatchId> EventLoop::Watch(int fd, uint32_t events, FdCallback cb) {
  WatchId id = next_watch_++;
  epoll_event ev{};
  ev.events = events;
  ev.data.u64 = id;
  if (::epoll_ctl(epfd_.get(), EPOLL_CTL_ADD, fd, &ev) < 0) {
    return Error::Errno(fmt::format("epoll_ctl(ADD fd {})", fd));
  }
  watchers_.emplace(id, std::make_shared<Watcher>(Watcher{fd, std::move(cb)}));
  return id;
}

Result<void> EventLoop::Modify(WatchId id, uint32_t events) {
  auto it = watchers_.find(id);
  if (it == watchers_.end()) return Error::NotFound("no watch {}", id);
  epoll_event ev{};
  ev.events = events;
  ev.data.u64 = id;
  if (::epoll_ctl(epfd_.get(), EPOLL_CTL_MOD, it->second->fd, &ev) < 0) {
    return Error::Errno(fmt::format("epoll_ctl(MOD fd {})", it->second->fd));
  }
  return Ok();
}

void EventLoop::Unwatch(WatchId id) {
  auto it = watchers_.find(id);
  if (it == watchers_.end()) return;
  // The fd may already be closed by its owner; epoll drops closed fds itself, so ignore errors.
  ::epoll_ctl(epfd_.get(), EPOLL_CTL_DEL, it->second->fd, nullptr);
  watchers_.erase(it);
}

EventLoop::TimerId EventLoop::AddTimer(std::chrono::nanoseconds delay, Task cb) {
  TimerId id = next_timer_++;
  auto when = Clock::now() + delay;
  timer_queue_.emplace(when, id);
  timers_.emplace(id, std::make_pair(when, std::move(cb)));
  return id;
}

void EventLoop::CancelTimer(TimerId id) {
  auto it = timers_.find(id);
  if (it == timers_.end()) return;
  auto range = timer_queue_.equal_range(it->second.first);
  for (auto q = range.first; q != range.second; ++q) {
    if (q->second == id) {
      timer_queue_.erase(q);
      break;
    }
  }
  timers_.erase(it);
}

void EventLoop::Post(Task task) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    posted_.push_back(std::move(task));
  }
  uint64_t one = 1;
  // A full counter (EAGAIN) still means the loop will wake; nothing else can fail here.
  [[maybe_unused]] ssize_t n = ::write(wakefd_.get(), &one, sizeof(one));
}

void EventLoop::Stop() {
  stop_.store(true);
  uint64_t one = 1;
  [[maybe_unused]] ssize_t n = ::write(wakefd_.get(), &one, sizeof(one));
}

void EventLoop::DrainPosted() {
  std::vector<Task> batch;
  {
    std::lock_guard<std::mutex> lock(mu_);
    batch.swap(posted_);
  }
  for (auto& task : batch) task();
}

int EventLoop::NextTimeoutMs() const {
  if (timer_queue_.empty()) return -1;
  auto delta = timer_queue_.begin()->first - Clock::now();
  if (delta <= Clock::duration::zero()) return 0;
  // Round up so a timer never fires early.
  auto ms = std::chrono::ceil<std::chrono::milliseconds>(delta).count();
  return static_cast<int>(std::min<int64_t>(ms, INT_MAX));
}

void EventLoop::FireTimers() {
  auto now = Clock::now();
  while (!timer_queue_.empty() && timer_queue_.begin()->first <= now) {
    TimerId id = timer_queue_.begin()->second;
    timer_queue_.erase(timer_queue_.begin());
    auto it = timers_.find(id);
    if (it == timers_.end()) continue;
    Task cb = std::move(it->second.second);
    timers_.erase(it);
    cb();
  }
}

void EventLoop::RunOnce(std::chrono::milliseconds timeout) {
  owner_.store(std::this_thread::get_id());
  int wait_ms = NextTimeoutMs();
  int limit = timeout.count() < 0 ? -1 : static_cast<int>(timeout.count());
  if (wait_ms < 0 || (limit >= 0 && limit < wait_ms)) wait_ms = limit;

  epoll_event events[kMaxEvents];
  int n = ::epoll_wait(epfd_.get(), events, kMaxEvents, wait_ms);
  if (n < 0) n = 0;  // EINTR: just run timers and posted tasks
  for (int i = 0; i < n; ++i) {
    uint64_t id = events[i].data.u64;
    if (id == kWakeId) {
      uint64_t count;
      [[maybe_unused]] ssize_t r = ::read(wakefd_.get(), &count, sizeof(count));
      continue;
    }
    auto it = watchers_.find(id);
    if (it == watchers_.end()) continue;  // removed by an earlier callback in this batch
    // Hold a reference: the callback may Unwatch() itself.
    std::shared_ptr<Watcher> w = it->second;
    w->cb(events[i].events);
  }
  FireTimers();
  DrainPosted();
}

void EventLoop::Run() {
  owner_.store(std::this_thread::get_id());
  while (!stop_.load()) RunOnce(std::chrono::milliseconds(-1));
  DrainPosted();
  stop_.store(false);
}

}  // namespace peapod
