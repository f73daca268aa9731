#include "common/base/result.h"

#include <gtest/gtest.h>

#include <memory>

namespace peapod {
namespace {

Result<int> Half(int x) {
  if (x % 2 != 0) return Error::Invalid("{} is odd", x);
  return x / 2;
}

Result<int> Quarter(int x) {
  PP_ASSIGN_OR_RETURN(int h, Half(x));
  PP_ASSIGN_OR_RETURN(h, Half(h));
  return h;
}

Result<void> CheckEven(int x) {
  PP_TRY_CTX(Half(x), "check even");
  return Ok();
}

TEST(Result, HoldsValueOrError) {
  Result<int> good = Half(8);
  ASSERT_TRUE(good.ok());
  EXPECT_EQ(*good, 4);
  Result<int> bad = Half(7);
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.error().code(), Code::kInvalidArgument);
  EXPECT_EQ(bad.error().message(), "7 is odd");
}

TEST(Result, MacrosPropagateFirstError) {
  EXPECT_EQ(*Quarter(8), 2);
  auto r = Quarter(6);  // 6/2 = 3, then odd
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().message(), "3 is odd");
}

TEST(Result, VoidResultAndWrap) {
  EXPECT_TRUE(CheckEven(2).ok());
  auto r = CheckEven(3);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.error().message(), "check even: 3 is odd");
  EXPECT_EQ(r.error().code(), Code::kInvalidArgument);
}

TEST(Result, MoveOnlyValues) {
  Result<std::unique_ptr<int>> r = std::make_unique<int>(5);
  ASSERT_TRUE(r.ok());
  std::unique_ptr<int> p = std::move(r).value();
  EXPECT_EQ(*p, 5);
}

TEST(Error, ErrnoCarriesCodeAndText) {
  Error e = Error::Errno("open /nonexistent", ENOENT);
  EXPECT_EQ(e.code(), Code::kNotFound);
  EXPECT_EQ(e.sys_errno(), ENOENT);
  EXPECT_EQ(e.ToString(), "open /nonexistent: No such file or directory");
  EXPECT_EQ(Error::Errno("x", EACCES).code(), Code::kPermissionDenied);
  EXPECT_EQ(Error::Errno("x", EEXIST).code(), Code::kAlreadyExists);
  EXPECT_EQ(Error::Errno("x", EPIPE).code(), Code::kUnavailable);
}

TEST(Error, CodesAreGrpcCodes) {
  // These numbers are the wire contract with containerd; they must never move.
  EXPECT_EQ(static_cast<int>(Code::kNotFound), 5);
  EXPECT_EQ(static_cast<int>(Code::kResourceExhausted), 8);
  EXPECT_EQ(static_cast<int>(Code::kUnimplemented), 12);
  EXPECT_EQ(static_cast<int>(Code::kUnavailable), 14);
  EXPECT_EQ(CodeFromInt(14), Code::kUnavailable);
  EXPECT_EQ(CodeFromInt(99), Code::kUnknown);
  EXPECT_EQ(CodeFromInt(-1), Code::kUnknown);
  EXPECT_EQ(CodeName(Code::kDeadlineExceeded), "DEADLINE_EXCEEDED");
}

}  // namespace
}  // namespace peapod
