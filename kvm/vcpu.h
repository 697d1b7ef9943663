// A KVM vCPU: the single owner of every vCPU-level ioctl and of its kvm_run page.
#pragma once

#include <linux/kvm.h>

#include <cstdint>
#include <span>
#include <vector>

#include "base/result.h"
#include "kvm/state.h"
#include "base/unique_fd.h"

namespace vmm::kvm {

class Vcpu {
 public:
  // Maps the kvm_run page of `fd` (mmap size from KVM_GET_VCPU_MMAP_SIZE).
  [[nodiscard]] static Result<Vcpu> adopt(UniqueFd fd, uint32_t id, int mmap_size);

  Vcpu(Vcpu&& other) noexcept;
  Vcpu& operator=(Vcpu&& other) noexcept;
  Vcpu(const Vcpu&) = delete;
  Vcpu& operator=(const Vcpu&) = delete;
  ~Vcpu();

  [[nodiscard]] uint32_t id() const { return id_; }
  [[nodiscard]] FdRef fd() const { return fd_.ref(); }

  // KVM_RUN. A signal interrupts it with Error{EINTR}; the exit is then in run_data().
  [[nodiscard]] Result<void> run();
  [[nodiscard]] kvm_run& run_data() { return *run_; }
  // kvm_run.immediate_exit: set from any thread (with a signal) to make the
  // current or next KVM_RUN return EINTR at once.
  void set_immediate_exit(bool on);

  // Sets up what KVM_CREATE_VCPU leaves blank (CPUID from the supported list,
  // with the APIC id of this vCPU in leaf 1 EBX[31:24] and leaves 0xB/0x1F EDX).
  [[nodiscard]] Result<void> set_cpuid(std::span<const kvm_cpuid_entry2> entries);

  [[nodiscard]] Result<kvm_regs> get_regs() const;
  [[nodiscard]] Result<void> set_regs(const kvm_regs& regs);
  [[nodiscard]] Result<kvm_sregs> get_sregs() const;
  [[nodiscard]] Result<void> set_sregs(const kvm_sregs& sregs);
  [[nodiscard]] Result<std::vector<MsrEntry>> get_msrs(std::span<const uint32_t> indices) const;
  [[nodiscard]] Result<void> set_msrs(std::span<const MsrEntry> msrs);
  [[nodiscard]] Result<kvm_mp_state> get_mp_state() const;
  [[nodiscard]] Result<void> set_mp_state(const kvm_mp_state& state);
  [[nodiscard]] Result<kvm_fpu> get_fpu() const;
  [[nodiscard]] Result<void> set_fpu(const kvm_fpu& fpu);
  [[nodiscard]] Result<uapi::Xsave> get_xsave() const;
  [[nodiscard]] Result<void> set_xsave(const uapi::Xsave& xsave);
  [[nodiscard]] Result<kvm_xcrs> get_xcrs() const;
  [[nodiscard]] Result<void> set_xcrs(const kvm_xcrs& xcrs);
  [[nodiscard]] Result<kvm_lapic_state> get_lapic() const;
  [[nodiscard]] Result<void> set_lapic(const kvm_lapic_state& lapic);
  [[nodiscard]] Result<kvm_vcpu_events> get_vcpu_events() const;
  [[nodiscard]] Result<void> set_vcpu_events(const kvm_vcpu_events& events);
  [[nodiscard]] Result<kvm_debugregs> get_debugregs() const;
  [[nodiscard]] Result<void> set_debugregs(const kvm_debugregs& debugregs);
  // KVM_SET_CPUID2 with exactly these entries (e.g. a vCPU built ahead of a
  // restore); restore() skips setting them again when the state's CPUID
  // differs only in the bits KVM itself keeps up to date.
  [[nodiscard]] Result<void> preset_cpuid(std::span<const kvm_cpuid_entry2> entries);
  // The entries this object last gave KVM_SET_CPUID2 (empty: none yet).
  [[nodiscard]] const std::vector<kvm_cpuid_entry2>& cpuid_set() const { return cpuid_set_; }
  // KVM_GET_CPUID2: the entries in effect, as KVM adjusted them.
  [[nodiscard]] Result<std::vector<kvm_cpuid_entry2>> get_cpuid() const;
  [[nodiscard]] Result<uint64_t> get_tsc_khz() const;
  // Fails (with a message saying so) when the host cannot scale the TSC.
  [[nodiscard]] Result<void> set_tsc_khz(uint64_t khz);
  // Tells the guest's kvmclock that the vCPU was paused (KVM_KVMCLOCK_CTRL);
  // EINVAL (the guest does not use kvmclock) is not an error.
  [[nodiscard]] Result<void> kvmclock_ctrl();

  // Every piece of architectural state: registers, FPU/XSAVE, XCRs, the given
  // MSRs, LAPIC, MP state, events, debug registers, CPUID. Call while paused.
  [[nodiscard]] Result<VcpuState> save(std::span<const uint32_t> msr_indices) const;
  // Applies `state` (taken from a vCPU with the same id) to this vCPU,
  // which must not have run yet: KVM refuses a different CPUID after KVM_RUN.
  // What restore() did with the TSC rate (see restore's `tsc`).
  struct TscRestore {
    uint64_t host_khz = 0;        // this host's rate, where it differs from the saved one
    bool kept_host_rate = false;  // KVM could not run the saved rate: the vCPU runs at host_khz
    // The TSC KVM_SET_MSRS set was not the one read back: corrected through
    // the vCPU's TSC offset (KVM_VCPU_TSC_OFFSET), or, if that did not take
    // either, left as KVM keeps it (tsc_not_set).
    bool tsc_corrected = false;
    bool tsc_not_set = false;
  };
  // With `tsc`, a saved TSC rate KVM cannot run (KVM_SET_TSC_KHZ EINVAL: no
  // TSC scaling and slower than this host) is not an error: the vCPU keeps
  // this host's rate and `tsc` says so. Without it, that fails the restore.
  [[nodiscard]] Result<void> restore(const VcpuState& state, TscRestore* tsc = nullptr);

 private:
  Vcpu(UniqueFd fd, uint32_t id, kvm_run* run, int mmap_size)
      : fd_(std::move(fd)), id_(id), run_(run), mmap_size_(mmap_size) {}
  [[nodiscard]] Result<void> set_cpuid_entries(std::span<const kvm_cpuid_entry2> entries);
  // Reads the TSC back after a restore wrote `wanted` and moves the vCPU's
  // TSC offset by what is missing.
  [[nodiscard]] Result<void> ensure_tsc(uint64_t wanted, uint64_t khz, TscRestore* tsc);
  void unmap_run();
  UniqueFd fd_;
  uint32_t id_ = 0;
  kvm_run* run_ = nullptr;
  int mmap_size_ = 0;
  std::vector<kvm_cpuid_entry2> cpuid_set_;
  // After preset_cpuid(): the entries as KVM reports them back (it drops and
  // adjusts some), which is the form a saved state's CPUID has.
  std::vector<kvm_cpuid_entry2> cpuid_preset_effective_;
};

// True when `a` and `b` differ at most in the CPUID bits KVM recomputes
// whenever CR4, XCR0, XSS, APIC_BASE or MISC_ENABLE change
// (kvm_update_cpuid_runtime): restoring those registers sets them anyway.
[[nodiscard]] bool same_cpuid_but_runtime_bits(std::span<const kvm_cpuid_entry2> a,
                                               std::span<const kvm_cpuid_entry2> b);

}  // namespace vmm::kvm
