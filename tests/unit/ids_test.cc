#include "common/base/ids.h"

#include <gtest/gtest.h>

#include <string>

namespace peapod {
namespace {

TEST(IdsTest, AcceptsWhatContainerdAndKubernetesUse) {
  EXPECT_TRUE(IsValidId("c1"));
  EXPECT_TRUE(IsValidId("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"));
  EXPECT_TRUE(IsValidId("my-pod_1.x"));
  EXPECT_TRUE(IsValidId(std::string(128, 'a')));
}

TEST(IdsTest, RefusesWhatCouldEscapeAPathOrConfuseAName) {
  for (const char* bad :
       {"", ".", "..", "../escape", "a/b", "-x", "_x", ".x", "a b", "a:b", "a\n", "ä"}) {
    EXPECT_FALSE(IsValidId(bad)) << bad;
  }
  EXPECT_FALSE(IsValidId(std::string(129, 'a')));
}

}  // namespace
}  // namespace peapod
