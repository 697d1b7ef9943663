#include "base/fd_passing.h"

#include <fcntl.h>
#include <sys/socket.h>

#include <algorithm>
#include <cstring>

#include <fmt/format.h>

namespace vmm {

Result<size_t> send_with_fds(FdRef socket, std::string_view bytes, std::span<const FdRef> fds, int flags,
                             size_t max_fds) {
  if (bytes.empty()) return fail("descriptors must ride with at least one byte", EINVAL);
  max_fds = std::min(max_fds, kMaxFdsPerMessage);
  if (fds.size() > max_fds)
    return fail(fmt::format("{} descriptors in one message; at most {}", fds.size(), max_fds), EINVAL);
  iovec io{const_cast<char*>(bytes.data()), bytes.size()};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFdsPerMessage)]{};
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
    const ssize_t sent = ::sendmsg(socket.get(), &message, flags | MSG_NOSIGNAL);
    if (sent >= 0) return static_cast<size_t>(sent);
    if (errno == EINTR) continue;
    return fail_errno(fmt::format("sendmsg with {} descriptor(s)", fds.size()));
  }
}

Result<size_t> receive_with_fds(FdRef socket, std::span<char> buffer, std::vector<UniqueFd>& fds, int flags,
                                size_t max_fds) {
  max_fds = std::min(max_fds, kMaxFdsPerMessage);
  iovec io{buffer.data(), buffer.size()};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxFdsPerMessage)]{};
  msghdr message{};
  message.msg_iov = &io;
  message.msg_iovlen = 1;
  message.msg_control = control;
  // Room for `max_fds` only: the kernel closes the rest (MSG_CTRUNC).
  message.msg_controllen = CMSG_SPACE(sizeof(int) * max_fds);
  const ssize_t received = ::recvmsg(socket.get(), &message, flags | MSG_CMSG_CLOEXEC);
  if (received < 0) return fail_errno("recvmsg");
  for (cmsghdr* header = CMSG_FIRSTHDR(&message); header; header = CMSG_NXTHDR(&message, header)) {
    if (header->cmsg_level != SOL_SOCKET || header->cmsg_type != SCM_RIGHTS) continue;
    const size_t count = (header->cmsg_len - CMSG_LEN(0)) / sizeof(int);
    for (size_t i = 0; i < count; ++i) {
      int fd = -1;
      std::memcpy(&fd, CMSG_DATA(header) + i * sizeof(int), sizeof fd);
      fds.emplace_back(fd);
    }
  }
  // The kernel closed what did not fit; the reader must not take the rest
  // for the whole message.
  if (message.msg_flags & MSG_CTRUNC)
    return fail(fmt::format("the peer sent more than {} descriptors at once; the extra ones were closed", max_fds),
                EPROTO);
  // Only a message-based socket cuts a message short.
  if (message.msg_flags & MSG_TRUNC)
    return fail(fmt::format("a message longer than the {}-byte buffer was cut short", buffer.size()), EMSGSIZE);
  return static_cast<size_t>(received);
}

Result<UniqueFd> duplicate_fd(FdRef fd) {
  UniqueFd copy(::fcntl(fd.get(), F_DUPFD_CLOEXEC, 0));
  if (!copy) return fail_errno(fmt::format("cannot duplicate descriptor {}", fd.get()));
  return copy;
}

}  // namespace vmm
