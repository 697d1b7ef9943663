// The transfer live update's channel: messages keep their boundaries, carry
// descriptors to the same open files, and a dead peer or a deadline is
// reported as such.
#include "migration/fd_channel.h"

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <sys/stat.h>

#include <string>
#include <vector>

namespace vmm::migration {
namespace {

using namespace std::chrono_literals;

std::pair<FdChannel, FdChannel> make_pair() {
  auto ends = FdChannel::pair();
  EXPECT_TRUE(ends.has_value()) << ends.error().describe();
  return std::move(*ends);
}

TEST(FdChannel, MessagesKeepTheirBoundariesAndOrder) {
  auto [a, b] = make_pair();
  ASSERT_TRUE(a.send("first"));
  ASSERT_TRUE(a.send(""));
  ASSERT_TRUE(a.send(std::string(10000, 'x')));
  auto first = b.receive(1s);
  ASSERT_TRUE(first) << first.error().describe();
  EXPECT_EQ(first->payload, "first");
  auto empty = b.receive(1s);
  ASSERT_TRUE(empty) << empty.error().describe();
  EXPECT_EQ(empty->payload, "") << "an empty message is not an end of stream";
  auto big = b.receive(1s);
  ASSERT_TRUE(big);
  EXPECT_EQ(big->payload.size(), 10000u);
}

TEST(FdChannel, DescriptorsArriveAsTheSameOpenFiles) {
  auto [a, b] = make_pair();
  UniqueFd memfd(::memfd_create("channel-test", MFD_CLOEXEC));
  ASSERT_TRUE(memfd);
  ASSERT_EQ(::ftruncate(memfd.get(), 4096), 0);
  const FdRef sent[] = {memfd.ref(), memfd.ref()};
  ASSERT_TRUE(a.send("files", sent));
  auto message = b.receive(1s);
  ASSERT_TRUE(message) << message.error().describe();
  ASSERT_EQ(message->fds.size(), 2u);
  struct stat original{}, received{};
  ASSERT_EQ(::fstat(memfd.get(), &original), 0);
  ASSERT_EQ(::fstat(message->fds[0].get(), &received), 0);
  EXPECT_EQ(received.st_ino, original.st_ino);
  EXPECT_EQ(received.st_dev, original.st_dev);
  EXPECT_NE(message->fds[0].get(), memfd.get()) << "a new descriptor in the receiver";
  EXPECT_TRUE(::fcntl(message->fds[0].get(), F_GETFD) & FD_CLOEXEC) << "received close-on-exec";
  // Written through one, read through the other: the same pages.
  const char text[] = "shared";
  ASSERT_EQ(::pwrite(memfd.get(), text, sizeof text, 0), static_cast<ssize_t>(sizeof text));
  char back[sizeof text] = {};
  ASSERT_EQ(::pread(message->fds[1].get(), back, sizeof back, 0), static_cast<ssize_t>(sizeof back));
  EXPECT_STREQ(back, text);
}

TEST(FdChannel, TooManyDescriptorsOrBytesAreRefusedBeforeSending) {
  auto [a, b] = make_pair();
  UniqueFd memfd(::memfd_create("channel-test", MFD_CLOEXEC));
  std::vector<FdRef> many(FdChannel::kMaxFds + 1, memfd.ref());
  EXPECT_FALSE(a.send("x", many));
  EXPECT_FALSE(a.send(std::string(FdChannel::kMaxPayload + 1, 'x')));
  auto nothing = b.receive(0ms);
  ASSERT_FALSE(nothing);
  EXPECT_EQ(nothing.error().code, ETIMEDOUT);
}

TEST(FdChannel, AZeroTimeoutStillFindsAQueuedMessage) {
  auto [a, b] = make_pair();
  ASSERT_TRUE(a.send("queued"));
  auto message = b.receive(0ms);
  ASSERT_TRUE(message) << message.error().describe();
  EXPECT_EQ(message->payload, "queued");
}

TEST(FdChannel, TheDeadlineIsReported) {
  auto [a, b] = make_pair();
  const auto begin = std::chrono::steady_clock::now();
  auto nothing = b.receive(50ms);
  ASSERT_FALSE(nothing);
  EXPECT_EQ(nothing.error().code, ETIMEDOUT);
  EXPECT_GE(std::chrono::steady_clock::now() - begin, 50ms);
}

TEST(FdChannel, AClosedPeerReadsAsConnectionReset) {
  auto [a, b] = make_pair();
  ASSERT_TRUE(a.send("last words"));
  { FdChannel gone = std::move(a); }
  auto last = b.receive(1s);
  ASSERT_TRUE(last);
  EXPECT_EQ(last->payload, "last words") << "what was sent before the close still arrives";
  auto after = b.receive(1s);
  ASSERT_FALSE(after);
  EXPECT_EQ(after.error().code, ECONNRESET);
  EXPECT_FALSE(b.send("anyone?"));
}

TEST(FdChannel, AdoptRefusesWhatIsNotASeqpacketSocket) {
  UniqueFd memfd(::memfd_create("channel-test", MFD_CLOEXEC));
  EXPECT_FALSE(FdChannel::adopt(std::move(memfd)));
  EXPECT_FALSE(FdChannel::adopt(UniqueFd()));
}

}  // namespace
}  // namespace vmm::migration
