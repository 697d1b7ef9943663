// The model-specific registers that carry guest state KVM does not put in
// kvm_regs/kvm_sregs (EFER and APIC_BASE are in kvm_sregs).
#pragma once

#include <cstdint>
#include <span>

namespace vmm::kvm::msr {

inline constexpr uint32_t kTsc = 0x10;
inline constexpr uint32_t kKvmWallClockLegacy = 0x11;
inline constexpr uint32_t kKvmSystemTimeLegacy = 0x12;
inline constexpr uint32_t kTscAdjust = 0x3b;
inline constexpr uint32_t kSysenterCs = 0x174;
inline constexpr uint32_t kSysenterEsp = 0x175;
inline constexpr uint32_t kSysenterEip = 0x176;
inline constexpr uint32_t kMiscEnable = 0x1a0;
inline constexpr uint32_t kPat = 0x277;
inline constexpr uint32_t kTscDeadline = 0x6e0;
inline constexpr uint32_t kStar = 0xc0000081;
inline constexpr uint32_t kLstar = 0xc0000082;
inline constexpr uint32_t kCstar = 0xc0000083;
inline constexpr uint32_t kSyscallMask = 0xc0000084;  // SFMASK
inline constexpr uint32_t kKernelGsBase = 0xc0000102;
inline constexpr uint32_t kTscAux = 0xc0000103;
inline constexpr uint32_t kKvmWallClock = 0x4b564d00;
inline constexpr uint32_t kKvmSystemTime = 0x4b564d01;
inline constexpr uint32_t kKvmAsyncPfEn = 0x4b564d02;
inline constexpr uint32_t kKvmStealTime = 0x4b564d03;
inline constexpr uint32_t kKvmPvEoiEn = 0x4b564d04;
inline constexpr uint32_t kKvmAsyncPfInt = 0x4b564d06;

// In restore order, except TSC_DEADLINE, which Vcpu::restore applies after
// the LAPIC. System::msrs_to_save() keeps those this host's KVM lists.
inline constexpr uint32_t kWorthSaving[] = {
    kTsc,          kTscAdjust,     kSysenterCs,          kSysenterEsp,   kSysenterEip,
    kMiscEnable,   kPat,           kStar,                kLstar,         kCstar,
    kSyscallMask,  kKernelGsBase,  kTscAux,              kKvmWallClock,  kKvmSystemTime,
    kKvmWallClockLegacy, kKvmSystemTimeLegacy, kKvmAsyncPfEn, kKvmAsyncPfInt, kKvmStealTime,
    kKvmPvEoiEn,   kTscDeadline,
};

}  // namespace vmm::kvm::msr

namespace vmm::kvm {
[[nodiscard]] constexpr std::span<const uint32_t> msrs_worth_saving() { return msr::kWorthSaving; }
}  // namespace vmm::kvm
