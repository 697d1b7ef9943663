#include "kvm/vcpu.h"

#include <sys/ioctl.h>

#include <sys/mman.h>
#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <utility>

#include "kvm/ioctl.h"
#include "kvm/msrs.h"
#include "kvm/uapi.h"

namespace vmm::kvm {

namespace {

// KVM's limit on CPUID entries per vCPU (KVM_MAX_CPUID_ENTRIES).
constexpr uint32_t kMaxCpuidEntries = 256;

using MsrBuffer = detail::VarLengthBuffer<kvm_msr_entry>;
using CpuidBuffer = detail::VarLengthBuffer<kvm_cpuid_entry2>;

bool is_tsc_deadline(const MsrEntry& entry) { return entry.index == msr::kTscDeadline; }

}  // namespace

Result<Vcpu> Vcpu::adopt(UniqueFd fd, uint32_t id, int mmap_size) {
  if (mmap_size < static_cast<int>(sizeof(kvm_run))) {
    return fail(fmt::format("vcpu {}: KVM_GET_VCPU_MMAP_SIZE {} is smaller than kvm_run", id,
                            mmap_size),
                EINVAL);
  }
  void* run = ::mmap(nullptr, static_cast<size_t>(mmap_size), PROT_READ | PROT_WRITE, MAP_SHARED,
                     fd.get(), 0);
  if (run == MAP_FAILED) return fail_errno(fmt::format("mmap of the kvm_run page of vcpu {}", id));
  return Vcpu(std::move(fd), id, static_cast<kvm_run*>(run), mmap_size);
}

Vcpu::Vcpu(Vcpu&& other) noexcept
    : fd_(std::move(other.fd_)),
      id_(other.id_),
      run_(std::exchange(other.run_, nullptr)),
      mmap_size_(std::exchange(other.mmap_size_, 0)),
      cpuid_set_(std::move(other.cpuid_set_)),
      cpuid_preset_effective_(std::move(other.cpuid_preset_effective_)) {}

Vcpu& Vcpu::operator=(Vcpu&& other) noexcept {
  if (this != &other) {
    unmap_run();
    fd_ = std::move(other.fd_);
    id_ = other.id_;
    run_ = std::exchange(other.run_, nullptr);
    mmap_size_ = std::exchange(other.mmap_size_, 0);
    cpuid_set_ = std::move(other.cpuid_set_);
    cpuid_preset_effective_ = std::move(other.cpuid_preset_effective_);
  }
  return *this;
}

Vcpu::~Vcpu() { unmap_run(); }

void Vcpu::unmap_run() {
  if (run_ != nullptr) ::munmap(run_, static_cast<size_t>(mmap_size_));
  run_ = nullptr;
}

Result<void> Vcpu::run() {
  // Called for every exit: no message formatting unless it fails.
  if (::ioctl(fd_.get(), KVM_RUN, 0) < 0) {
    const int err = errno;
    if (err == EINTR) return fail(fmt::format("KVM_RUN (vcpu {}) interrupted", id_), EINTR);
    return fail(fmt::format("KVM_RUN (vcpu {})", id_), err);
  }
  return {};
}

void Vcpu::set_immediate_exit(bool on) {
  // Written by another thread while KVM_RUN may be reading it.
  std::atomic_ref<uint8_t>(run_->immediate_exit).store(on ? 1 : 0, std::memory_order_release);
}

// Plain get/set pairs: one struct in, one struct out.
namespace {

template <class T>
Result<T> get_struct(FdRef fd, unsigned long request, const char* name, uint32_t id) {
  T value{};
  VMM_TRY(detail::ioctl(fd, request, &value, fmt::format("{} (vcpu {})", name, id)));
  return value;
}

template <class T>
Result<void> set_struct(FdRef fd, unsigned long request, const T& value, const char* name,
                        uint32_t id) {
  VMM_TRY(detail::ioctl(fd, request, &value, fmt::format("{} (vcpu {})", name, id)));
  return {};
}

}  // namespace

Result<kvm_regs> Vcpu::get_regs() const {
  return get_struct<kvm_regs>(fd(), KVM_GET_REGS, "KVM_GET_REGS", id_);
}
Result<void> Vcpu::set_regs(const kvm_regs& regs) {
  return set_struct(fd(), KVM_SET_REGS, regs, "KVM_SET_REGS", id_);
}
Result<kvm_sregs> Vcpu::get_sregs() const {
  return get_struct<kvm_sregs>(fd(), KVM_GET_SREGS, "KVM_GET_SREGS", id_);
}
Result<void> Vcpu::set_sregs(const kvm_sregs& sregs) {
  return set_struct(fd(), KVM_SET_SREGS, sregs, "KVM_SET_SREGS", id_);
}
Result<kvm_fpu> Vcpu::get_fpu() const {
  return get_struct<kvm_fpu>(fd(), KVM_GET_FPU, "KVM_GET_FPU", id_);
}
Result<void> Vcpu::set_fpu(const kvm_fpu& fpu) {
  return set_struct(fd(), KVM_SET_FPU, fpu, "KVM_SET_FPU", id_);
}
// The legacy 4 KiB area: enough unless a dynamic XSAVE feature (AMX) was
// enabled with arch_prctl, which this VMM never does.
Result<uapi::Xsave> Vcpu::get_xsave() const {
  return get_struct<uapi::Xsave>(fd(), uapi::kGetXsave, "KVM_GET_XSAVE", id_);
}
Result<void> Vcpu::set_xsave(const uapi::Xsave& xsave) {
  return set_struct(fd(), uapi::kSetXsave, xsave, "KVM_SET_XSAVE", id_);
}
Result<kvm_xcrs> Vcpu::get_xcrs() const {
  return get_struct<kvm_xcrs>(fd(), KVM_GET_XCRS, "KVM_GET_XCRS", id_);
}
Result<void> Vcpu::set_xcrs(const kvm_xcrs& xcrs) {
  return set_struct(fd(), KVM_SET_XCRS, xcrs, "KVM_SET_XCRS", id_);
}
Result<kvm_lapic_state> Vcpu::get_lapic() const {
  return get_struct<kvm_lapic_state>(fd(), KVM_GET_LAPIC, "KVM_GET_LAPIC", id_);
}
Result<void> Vcpu::set_lapic(const kvm_lapic_state& lapic) {
  return set_struct(fd(), KVM_SET_LAPIC, lapic, "KVM_SET_LAPIC", id_);
}
Result<kvm_mp_state> Vcpu::get_mp_state() const {
  return get_struct<kvm_mp_state>(fd(), KVM_GET_MP_STATE, "KVM_GET_MP_STATE", id_);
}
Result<void> Vcpu::set_mp_state(const kvm_mp_state& state) {
  return set_struct(fd(), KVM_SET_MP_STATE, state, "KVM_SET_MP_STATE", id_);
}
Result<kvm_vcpu_events> Vcpu::get_vcpu_events() const {
  return get_struct<kvm_vcpu_events>(fd(), KVM_GET_VCPU_EVENTS, "KVM_GET_VCPU_EVENTS", id_);
}
Result<void> Vcpu::set_vcpu_events(const kvm_vcpu_events& events) {
  return set_struct(fd(), KVM_SET_VCPU_EVENTS, events, "KVM_SET_VCPU_EVENTS", id_);
}
Result<kvm_debugregs> Vcpu::get_debugregs() const {
  return get_struct<kvm_debugregs>(fd(), KVM_GET_DEBUGREGS, "KVM_GET_DEBUGREGS", id_);
}
Result<void> Vcpu::set_debugregs(const kvm_debugregs& debugregs) {
  return set_struct(fd(), KVM_SET_DEBUGREGS, debugregs, "KVM_SET_DEBUGREGS", id_);
}

Result<std::vector<MsrEntry>> Vcpu::get_msrs(std::span<const uint32_t> indices) const {
  MsrBuffer buffer(static_cast<uint32_t>(indices.size()));
  for (size_t i = 0; i < indices.size(); ++i) buffer.entries()[i] = {.index = indices[i]};
  VMM_TRY_ASSIGN(read, detail::ioctl(fd(), uapi::kGetMsrs, buffer.header(),
                                     fmt::format("KVM_GET_MSRS (vcpu {})", id_)));
  // KVM stops at the first MSR it cannot read and returns how many it read.
  if (static_cast<size_t>(read) < indices.size()) {
    return fail(fmt::format("KVM_GET_MSRS (vcpu {}): MSR {:#x} could not be read ({} of {} read)",
                            id_, indices[read], read, indices.size()));
  }
  std::vector<MsrEntry> msrs;
  msrs.reserve(indices.size());
  for (size_t i = 0; i < indices.size(); ++i) {
    msrs.push_back({.index = buffer.entries()[i].index, .data = buffer.entries()[i].data});
  }
  return msrs;
}

Result<void> Vcpu::set_msrs(std::span<const MsrEntry> msrs) {
  if (msrs.empty()) return {};
  MsrBuffer buffer(static_cast<uint32_t>(msrs.size()));
  for (size_t i = 0; i < msrs.size(); ++i) {
    buffer.entries()[i] = {.index = msrs[i].index, .data = msrs[i].data};
  }
  VMM_TRY_ASSIGN(written, detail::ioctl(fd(), uapi::kSetMsrs, buffer.header(),
                                        fmt::format("KVM_SET_MSRS (vcpu {})", id_)));
  if (static_cast<size_t>(written) < msrs.size()) {
    return fail(fmt::format("KVM_SET_MSRS (vcpu {}): MSR {:#x} = {:#x} was refused ({} of {} set)",
                            id_, msrs[written].index, msrs[written].data, written, msrs.size()));
  }
  return {};
}

Result<void> Vcpu::set_cpuid(std::span<const kvm_cpuid_entry2> entries) {
  std::vector<kvm_cpuid_entry2> patched(entries.begin(), entries.end());
  for (kvm_cpuid_entry2& entry : patched) {
    // The initial APIC id: how a guest (and our test guest) learns which CPU it is.
    if (entry.function == 1) entry.ebx = (entry.ebx & 0x00ff'ffffU) | (id_ << 24);
    // The x2APIC id of the extended topology leaves, for every sub-leaf.
    if (entry.function == 0xb || entry.function == 0x1f) entry.edx = id_;
  }
  return set_cpuid_entries(patched);
}

Result<void> Vcpu::set_cpuid_entries(std::span<const kvm_cpuid_entry2> entries) {
  CpuidBuffer buffer(static_cast<uint32_t>(entries.size()));
  std::ranges::copy(entries, buffer.entries());
  VMM_TRY(detail::ioctl(fd(), uapi::kSetCpuid2, buffer.header(),
                        fmt::format("KVM_SET_CPUID2 (vcpu {}, {} entries)", id_, entries.size())));
  cpuid_set_.assign(entries.begin(), entries.end());
  return {};
}

Result<void> Vcpu::preset_cpuid(std::span<const kvm_cpuid_entry2> entries) {
  VMM_TRY(set_cpuid_entries(entries));
  VMM_TRY_ASSIGN(effective, get_cpuid());
  cpuid_preset_effective_ = std::move(effective);
  return {};
}

bool same_cpuid_but_runtime_bits(std::span<const kvm_cpuid_entry2> a, std::span<const kvm_cpuid_entry2> b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    kvm_cpuid_entry2 x = a[i], y = b[i];
    if (x.function != y.function || x.index != y.index || x.flags != y.flags) return false;
    auto mask = [](kvm_cpuid_entry2& entry) {
      if (entry.function == 1) {
        entry.ecx &= ~((1U << 27) | (1U << 3));  // OSXSAVE (CR4), MONITOR (MISC_ENABLE)
        entry.edx &= ~(1U << 9);                   // APIC (APIC_BASE enable)
      } else if (entry.function == 7 && entry.index == 0) {
        entry.ecx &= ~(1U << 4);  // OSPKE (CR4)
      } else if (entry.function == 0xd && (entry.index == 0 || entry.index == 1)) {
        entry.ebx = 0;  // XSAVE area size for the enabled XCR0 | XSS
      }
    };
    mask(x);
    mask(y);
    if (x.eax != y.eax || x.ebx != y.ebx || x.ecx != y.ecx || x.edx != y.edx) return false;
  }
  return true;
}

Result<std::vector<kvm_cpuid_entry2>> Vcpu::get_cpuid() const {
  CpuidBuffer buffer(kMaxCpuidEntries);
  VMM_TRY(detail::ioctl(fd(), uapi::kGetCpuid2, buffer.header(),
                        fmt::format("KVM_GET_CPUID2 (vcpu {})", id_)));
  return std::vector<kvm_cpuid_entry2>(buffer.entries(), buffer.entries() + buffer.count());
}

Result<uint64_t> Vcpu::get_tsc_khz() const {
  VMM_TRY_ASSIGN(khz, detail::ioctl(fd(), KVM_GET_TSC_KHZ, fmt::format("KVM_GET_TSC_KHZ (vcpu {})",
                                                                        id_)));
  return static_cast<uint64_t>(khz);
}

Result<void> Vcpu::set_tsc_khz(uint64_t khz) {
  auto result = detail::ioctl(fd(), KVM_SET_TSC_KHZ, static_cast<unsigned long>(khz),
                              fmt::format("KVM_SET_TSC_KHZ({}) (vcpu {})", khz, id_));
  if (!result) {
    return std::unexpected(result.error().with_context(
        "the guest's TSC frequency cannot be reproduced on this host (no TSC scaling, or a rate "
        "out of range)"));
  }
  return {};
}

Result<void> Vcpu::kvmclock_ctrl() {
  auto result = detail::ioctl(fd(), KVM_KVMCLOCK_CTRL, fmt::format("KVM_KVMCLOCK_CTRL (vcpu {})",
                                                                    id_));
  if (!result && result.error().code == EINVAL) return {};  // the guest has no kvmclock
  if (!result) return std::unexpected(result.error());
  return {};
}

Result<VcpuState> Vcpu::save(std::span<const uint32_t> msr_indices) const {
  VcpuState state;
  state.id = id_;
  // MP state first: KVM_GET_MP_STATE processes pending INIT/SIPI events,
  // which can change the registers and the LAPIC saved after it.
  VMM_TRY_ASSIGN(mp_state, get_mp_state());
  VMM_TRY_ASSIGN(regs, get_regs());
  VMM_TRY_ASSIGN(sregs, get_sregs());
  VMM_TRY_ASSIGN(fpu, get_fpu());
  VMM_TRY_ASSIGN(xsave, get_xsave());
  VMM_TRY_ASSIGN(xcrs, get_xcrs());
  VMM_TRY_ASSIGN(debugregs, get_debugregs());
  VMM_TRY_ASSIGN(lapic, get_lapic());
  VMM_TRY_ASSIGN(msrs, get_msrs(msr_indices));
  // Events last (Firecracker's order): reading the LAPIC can deliver pending
  // interrupts into the event state.
  VMM_TRY_ASSIGN(events, get_vcpu_events());
  VMM_TRY_ASSIGN(cpuid, get_cpuid());
  VMM_TRY_ASSIGN(tsc_khz, get_tsc_khz());
  state.mp_state = mp_state;
  state.regs = regs;
  state.sregs = sregs;
  state.fpu = fpu;
  state.xsave = xsave;
  state.xcrs = xcrs;
  state.debugregs = debugregs;
  state.lapic = lapic;
  state.msrs = std::move(msrs);
  state.events = events;
  state.cpuid = std::move(cpuid);
  state.tsc_khz = tsc_khz;
  return state;
}

Result<void> Vcpu::restore(const VcpuState& state, TscRestore* tsc) {
  if (state.id != id_) {
    return fail(fmt::format("cannot restore the state of vcpu {} into vcpu {}: the APIC ids in "
                            "CPUID and the LAPIC would not match",
                            state.id, id_),
                EINVAL);
  }
  // CPUID first: it decides which XSAVE features, XCR0 bits and MSRs the
  // later calls may set.
  // (KVM_SET_CPUID2 costs ~0.1 ms here: skipped when a preset is the same.)
  if (!state.cpuid.empty() && !same_cpuid_but_runtime_bits(state.cpuid, cpuid_preset_effective_))
    VMM_TRY(set_cpuid_entries(state.cpuid));
  if (state.tsc_khz != 0) {
    VMM_TRY_ASSIGN(current_khz, get_tsc_khz());
    if (current_khz != state.tsc_khz) {
      if (tsc) tsc->host_khz = current_khz;
      auto set = set_tsc_khz(state.tsc_khz);
      if (!set && !(tsc && set.error().code == EINVAL)) return set;
      if (!set) {
        tsc->kept_host_rate = true;
        // KVM records the refused rate before refusing it (virtual_tsc_khz
        // in kvm_set_tsc_khz): KVM_GET_TSC_KHZ would report it from now on
        // while the vCPU runs at this host's, and the next save would carry
        // that wrong rate on. Setting this host's own rate again puts the
        // two back together.
        VMM_TRY(with_context(set_tsc_khz(current_khz), "setting this host's TSC rate back after KVM refused the saved one"));
      }
    }
  }
  // Special registers before the general ones: they set the CPU mode
  // (CR0/CR4/EFER) and APIC_BASE, which the LAPIC state is read against.
  VMM_TRY(set_sregs(state.sregs));
  VMM_TRY(set_regs(state.regs));
  VMM_TRY(set_fpu(state.fpu));
  VMM_TRY(set_xsave(state.xsave));  // supersedes the FPU part where XSAVE exists
  VMM_TRY(set_xcrs(state.xcrs));

  // TSC_DEADLINE is ignored unless the LAPIC timer is in TSC-deadline mode,
  // so it goes after the LAPIC (QEMU does the same).
  std::vector<MsrEntry> before_lapic;
  std::vector<MsrEntry> after_lapic;
  for (const MsrEntry& entry : state.msrs) {
    (is_tsc_deadline(entry) ? after_lapic : before_lapic).push_back(entry);
  }
  VMM_TRY(set_msrs(before_lapic));
  for (const MsrEntry& entry : before_lapic)
    if (entry.index == msr::kTsc && state.tsc_khz != 0) VMM_TRY(ensure_tsc(entry.data, state.tsc_khz, tsc));
  VMM_TRY(set_lapic(state.lapic));
  VMM_TRY(set_msrs(after_lapic));

  VMM_TRY(set_mp_state(state.mp_state));
  // KVM_GET_VCPU_EVENTS does not mark the NMI-pending and SIPI-vector fields
  // valid; without these flags KVM_SET_VCPU_EVENTS would ignore them.
  kvm_vcpu_events events = state.events;
  events.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SIPI_VECTOR;
  VMM_TRY(set_vcpu_events(events));
  VMM_TRY(set_debugregs(state.debugregs));
  return {};
}

// KVM's TSC write goes through its synchronization heuristics
// (kvm_synchronize_tsc), and under the kexec lab's nested SVM, after a
// refused rate, the guest's TSC carried on from the save instead of the time
// it was frozen: read it back, and where it is off by more than 100 ms, move
// the offset itself (KVM_VCPU_TSC_OFFSET, Linux 5.16+).
Result<void> Vcpu::ensure_tsc(uint64_t wanted, uint64_t khz, TscRestore* tsc) {
  const std::vector<uint32_t> index{msr::kTsc};
  const uint64_t slack = khz * 100;  // 100 ms of cycles
  auto off_by = [&]() -> Result<int64_t> {
    VMM_TRY_ASSIGN(read, get_msrs(index));
    return static_cast<int64_t>(wanted - read.front().data);
  };
  VMM_TRY_ASSIGN(missing, off_by());
  if (static_cast<uint64_t>(missing < 0 ? -missing : missing) <= slack) return {};
  uint64_t offset = 0;
  kvm_device_attr attr{0, KVM_VCPU_TSC_CTRL, KVM_VCPU_TSC_OFFSET, reinterpret_cast<uint64_t>(&offset)};
  bool corrected = false;
  if (::ioctl(fd().get(), KVM_HAS_DEVICE_ATTR, &attr) == 0 &&
      detail::ioctl(fd(), KVM_GET_DEVICE_ATTR, &attr, "KVM_GET_DEVICE_ATTR(KVM_VCPU_TSC_OFFSET)")) {
    offset += static_cast<uint64_t>(missing);
    VMM_TRY(detail::ioctl(fd(), KVM_SET_DEVICE_ATTR, &attr, fmt::format("KVM_SET_DEVICE_ATTR(KVM_VCPU_TSC_OFFSET) (vcpu {})", id_)));
    VMM_TRY_ASSIGN(still, off_by());
    corrected = static_cast<uint64_t>(still < 0 ? -still : still) <= slack;
  }
  if (tsc) {
    tsc->tsc_corrected = corrected;
    tsc->tsc_not_set = !corrected;
  }
  return {};
}

}  // namespace vmm::kvm
