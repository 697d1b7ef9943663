// Descriptors over a Unix stream socket (SCM_RIGHTS), beside ordinary bytes.
//
// On a stream socket the descriptors ride with the first byte of the
// sendmsg() that carried them, and the kernel never merges them into a
// recvmsg() with bytes sent before them: a reader that collects descriptors
// while reading lines gets them with the line they came with.
#pragma once

#include <cstddef>
#include <span>
#include <string_view>
#include <vector>

#include "base/result.h"
#include "base/unique_fd.h"

namespace vmm {

// More than any one message of this project carries; a sender asked for more
// gets EINVAL, a receiver closes the extra ones (MSG_CTRUNC is reported).
inline constexpr size_t kMaxPassedFds = 16;
// The most any caller may raise that limit to (`max_fds` below): the
// transfer channel's messages carry up to 32.
inline constexpr size_t kMaxFdsPerMessage = 32;

// One sendmsg(): a prefix of `bytes` (at least one byte: `bytes` must not be
// empty) with `fds` attached (at most `max_fds`, itself at most
// kMaxFdsPerMessage). Returns how many bytes went out (on a SOCK_SEQPACKET
// socket all of them). `flags` as for sendmsg (MSG_NOSIGNAL is always
// added). EAGAIN as an error code when a non-blocking socket takes nothing.
[[nodiscard]] Result<size_t> send_with_fds(FdRef socket, std::string_view bytes, std::span<const FdRef> fds,
                                           int flags = 0, size_t max_fds = kMaxPassedFds);

// One recvmsg() into `buffer`; descriptors that came with the bytes are
// appended to `fds`, close-on-exec. Returns the byte count (0: end of
// stream). EAGAIN/EINTR come back as the error code, for the caller to wait
// or retry; EPROTO when the sender attached more than `max_fds` (at most
// kMaxFdsPerMessage); EMSGSIZE when a SOCK_SEQPACKET message was longer
// than `buffer`.
[[nodiscard]] Result<size_t> receive_with_fds(FdRef socket, std::span<char> buffer, std::vector<UniqueFd>& fds,
                                              int flags = 0, size_t max_fds = kMaxPassedFds);

// Another descriptor (close-on-exec) for the same open file.
[[nodiscard]] Result<UniqueFd> duplicate_fd(FdRef fd);

}  // namespace vmm
