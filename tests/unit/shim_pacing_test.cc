// The shim's pacing of loops the agent feeds: OOM events coalesced, empty answers backed off.
#include <gtest/gtest.h>

#include "shim/pacing.h"

namespace peapod::shim {
namespace {

using namespace std::chrono_literals;

TEST(ShimPacing, OomEventsAreCoalescedToOnePerInterval) {
  EventCoalescer c(1s);
  auto t0 = EventCoalescer::Clock::time_point() + 100s;
  EXPECT_TRUE(c.Offer(t0).publish);
  // A guest that answers 1000 times at once: none of them published, each told to wait out
  // the rest of the interval.
  for (int i = 0; i < 1000; ++i) {
    auto d = c.Offer(t0 + std::chrono::microseconds(i));
    EXPECT_FALSE(d.publish);
    EXPECT_EQ(d.wait, 1s - std::chrono::microseconds(i));
  }
  auto d = c.Offer(t0 + 1s);
  EXPECT_TRUE(d.publish);
  EXPECT_EQ(d.wait, EventCoalescer::Clock::duration::zero());
  EXPECT_FALSE(c.Offer(t0 + 1500ms).publish);
  EXPECT_TRUE(c.Offer(t0 + 2s).publish);
  EXPECT_EQ(c.published(), 3u);
  EXPECT_EQ(c.coalesced(), 1001u);
}

TEST(ShimPacing, EmptyAnswersAreBackedOffUpTo50Ms) {
  EmptyAnswerBackoff b;
  EXPECT_EQ(b.Next(false), 0ms);
  std::vector<std::chrono::milliseconds> waits;
  for (int i = 0; i < 9; ++i) waits.push_back(b.Next(true));
  EXPECT_EQ(waits, (std::vector<std::chrono::milliseconds>{1ms, 2ms, 4ms, 8ms, 16ms, 32ms, 50ms,
                                                           50ms, 50ms}));
  // Data resets it.
  EXPECT_EQ(b.Next(false), 0ms);
  EXPECT_EQ(b.Next(true), 1ms);
}

}  // namespace
}  // namespace peapod::shim
