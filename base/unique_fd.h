// Move-only ownership of a file descriptor (after Android libbase's unique_fd)
// and a non-owning view for borrowed descriptors.
#pragma once

#include <unistd.h>

#include <utility>

namespace vmm {

// A descriptor borrowed from its owner; never closes anything.
class FdRef {
 public:
  constexpr FdRef() = default;
  constexpr explicit FdRef(int fd) : fd_(fd) {}
  [[nodiscard]] constexpr int get() const { return fd_; }
  [[nodiscard]] constexpr bool valid() const { return fd_ >= 0; }

 private:
  int fd_ = -1;
};

class UniqueFd {
 public:
  UniqueFd() = default;
  explicit UniqueFd(int fd) : fd_(fd) {}
  UniqueFd(const UniqueFd&) = delete;
  UniqueFd& operator=(const UniqueFd&) = delete;
  UniqueFd(UniqueFd&& other) noexcept : fd_(other.release()) {}
  UniqueFd& operator=(UniqueFd&& other) noexcept {
    if (this != &other) reset(other.release());
    return *this;
  }
  ~UniqueFd() { reset(); }

  [[nodiscard]] int get() const { return fd_; }
  [[nodiscard]] FdRef ref() const { return FdRef(fd_); }
  [[nodiscard]] bool valid() const { return fd_ >= 0; }
  explicit operator bool() const { return valid(); }

  // Gives up ownership without closing; the caller now owns the descriptor.
  [[nodiscard]] int release() { return std::exchange(fd_, -1); }

  void reset(int fd = -1) {
    if (fd_ >= 0) ::close(fd_);
    fd_ = fd;
  }

 private:
  int fd_ = -1;
};

}  // namespace vmm
