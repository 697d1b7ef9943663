// Errors are values: every fallible operation returns Result<T>, carrying the
// errno (when a system call failed) and a message that names the cause and,
// where there is one, the fix.
#pragma once

#include <cerrno>
#include <cstring>
#include <expected>
#include <string>
#include <utility>

namespace vmm {

struct Error {
  int code = 0;         // errno value; 0 when the failure is not from a system call
  std::string message;  // what failed, in words a user can act on

  // "message: strerror(code)" (or just the message when code is 0). A
  // message that already ends with the reason (built from another error's
  // describe(), or by hand) does not get it twice.
  [[nodiscard]] std::string describe() const {
    if (code == 0) return message;
    const std::string reason = std::strerror(code);
    if (message.empty()) return reason;
    if (message == reason || message.ends_with(": " + reason) || message.ends_with("(" + reason + ")"))
      return message;
    return message + ": " + reason;
  }
  // Prepends context: "context: message".
  [[nodiscard]] Error with_context(const std::string& context) const {
    return Error{code, context + ": " + message};
  }
};

template <class T = void>
using Result = std::expected<T, Error>;

// A failure that is not a system call's.
[[nodiscard]] inline std::unexpected<Error> fail(std::string message, int code = 0) {
  return std::unexpected(Error{code, std::move(message)});
}

// A failed system call: captures errno at the call.
[[nodiscard]] inline std::unexpected<Error> fail_errno(std::string message) {
  return std::unexpected(Error{errno, std::move(message)});
}

// Prefixes the error of `result` (if any) with `context`. (GCC 12's
// std::expected has no transform_error yet.)
template <class T>
[[nodiscard]] Result<T> with_context(Result<T> result, const std::string& context) {
  if (!result) return std::unexpected(result.error().with_context(context));
  return result;
}

}  // namespace vmm

// Propagates an error from a Result-returning expression, like Rust's `?`.
#define VMM_TRY(expr)                                          \
  do {                                                         \
    if (auto vmm_try_result_ = (expr); !vmm_try_result_)       \
      return std::unexpected(std::move(vmm_try_result_).error()); \
  } while (0)

// Evaluates a Result<T> expression; on success binds its value to `var`.
#define VMM_TRY_ASSIGN(var, expr)                              \
  auto var##_result_ = (expr);                                 \
  if (!var##_result_) return std::unexpected(std::move(var##_result_).error()); \
  auto var = std::move(*var##_result_)
