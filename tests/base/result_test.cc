#include "base/result.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <gtest/gtest.h>

#include <type_traits>

#include "base/unique_fd.h"

namespace vmm {
namespace {

TEST(Result, DescribeAddsStrerrorOnlyForSystemErrors) {
  const Error plain{0, "bad size"};
  const Error system{ENOENT, "open x"};
  const Error inner{EINVAL, "inner"};
  EXPECT_EQ(plain.describe(), "bad size");
  EXPECT_EQ(system.describe(), std::string("open x: ") + std::strerror(ENOENT));
  EXPECT_EQ(inner.with_context("outer").message, "outer: inner");
  EXPECT_EQ(inner.with_context("outer").code, EINVAL);
}

TEST(Result, DescribeDoesNotRepeatAReasonTheMessageAlreadyEndsWith) {
  const std::string denied = std::strerror(EACCES);
  // A message built from another error's describe() keeps its one reason.
  const Error inner{EACCES, "open /dev/kvm"};
  const Error rebuilt{EACCES, inner.describe()};
  EXPECT_EQ(rebuilt.describe(), "open /dev/kvm: " + denied);
  EXPECT_EQ(rebuilt.with_context("create the VM").describe(), "create the VM: open /dev/kvm: " + denied);
  // Built by hand, as "X: strerror" or "X (strerror)", or only the reason.
  EXPECT_EQ((Error{EACCES, "connect: " + denied}).describe(), "connect: " + denied);
  EXPECT_EQ((Error{EACCES, "connect (" + denied + ")"}).describe(), "connect (" + denied + ")");
  EXPECT_EQ((Error{EACCES, denied}).describe(), denied);
  EXPECT_EQ((Error{EACCES, ""}).describe(), denied);
  // A different reason, or the reason in the middle, is not the same thing.
  EXPECT_EQ((Error{EACCES, "spawn: " + std::string(std::strerror(ENOENT))}).describe(),
            "spawn: " + std::string(std::strerror(ENOENT)) + ": " + denied);
  EXPECT_EQ((Error{EACCES, denied + " on x"}).describe(), denied + " on x: " + denied);
}

TEST(Result, WithContextPrefixesOnlyErrors) {
  Result<int> ok = 7;
  EXPECT_EQ(with_context(ok, "ctx").value(), 7);
  Result<int> bad = fail("inner", EIO);
  auto wrapped = with_context(bad, "outer");
  ASSERT_FALSE(wrapped);
  EXPECT_EQ(wrapped.error().message, "outer: inner");
  EXPECT_EQ(wrapped.error().code, EIO);
}

TEST(Result, FailErrnoCapturesErrno) {
  errno = EBADF;
  Result<int> result = fail_errno("close");
  ASSERT_FALSE(result);
  EXPECT_EQ(result.error().code, EBADF);
}

Result<int> half(int value) {
  if (value % 2 != 0) return fail("odd", EINVAL);
  return value / 2;
}

Result<int> quarter(int value) {
  VMM_TRY_ASSIGN(halved, half(value));
  VMM_TRY(half(halved));
  return halved / 2;
}

TEST(Result, TryMacrosPropagate) {
  EXPECT_EQ(quarter(8).value(), 2);
  ASSERT_FALSE(quarter(6));  // 6 -> 3 is odd
  EXPECT_EQ(quarter(6).error().message, "odd");
  EXPECT_EQ(quarter(5).error().code, EINVAL);
}

bool is_open(int fd) { return ::fcntl(fd, F_GETFD) >= 0; }
int open_some_file() { return ::memfd_create("unique-fd-test", MFD_CLOEXEC); }

TEST(UniqueFd, IsMoveOnly) {
  static_assert(!std::is_copy_constructible_v<UniqueFd>);
  static_assert(!std::is_copy_assignable_v<UniqueFd>);
  static_assert(std::is_nothrow_move_constructible_v<UniqueFd>);
  static_assert(std::is_nothrow_move_assignable_v<UniqueFd>);
}

TEST(UniqueFd, MoveTransfersOwnershipAndDestructionCloses) {
  const int raw = open_some_file();
  ASSERT_GE(raw, 0);
  {
    UniqueFd first(raw);
    UniqueFd second(std::move(first));
    EXPECT_FALSE(first.valid());  // NOLINT(bugprone-use-after-move): moved-from is empty
    EXPECT_EQ(second.get(), raw);
    EXPECT_TRUE(is_open(raw));
  }
  EXPECT_FALSE(is_open(raw));
}

TEST(UniqueFd, MoveAssignClosesThePreviousDescriptor) {
  UniqueFd target(open_some_file());
  UniqueFd source(open_some_file());
  const int old_fd = target.get();
  const int new_fd = source.get();
  target = std::move(source);
  EXPECT_FALSE(is_open(old_fd));
  EXPECT_EQ(target.get(), new_fd);
  EXPECT_FALSE(source.valid());  // NOLINT(bugprone-use-after-move)

  auto& alias = target;
  target = std::move(alias);  // self-move keeps the descriptor
  EXPECT_TRUE(is_open(new_fd));
}

TEST(UniqueFd, ReleaseAndReset) {
  UniqueFd fd(open_some_file());
  const int raw = fd.release();
  EXPECT_FALSE(fd.valid());
  EXPECT_TRUE(is_open(raw));
  fd.reset(raw);
  EXPECT_EQ(fd.ref().get(), raw);
  fd.reset();
  EXPECT_FALSE(is_open(raw));
  EXPECT_FALSE(FdRef().valid());
}

}  // namespace
}  // namespace vmm
