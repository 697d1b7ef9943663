#include "migration/fd_channel.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>

#include <algorithm>
#include <cstring>

#include <fmt/format.h>

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
  iovec io{const_cast<char*>(payload.data()), payload.size()};
  char empty = 0;
  if (payload.empty()) io = {&empty, 1};  // a zero-length SEQPACKET message reads as EOF
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFds)]{};
  msghdr message{};
  message.msg_iov = &io;
  message.msg_iovlen = 1;
  if (!fds.empty()) {
    message.msg_control = control;
    message.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
    cmsghdr* header = CMSG_FIRSTHDR(&message);
    header->cmsg_level = SOL_SOCKET;
    header->cmsg_type = SCM_RIGHTS;
    header->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    for (size_t i = 0; i < fds.size(); ++i) {
      const int fd = fds[i].get();
      std::memcpy(CMSG_DATA(header) + i * sizeof(int), &fd, sizeof fd);
    }
  }
  while (true) {
    if (::sendmsg(socket_.get(), &message, MSG_NOSIGNAL) >= 0) return {};
    if (errno == EINTR) continue;
    if (errno == EPIPE || errno == ECONNRESET) return fail("the other process closed the transfer channel", errno);
    return fail_errno("cannot send on the transfer channel");
  }
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
    iovec io{payload.data(), payload.size()};
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFds)]{};
    msghdr message{};
    message.msg_iov = &io;
    message.msg_iovlen = 1;
    message.msg_control = control;
    message.msg_controllen = sizeof control;
    const ssize_t received = ::recvmsg(socket_.get(), &message, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    if (received < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (received < 0) return fail_errno("cannot receive on the transfer channel");
    FdMessage out;
    for (cmsghdr* header = CMSG_FIRSTHDR(&message); header; header = CMSG_NXTHDR(&message, header)) {
      if (header->cmsg_level != SOL_SOCKET || header->cmsg_type != SCM_RIGHTS) continue;
      const size_t count = (header->cmsg_len - CMSG_LEN(0)) / sizeof(int);
      for (size_t i = 0; i < count; ++i) {
        int fd = -1;
        std::memcpy(&fd, CMSG_DATA(header) + i * sizeof(int), sizeof fd);
        out.fds.emplace_back(fd);
      }
    }
    if (received == 0) return fail("the other process closed the transfer channel", ECONNRESET);
    if (message.msg_flags & (MSG_TRUNC | MSG_CTRUNC))
      return fail("a message on the transfer channel was truncated", EMSGSIZE);
    payload.resize(static_cast<size_t>(received));
    if (payload.size() == 1 && payload[0] == '\0') payload.clear();
    out.payload = std::move(payload);
    return out;
  }
}

}  // namespace vmm::migration
