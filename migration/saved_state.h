// Everything a live update carries from the old VMM process to the new one,
// as plain data. Guest RAM is never part of it: memory regions are referenced
// by their LUO tokens and re-attached around the same pages.
//
// The types are aggregates; kernel structs have no operator==, so equality
// compares them byte for byte (same_bytes and the same_* helpers below).
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "base/result.h"
#include "kvm/state.h"
#include "memory/layout.h"

namespace vmm::migration {

// The format's limits on variable-length values (encode and decode refuse
// more; max_encoded_size() is computed from them).
inline constexpr size_t kMaxStringLength = 1024;      // vm-name, program-version, region names
inline constexpr size_t kMaxMsrsPerVcpu = 256;        // kvm::msrs_worth_saving() has 22
inline constexpr size_t kMaxCpuidEntries = 256;       // KVM_MAX_CPUID_ENTRIES
inline constexpr size_t kMaxUartPendingInput = 64;    // the UART's receive FIFO (devices::Serial)

// A 16550 UART (COM1 at 0x3f8) as devices::Serial::save() produces it and
// restore() takes it. The defaults are the registers after reset.
struct UartState {
  uint8_t ier = 0;     // interrupt enable
  uint8_t iir = 0x01;  // interrupt identification at save (derived: restore recomputes it)
  uint8_t lcr = 0;     // line control (bit 7: DLAB)
  uint8_t mcr = 0;     // modem control
  uint8_t lsr = 0x60;  // line status at save (derived: restore recomputes it)
  uint8_t msr = 0;     // modem status
  uint8_t scr = 0;     // scratch
  uint8_t dll = 0x0c;  // divisor latch low
  uint8_t dlm = 0;     // divisor latch high
  uint8_t fcr = 0;     // FIFO control (write-only to the guest, but it shapes iir)
  std::vector<uint8_t> pending_input;  // received bytes the guest has not read yet, oldest first
  bool irq_level = false;              // level of the UART's interrupt line at save (derived)
  // The transmitter-empty interrupt is raised and not yet acknowledged (by an
  // IIR read or a THR write). Not derivable from the registers: without it a
  // guest waiting for that interrupt to send more would wait forever.
  bool thr_interrupt_pending = false;
  friend bool operator==(const UartState&, const UartState&) = default;
};

// The VMM-side driver of the test guest's shared-region protocol
// (guest/protocol.h): what it had asked and seen when the state was saved.
struct TestDeviceState {
  struct VerifyResult {
    uint64_t pages_checked = 0;
    uint64_t mismatches = 0;
    friend bool operator==(const VerifyResult&, const VerifyResult&) = default;
  };
  uint64_t last_verify_request = 0;  // last verify_request number the VMM issued
  VerifyResult last_result;          // the guest's answer to it
  uint64_t heartbeat_at_save = 0;    // shared->heartbeat when the vCPUs were paused
  friend bool operator==(const TestDeviceState&, const TestDeviceState&) = default;
};

// How a region is given to KVM: a guest_memfd slot (KVM_MEM_GUEST_MEMFD) or a
// plain userspace mapping.
using memory::SlotKind;
[[nodiscard]] std::string_view slot_kind_name(SlotKind kind);
[[nodiscard]] std::optional<SlotKind> slot_kind_from_name(std::string_view name);

// Names used in the blob for memory enums. Kept here rather than borrowed from
// vmm_memory: the spelling is part of the state format and must not change
// just because a log message elsewhere does.
[[nodiscard]] std::string_view backing_name(memory::Backing backing);
[[nodiscard]] std::optional<memory::Backing> backing_from_name(std::string_view name);
[[nodiscard]] std::string_view role_name(memory::RegionRole role);
[[nodiscard]] std::optional<memory::RegionRole> role_from_name(std::string_view name);

// A guest memory region as preserved across the update: its layout plus the
// tokens under which its file descriptors were handed to LUO.
struct RegionRef {
  memory::RegionSpec spec;
  uint64_t luo_token = 0;  // token of the region's memfd / guest_memfd
  uint64_t vm_token = 0;   // token of the VM a guest_memfd belongs to; 0 for memfd regions
  SlotKind slot_kind = SlotKind::guest_memfd;
  friend bool operator==(const RegionRef&, const RegionRef&) = default;
};

struct SavedMetadata {
  std::string vm_name;
  uint64_t generation = 0;      // live updates this VM has survived
  std::string program_version;  // version of the vmm that wrote the state (informational)
  uint64_t saved_at_realtime_ns = 0;  // CLOCK_REALTIME at save: survives kexec
  bool was_running = false;           // resume the vCPUs after restore
  // The guest TSC at save, paired with the host CLOCK_MONOTONIC reading taken
  // at the same moment, so the new process can advance the guest TSC by the
  // real time that passed. CLOCK_MONOTONIC restarts on kexec: across a kexec
  // the elapsed time has to come from saved_at_realtime_ns instead.
  uint64_t guest_tsc_at_save = 0;
  uint64_t host_monotonic_ns_at_save = 0;
  uint64_t vm_luo_token = 0;  // token of the preserved VM fd
  friend bool operator==(const SavedMetadata&, const SavedMetadata&) = default;
};

struct SavedState {
  SavedMetadata metadata;
  kvm::VmState vm;
  std::vector<kvm::VcpuState> vcpus;
  std::vector<RegionRef> memory;
  UartState uart;
  TestDeviceState test_device;
  friend bool operator==(const SavedState& a, const SavedState& b);
};

// Equality is everything the blob carries (first_difference() in
// state_blob.h, which walks the schema).

// Byte-wise equality for kernel structs (they have no operator==; their
// padding is explicit or zero-initialized, and a round trip copies it as is).
template <class T>
[[nodiscard]] bool same_bytes(const T& a, const T& b) {
  static_assert(std::is_trivially_copyable_v<T>);
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}
[[nodiscard]] bool same_vm_state(const kvm::VmState& a, const kvm::VmState& b);
[[nodiscard]] bool same_vcpu_state(const kvm::VcpuState& a, const kvm::VcpuState& b);

// The consistency rules every state must satisfy, checked by encode (so a bad
// state fails while the old process can still report it) and by decode:
// at least one vCPU, unique vCPU ids, at least one RAM region, unique region
// names and memslots, and strings without embedded NULs. (The size limits
// above are checked property by property by the blob's schema.)
[[nodiscard]] Result<void> validate(const SavedState& state);

// One line for logs: VM name, generation, writer version, vCPUs and regions.
[[nodiscard]] std::string describe(const SavedState& state);

}  // namespace vmm::migration
