#include "kvm/system.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include <algorithm>

#include "kvm/ioctl.h"
#include "kvm/uapi.h"

namespace vmm::kvm {

namespace {

constexpr int kKvmApiVersion = 12;  // the only version there has ever been
constexpr uint64_t kGuestMemfdMmapFlags =
    uapi::kGuestMemfdFlagMmap | uapi::kGuestMemfdFlagInitShared;

// A capability the VMM cannot run without, and what breaks without it.
struct RequiredCapability {
  long cap;
  const char* name;
  const char* consequence;
};

constexpr RequiredCapability kRequired[] = {
    {KVM_CAP_USER_MEMORY, "KVM_CAP_USER_MEMORY", "guest RAM cannot be registered"},
    {KVM_CAP_IRQCHIP, "KVM_CAP_IRQCHIP", "the in-kernel PIC/IOAPIC/LAPIC cannot be created"},
    {KVM_CAP_PIT2, "KVM_CAP_PIT2", "the in-kernel timer (PIT) cannot be created"},
    {KVM_CAP_IMMEDIATE_EXIT, "KVM_CAP_IMMEDIATE_EXIT",
     "a running vCPU cannot be stopped reliably for pause, snapshot or live update"},
    {uapi::kCapUserMemory2, "KVM_CAP_USER_MEMORY2 (Linux 6.8+)",
     "memslots cannot be registered with KVM_SET_USER_MEMORY_REGION2"},
};

}  // namespace

bool Capabilities::guest_memfd_mmap() const {
  return guest_memfd && user_memory2 &&
         (guest_memfd_flags & kGuestMemfdMmapFlags) == kGuestMemfdMmapFlags;
}

Result<System> System::open(const std::string& path) {
  UniqueFd fd(::open(path.c_str(), O_RDWR | O_CLOEXEC));
  if (!fd) {
    const int err = errno;
    if (err == ENOENT) {
      return fail(path + " not found: this host has no KVM (load kvm_intel/kvm_amd or run on a "
                         "host with virtualization)",
                  err);
    }
    if (err == EACCES || err == EPERM) {
      return fail("cannot open " + path +
                      ": permission denied (add the user to the kvm group, e.g. "
                      "`usermod -aG kvm $USER` and log in again, or run as root)",
                  err);
    }
    return fail("cannot open " + path, err);
  }
  VMM_TRY_ASSIGN(mmap_size, detail::ioctl(fd.ref(), KVM_GET_VCPU_MMAP_SIZE, "KVM_GET_VCPU_MMAP_SIZE"));
  return System(std::move(fd), mmap_size);
}

Result<int> System::check_extension(long cap) const {
  return detail::ioctl(fd(), KVM_CHECK_EXTENSION, cap, fmt::format("KVM_CHECK_EXTENSION({})", cap));
}

Result<Capabilities> System::probe() const {
  Capabilities caps;
  VMM_TRY_ASSIGN(api_version, detail::ioctl(fd(), KVM_GET_API_VERSION, "KVM_GET_API_VERSION"));
  caps.api_version = api_version;
  if (caps.api_version != kKvmApiVersion) {
    return fail(fmt::format("KVM API version is {}, expected {}: this KVM is not compatible",
                            caps.api_version, kKvmApiVersion));
  }
  caps.vcpu_mmap_size = vcpu_mmap_size_;

  for (const RequiredCapability& required : kRequired) {
    VMM_TRY_ASSIGN(present, check_extension(required.cap));
    if (present <= 0) {
      return fail(fmt::format("this host's KVM lacks {}: {}", required.name, required.consequence),
                  ENOTSUP);
    }
  }

  // Optional capabilities: KVM_CHECK_EXTENSION returns 0 for unknown ones.
  auto check = [&](long cap) -> Result<int> { return check_extension(cap); };
  VMM_TRY_ASSIGN(nr_vcpus, check(KVM_CAP_NR_VCPUS));
  VMM_TRY_ASSIGN(max_vcpus, check(KVM_CAP_MAX_VCPUS));
  VMM_TRY_ASSIGN(guest_memfd, check(uapi::kCapGuestMemfd));
  VMM_TRY_ASSIGN(guest_memfd_flags, check(uapi::kCapGuestMemfdFlags));
  VMM_TRY_ASSIGN(xsave, check(KVM_CAP_XSAVE));
  VMM_TRY_ASSIGN(xcrs, check(KVM_CAP_XCRS));
  VMM_TRY_ASSIGN(vcpu_events, check(KVM_CAP_VCPU_EVENTS));
  VMM_TRY_ASSIGN(debugregs, check(KVM_CAP_DEBUGREGS));
  VMM_TRY_ASSIGN(adjust_clock, check(KVM_CAP_ADJUST_CLOCK));
  VMM_TRY_ASSIGN(kvmclock_ctrl, check(KVM_CAP_KVMCLOCK_CTRL));
  VMM_TRY_ASSIGN(tsc_khz, check(KVM_CAP_GET_TSC_KHZ));
  VMM_TRY_ASSIGN(irqfd, check(KVM_CAP_IRQFD));
  VMM_TRY_ASSIGN(ioeventfd, check(KVM_CAP_IOEVENTFD));
  VMM_TRY_ASSIGN(pre_fault_memory, check(uapi::kCapPreFaultMemory));

  caps.nr_vcpus = nr_vcpus;
  // KVM_CAP_MAX_VCPUS is 0 on kernels that only know NR_VCPUS.
  caps.max_vcpus = max_vcpus > 0 ? max_vcpus : nr_vcpus;
  caps.user_memory2 = true;  // required above
  caps.irqchip = true;
  caps.pit2 = true;
  caps.immediate_exit = true;
  caps.guest_memfd = guest_memfd > 0;
  caps.guest_memfd_flags = guest_memfd_flags > 0 ? static_cast<uint64_t>(guest_memfd_flags) : 0;
  caps.xsave = xsave > 0;
  caps.xcrs = xcrs > 0;
  caps.vcpu_events = vcpu_events > 0;
  caps.debugregs = debugregs > 0;
  caps.adjust_clock = adjust_clock > 0;
  caps.kvmclock_ctrl = kvmclock_ctrl > 0;
  caps.tsc_khz = tsc_khz > 0;
  caps.irqfd = irqfd > 0;
  caps.ioeventfd = ioeventfd > 0;
  caps.pre_fault_memory = pre_fault_memory > 0;

  spdlog::debug("kvm: api {}, vcpus {}/{}, guest_memfd {} flags {:#x}, pre-fault {}",
                caps.api_version, caps.nr_vcpus, caps.max_vcpus, caps.guest_memfd,
                caps.guest_memfd_flags, caps.pre_fault_memory);
  return caps;
}

Result<Vm> System::create_vm() const {
  // Type 0 (KVM_X86_DEFAULT_VM): guest_memfd with MMAP | INIT_SHARED works on it.
  VMM_TRY_ASSIGN(vm_fd, detail::ioctl(fd(), KVM_CREATE_VM, 0UL, "KVM_CREATE_VM"));
  return Vm(UniqueFd(vm_fd), vcpu_mmap_size_);
}

Result<std::vector<kvm_cpuid_entry2>> System::supported_cpuid() const {
  // Grow the buffer until KVM stops answering E2BIG.
  for (uint32_t capacity = 128;; capacity *= 2) {
    detail::VarLengthBuffer<kvm_cpuid_entry2> cpuid(capacity);
    auto ret = detail::ioctl(fd(), uapi::kGetSupportedCpuid, cpuid.header(), "KVM_GET_SUPPORTED_CPUID");
    if (!ret && ret.error().code == E2BIG && capacity < 4096) continue;
    if (!ret) return std::unexpected(ret.error());
    return std::vector<kvm_cpuid_entry2>(cpuid.entries(), cpuid.entries() + cpuid.count());
  }
}

Result<std::vector<uint32_t>> System::msr_index_list() const {
  // The first call, with room for none, fails with E2BIG and reports the count.
  uapi::MsrListHeader sizing{};
  auto first = detail::ioctl(fd(), uapi::kGetMsrIndexList, &sizing, "KVM_GET_MSR_INDEX_LIST");
  if (first) return std::vector<uint32_t>{};
  if (first.error().code != E2BIG) return std::unexpected(first.error());

  // struct kvm_msr_list: the __u32 count, then the indices.
  std::vector<uint32_t> storage(1 + sizing.nmsrs);
  storage[0] = sizing.nmsrs;
  VMM_TRY(detail::ioctl(fd(), uapi::kGetMsrIndexList, storage.data(), "KVM_GET_MSR_INDEX_LIST"));
  return std::vector<uint32_t>(storage.begin() + 1, storage.begin() + 1 + storage[0]);
}

Result<std::vector<uint32_t>> System::msrs_to_save() const {
  VMM_TRY_ASSIGN(available, msr_index_list());
  std::vector<uint32_t> result;
  for (uint32_t index : msrs_worth_saving()) {
    if (std::ranges::find(available, index) != available.end()) result.push_back(index);
  }
  return result;
}

}  // namespace vmm::kvm
