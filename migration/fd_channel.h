// A message channel that carries file descriptors: one end of a Unix
// SOCK_SEQPACKET socket pair, each message a byte payload plus up to
// kMaxFds descriptors (SCM_RIGHTS). Used by the transfer live update, where
// the new vmm process receives the guest's memory files from the old one
// (the idea behind Cloud Hypervisor's local migration and QEMU's cpr channel).
//
// SEQPACKET keeps message boundaries and tells a closed peer (EOF) from an
// empty message, so either side learns at once that the other one died.
#pragma once

#include <chrono>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "base/result.h"
#include "base/unique_fd.h"

namespace vmm::migration {

struct FdMessage {
  std::string payload;
  std::vector<UniqueFd> fds;
};

class FdChannel {
 public:
  static constexpr size_t kMaxFds = 32;
  static constexpr size_t kMaxPayload = 64 * 1024;

  // A connected pair; both ends close-on-exec.
  [[nodiscard]] static Result<std::pair<FdChannel, FdChannel>> pair();
  // Takes over one end, e.g. inherited by a new process.
  [[nodiscard]] static Result<FdChannel> adopt(UniqueFd socket);

  FdChannel(FdChannel&&) noexcept = default;
  FdChannel& operator=(FdChannel&&) noexcept = default;

  // One message; the descriptors are duplicated into the receiver.
  [[nodiscard]] Result<void> send(std::string_view payload, std::span<const FdRef> fds = {}) const;
  // The next message, waiting at most `timeout` (forever without one).
  // ECONNRESET when the peer closed its end; ETIMEDOUT on timeout.
  [[nodiscard]] Result<FdMessage> receive(std::optional<std::chrono::milliseconds> timeout = std::nullopt) const;

  [[nodiscard]] FdRef fd() const { return socket_.ref(); }
  [[nodiscard]] UniqueFd release_socket() { return std::move(socket_); }

 private:
  explicit FdChannel(UniqueFd socket) : socket_(std::move(socket)) {}
  UniqueFd socket_;
};

}  // namespace vmm::migration
