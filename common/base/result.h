// Result<T> and Error: the one error type every peapod library returns.
//
// Error codes are the gRPC codes (also used by ttrpc's google.rpc.Status), so an Error crosses
// the sandboxer's gRPC server, the shim's and the agent's ttrpc servers without a translation
// table. An Error also carries the errno that caused it (0 if none) and a context string that
// says what was being done, innermost first wrapped by outer callers.
#pragma once

#include <cerrno>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

#include <fmt/format.h>

namespace peapod {

// Numeric values are the gRPC status codes; do not renumber.
enum class Code : int {
  kOk = 0,
  kCancelled = 1,
  kUnknown = 2,
  kInvalidArgument = 3,
  kDeadlineExceeded = 4,
  kNotFound = 5,
  kAlreadyExists = 6,
  kPermissionDenied = 7,
  kResourceExhausted = 8,
  kFailedPrecondition = 9,
  kAborted = 10,
  kOutOfRange = 11,
  kUnimplemented = 12,
  kInternal = 13,
  kUnavailable = 14,
  kDataLoss = 15,
  kUnauthenticated = 16,
};

std::string_view CodeName(Code code);
// Maps a wire status code (any int) onto Code; unknown values become kUnknown.
Code CodeFromInt(int value);
// The code that best describes a failed system call with this errno.
Code CodeFromErrno(int err);

class Error {
 public:
  Error(Code code, std::string message, int err = 0)
      : code_(code), errno_(err), message_(std::move(message)) {}

  // A failed system call: code from errno, message says what was being done.
  static Error Errno(std::string what, int err = errno) {
    return Error(CodeFromErrno(err), std::move(what), err);
  }
  template <typename... Args>
  static Error Invalid(fmt::format_string<Args...> f, Args&&... args) {
    return Error(Code::kInvalidArgument, fmt::format(f, std::forward<Args>(args)...));
  }
  template <typename... Args>
  static Error NotFound(fmt::format_string<Args...> f, Args&&... args) {
    return Error(Code::kNotFound, fmt::format(f, std::forward<Args>(args)...));
  }
  template <typename... Args>
  static Error Internal(fmt::format_string<Args...> f, Args&&... args) {
    return Error(Code::kInternal, fmt::format(f, std::forward<Args>(args)...));
  }
  template <typename... Args>
  static Error Make(Code code, fmt::format_string<Args...> f, Args&&... args) {
    return Error(code, fmt::format(f, std::forward<Args>(args)...));
  }

  Code code() const { return code_; }
  int sys_errno() const { return errno_; }
  const std::string& message() const { return message_; }

  // Prepends what the caller was doing: "attach rootfs: open /dev/sdb: No such file".
  Error&& Wrap(std::string_view context) && {
    message_ = fmt::format("{}: {}", context, message_);
    return std::move(*this);
  }
  Error Wrap(std::string_view context) const& { return Error(*this).Wrap(context); }

  // Human-readable: message, then strerror when an errno is attached.
  std::string ToString() const;

 private:
  Code code_;
  int errno_;
  std::string message_;
};

template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::in_place_index<0>, std::move(value)) {}  // NOLINT: implicit by design
  Result(Error error) : v_(std::in_place_index<1>, std::move(error)) {}  // NOLINT

  bool ok() const { return v_.index() == 0; }
  explicit operator bool() const { return ok(); }

  T& value() & { return std::get<0>(v_); }
  const T& value() const& { return std::get<0>(v_); }
  T&& value() && { return std::get<0>(std::move(v_)); }
  T& operator*() & { return value(); }
  const T& operator*() const& { return value(); }
  T&& operator*() && { return std::move(*this).value(); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }

  const Error& error() const& { return std::get<1>(v_); }
  Error&& error() && { return std::get<1>(std::move(v_)); }

 private:
  std::variant<T, Error> v_;
};

template <>
class [[nodiscard]] Result<void> {
 public:
  Result() = default;
  Result(Error error) : err_(std::move(error)) {}  // NOLINT: implicit by design

  bool ok() const { return !err_.has_value(); }
  explicit operator bool() const { return ok(); }
  const Error& error() const& { return *err_; }
  Error&& error() && { return std::move(*err_); }

 private:
  std::optional<Error> err_;
};

inline Result<void> Ok() { return {}; }

}  // namespace peapod

#define PEAPOD_CONCAT_INNER(a, b) a##b
#define PEAPOD_CONCAT(a, b) PEAPOD_CONCAT_INNER(a, b)

// Returns the error of a failed Result<...> from the enclosing function.
#define PP_TRY(expr)                                                    \
  do {                                                                  \
    auto&& pp_try_result_ = (expr);                                     \
    if (!pp_try_result_.ok()) return std::move(pp_try_result_).error(); \
  } while (0)

// Like PP_TRY, but prepends context to the error.
#define PP_TRY_CTX(expr, ctx)                                                     \
  do {                                                                            \
    auto&& pp_try_result_ = (expr);                                               \
    if (!pp_try_result_.ok()) return std::move(pp_try_result_).error().Wrap(ctx); \
  } while (0)

// `PP_ASSIGN_OR_RETURN(auto fd, OpenFoo());` declares or assigns lhs from a Result's value.
#define PP_ASSIGN_OR_RETURN(lhs, expr) \
  PP_ASSIGN_OR_RETURN_IMPL(PEAPOD_CONCAT(pp_result_, __LINE__), lhs, expr)
#define PP_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                             \
  if (!tmp.ok()) return std::move(tmp).error();  \
  lhs = std::move(tmp).value()
