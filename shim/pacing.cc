#include "shim/pacing.h"

#include <algorithm>

namespace peapod::shim {

EventCoalescer::Decision EventCoalescer::Offer(Clock::time_point now) {
  if (any_ && now - last_ < interval_) {
    ++coalesced_;
    return {false, last_ + interval_ - now};
  }
  any_ = true;
  last_ = now;
  ++published_;
  return {true, Clock::duration::zero()};
}

std::chrono::milliseconds EmptyAnswerBackoff::Next(bool empty) {
  if (!empty) {
    wait_ = std::chrono::milliseconds(0);
  } else {
    wait_ = wait_.count() == 0 ? kFirst : std::min(wait_ * 2, kMax);
  }
  return wait_;
}

}  // namespace peapod::shim
