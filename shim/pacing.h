// Pacing for the shim's loops that are fed by the agent, which lives in the guest and may
// answer anything at any rate: neither may spin or flood containerd.
#pragma once

#include <chrono>
#include <cstdint>

namespace peapod::shim {

// Lets at most one event through per interval and counts the rest (OOM events: CRI needs to
// learn that a container was OOM-killed, not how many times a second).
class EventCoalescer {
 public:
  using Clock = std::chrono::steady_clock;
  explicit EventCoalescer(Clock::duration interval) : interval_(interval) {}

  struct Decision {
    bool publish = false;
    // How long to wait before asking for the next event: the rest of the interval after a
    // coalesced one, so an agent that answers at once cannot make the caller spin.
    Clock::duration wait{};
  };
  Decision Offer(Clock::time_point now);

  uint64_t published() const { return published_; }
  uint64_t coalesced() const { return coalesced_; }

 private:
  Clock::duration interval_;
  Clock::time_point last_{};
  bool any_ = false;
  uint64_t published_ = 0;
  uint64_t coalesced_ = 0;
};

// The wait after an answer to a long poll (ReadStdout) that brought nothing and no EOF: an
// honest agent does not answer so before its deadline, a hostile one may do it in a loop.
// 1 ms, doubling up to 50 ms; none after an answer with data.
class EmptyAnswerBackoff {
 public:
  static constexpr std::chrono::milliseconds kFirst{1};
  static constexpr std::chrono::milliseconds kMax{50};
  std::chrono::milliseconds Next(bool empty);

 private:
  std::chrono::milliseconds wait_{0};
};

}  // namespace peapod::shim
