// Internal to vmm_kvm. ioctl(2) on KVM descriptors, turning the C return
// convention (-1 + errno) into a Result whose message names the ioctl (only
// KVM_RUN, called on every exit, skips it to avoid formatting a message per
// exit), and the variable-length structures some of those ioctls take.
#pragma once

#include <sys/ioctl.h>

#include <cerrno>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "base/result.h"
#include "kvm/uapi.h"
#include "base/unique_fd.h"

namespace vmm::kvm::detail {

// ioctl(fd, request, arg): the non-negative return value, or Error{errno,
// `what`}. `what` names the ioctl and its object, e.g. "KVM_SET_REGS (vcpu 0)".
template <class Arg>
[[nodiscard]] Result<int> ioctl(FdRef fd, unsigned long request, Arg arg, std::string what) {
  const int ret = ::ioctl(fd.get(), request, arg);
  if (ret < 0) {
    const int err = errno;  // before anything else can clobber it
    return std::unexpected(Error{err, std::move(what)});
  }
  return ret;
}

// For ioctls without an argument (KVM_CREATE_IRQCHIP, KVM_RUN, ...).
[[nodiscard]] inline Result<int> ioctl(FdRef fd, unsigned long request, std::string what) {
  return ioctl(fd, request, 0UL, std::move(what));
}

// A variable-length KVM structure (kvm_msrs, kvm_cpuid2) in its C layout:
// a __u32 count and padding (uapi::CountHeader), then `count` entries from
// byte 8. The header types of <linux/kvm.h> are not used: in C++ their
// entries sit at the wrong offset (see kvm/uapi.h).
template <class Entry>
class VarLengthBuffer {
 public:
  static_assert(alignof(Entry) <= alignof(uint64_t));

  explicit VarLengthBuffer(uint32_t count)
      : storage_(1 + (count * sizeof(Entry) + sizeof(uint64_t) - 1) / sizeof(uint64_t)) {
    header()->count = count;
  }
  [[nodiscard]] uapi::CountHeader* header() {
    return reinterpret_cast<uapi::CountHeader*>(storage_.data());
  }
  // The count as KVM left it (KVM_GET_* calls write back how many they filled).
  [[nodiscard]] uint32_t count() const {
    return reinterpret_cast<const uapi::CountHeader*>(storage_.data())->count;
  }
  [[nodiscard]] Entry* entries() { return reinterpret_cast<Entry*>(storage_.data() + 1); }

 private:
  std::vector<uint64_t> storage_;
};

}  // namespace vmm::kvm::detail
