#include "migration/fd_channel.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <cstring>

#include <fmt/format.h>

#include "base/fd_passing.h"

namespace vmm::migration {

Result<std::pair<FdChannel, FdChannel>> FdChannel::pair() {
  int fds[2];
  if (::socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, fds) != 0)
    return fail_errno("cannot create the transfer socket pair");
  return std::pair{FdChannel(UniqueFd(fds[0])), FdChannel(UniqueFd(fds[1]))};
}

Result<FdChannel> FdChannel::adopt(UniqueFd socket) {
  int type = 0;
  socklen_t length = sizeof type;
  if (!socket || ::getsockopt(socket.get(), SOL_SOCKET, SO_TYPE, &type, &length) != 0)
    return fail_errno(fmt::format("descriptor {} is not a socket", socket.get()));
  if (type != SOCK_SEQPACKET) return fail(fmt::format("descriptor {} is not a SOCK_SEQPACKET socket", socket.get()));
  ::fcntl(socket.get(), F_SETFD, FD_CLOEXEC);
  return FdChannel(std::move(socket));
}

Result<void> FdChannel::send(std::string_view payload, std::span<const FdRef> fds) const {
  if (fds.size() > kMaxFds) return fail(fmt::format("{} descriptors in one message; at most {}", fds.size(), kMaxFds));
  if (payload.size() > kMaxPayload)
    return fail(fmt::format("a {}-byte message; at most {}", payload.size(), kMaxPayload));
  char empty = 0;
  // A zero-length SEQPACKET message reads as EOF: an empty payload goes as one NUL.
  const std::string_view bytes = payload.empty() ? std::string_view(&empty, 1) : payload;
  auto sent = send_with_fds(socket_.ref(), bytes, fds, 0, kMaxFds);
  if (sent) return {};
  const int code = sent.error().code;
  if (code == EPIPE || code == ECONNRESET) return fail("the other process closed the transfer channel", code);
  return std::unexpected(sent.error().with_context("cannot send on the transfer channel"));
}

Result<FdMessage> FdChannel::receive(std::optional<std::chrono::milliseconds> timeout) const {
  const auto deadline = timeout ? std::chrono::steady_clock::now() + *timeout : std::chrono::steady_clock::time_point::max();
  while (true) {
    int wait_ms = -1;
    if (timeout) {
      const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
      wait_ms = static_cast<int>(std::max<int64_t>(0, left.count()));
    }
    // Polled at least once, so a zero timeout still finds a queued message.
    pollfd ready{socket_.get(), POLLIN, 0};
    const int polled = ::poll(&ready, 1, wait_ms);
    if (polled < 0 && errno == EINTR) continue;
    if (polled < 0) return fail_errno("cannot wait on the transfer channel");
    if (polled == 0) {
      if (timeout && std::chrono::steady_clock::now() >= deadline)
        return fail("timed out waiting on the transfer channel", ETIMEDOUT);
      continue;
    }

    std::string payload(kMaxPayload, '\0');
    FdMessage out;
    auto received = receive_with_fds(socket_.ref(), payload, out.fds, MSG_DONTWAIT, kMaxFds);
    if (!received && (received.error().code == EINTR || received.error().code == EAGAIN)) continue;
    if (!received && (received.error().code == EPROTO || received.error().code == EMSGSIZE))
      return fail("a message on the transfer channel was truncated", EMSGSIZE);
    if (!received) return std::unexpected(received.error().with_context("cannot receive on the transfer channel"));
    if (*received == 0) return fail("the other process closed the transfer channel", ECONNRESET);
    payload.resize(*received);
    if (payload.size() == 1 && payload[0] == '\0') payload.clear();
    out.payload = std::move(payload);
    return out;
  }
}

}  // namespace vmm::migration
