#include "kvm/vm.h"

#include <fcntl.h>
#include <fmt/format.h>

#include "kvm/ioctl.h"
#include "kvm/uapi.h"

namespace vmm::kvm {

namespace {

constexpr uint64_t kPageSize = 4096;
constexpr uint64_t kGuestMemfdMmapFlags =
    uapi::kGuestMemfdFlagMmap | uapi::kGuestMemfdFlagInitShared;

}  // namespace

Result<void> Vm::set_tss_addr(uint64_t gpa) {
  VMM_TRY(detail::ioctl(fd(), KVM_SET_TSS_ADDR, static_cast<unsigned long>(gpa),
                        fmt::format("KVM_SET_TSS_ADDR({:#x})", gpa)));
  return {};
}

Result<void> Vm::set_identity_map_addr(uint64_t gpa) {
  VMM_TRY(detail::ioctl(fd(), KVM_SET_IDENTITY_MAP_ADDR, &gpa,
                        fmt::format("KVM_SET_IDENTITY_MAP_ADDR({:#x})", gpa)));
  return {};
}

Result<void> Vm::create_irqchip() {
  VMM_TRY(detail::ioctl(fd(), KVM_CREATE_IRQCHIP, "KVM_CREATE_IRQCHIP"));
  return {};
}

Result<void> Vm::create_pit2() {
  // The dummy speaker port (0x61) keeps PIT calibration loops in the kernel,
  // as Firecracker does.
  kvm_pit_config config{};
  config.flags = KVM_PIT_SPEAKER_DUMMY;
  VMM_TRY(detail::ioctl(fd(), KVM_CREATE_PIT2, &config, "KVM_CREATE_PIT2"));
  return {};
}

Result<int> Vm::check_extension(long cap) const {
  return detail::ioctl(fd(), KVM_CHECK_EXTENSION, cap,
                       fmt::format("KVM_CHECK_EXTENSION({}) on the VM", cap));
}

Result<bool> Vm::usable_by_this_process(FdRef vm_fd) {
  auto answer = detail::ioctl(vm_fd, KVM_CHECK_EXTENSION, static_cast<long>(KVM_CAP_USER_MEMORY),
                              "KVM_CHECK_EXTENSION(KVM_CAP_USER_MEMORY) on the VM");
  if (answer) return true;
  if (answer.error().code == EIO) return false;
  return std::unexpected(answer.error());
}

Result<GuestMemfd> Vm::create_guest_memfd(uint64_t size, uint64_t flags) {
  if (size == 0 || size % kPageSize != 0) {
    return fail(fmt::format("guest_memfd size {:#x} is not a non-zero multiple of the page size "
                            "({})",
                            size, kPageSize),
                EINVAL);
  }
  // Ask first, so that a host without the feature gets a message that says
  // so instead of a bare EINVAL from KVM_CREATE_GUEST_MEMFD.
  VMM_TRY_ASSIGN(has_guest_memfd, check_extension(uapi::kCapGuestMemfd));
  VMM_TRY_ASSIGN(supported_flags, check_extension(uapi::kCapGuestMemfdFlags));
  const uint64_t missing = flags & ~static_cast<uint64_t>(supported_flags > 0 ? supported_flags : 0);
  if (has_guest_memfd <= 0) {
    return fail("this host's KVM lacks guest_memfd (KVM_CAP_GUEST_MEMFD, Linux 6.8+); use "
                "--memory-backing memfd",
                ENOTSUP);
  }
  if ((missing & kGuestMemfdMmapFlags) != 0) {
    return fail("this host's KVM lacks guest_memfd mmap support (KVM_CAP_GUEST_MEMFD_FLAGS lacks "
                "MMAP|INIT_SHARED); use --memory-backing memfd",
                ENOTSUP);
  }
  if (missing != 0) {
    return fail(fmt::format("this host's KVM lacks guest_memfd flags {:#x} (supported: {:#x})",
                            missing, supported_flags),
                ENOTSUP);
  }

  uapi::CreateGuestMemfd request{.size = size, .flags = flags, .reserved = {}};
  VMM_TRY_ASSIGN(gmem_fd, detail::ioctl(fd(), uapi::kCreateGuestMemfd, &request,
                                        fmt::format("KVM_CREATE_GUEST_MEMFD(size {:#x}, flags "
                                                    "{:#x})",
                                                    size, flags)));
  UniqueFd owned(gmem_fd);
  // KVM hands the descriptor out without O_CLOEXEC; like every other fd of
  // the VMM it must not leak into helper processes. Code that passes it
  // across exec clears the flag explicitly.
  if (::fcntl(owned.get(), F_SETFD, FD_CLOEXEC) < 0) {
    return fail_errno("fcntl(F_SETFD, FD_CLOEXEC) on the new guest_memfd");
  }
  return GuestMemfd(std::move(owned), size, flags);
}

Result<void> Vm::set_memory_slot(const MemorySlot& slot) {
  uapi::UserspaceMemoryRegion2 region{};
  region.slot = slot.slot;
  region.guest_phys_addr = slot.guest_phys_addr;
  region.memory_size = slot.size;
  region.userspace_addr = reinterpret_cast<uint64_t>(slot.host_address);
  if (slot.guest_memfd.valid()) {
    region.flags = uapi::kMemGuestMemfd;
    region.guest_memfd = static_cast<uint32_t>(slot.guest_memfd.get());
    region.guest_memfd_offset = slot.guest_memfd_offset;
  }
  VMM_TRY(detail::ioctl(
      fd(), uapi::kSetUserMemoryRegion2, &region,
      fmt::format("KVM_SET_USER_MEMORY_REGION2(slot {}, gpa {:#x}, size {:#x}{})", slot.slot,
                  slot.guest_phys_addr, slot.size,
                  slot.guest_memfd.valid() ? fmt::format(", guest_memfd {} at offset {:#x}",
                                                         slot.guest_memfd.get(),
                                                         slot.guest_memfd_offset)
                                           : std::string())));
  return {};
}

Result<void> Vm::clear_memory_slot(uint32_t slot) {
  return set_memory_slot(MemorySlot{.slot = slot});
}

Result<Vcpu> Vm::create_vcpu(uint32_t id) {
  VMM_TRY_ASSIGN(vcpu_fd, detail::ioctl(fd(), KVM_CREATE_VCPU, static_cast<unsigned long>(id),
                                        fmt::format("KVM_CREATE_VCPU({})", id)));
  return Vcpu::adopt(UniqueFd(vcpu_fd), id, vcpu_mmap_size_);
}

Result<void> Vm::set_irq_line(uint32_t gsi, bool level) {
  kvm_irq_level irq{};
  irq.irq = gsi;
  irq.level = level ? 1 : 0;
  VMM_TRY(detail::ioctl(fd(), KVM_IRQ_LINE, &irq,
                        fmt::format("KVM_IRQ_LINE(gsi {}, level {})", gsi, irq.level)));
  return {};
}

Result<VmState> Vm::save() const {
  VmState state;
  auto get_chip = [&](uint32_t chip_id, const char* name) -> Result<kvm_irqchip> {
    kvm_irqchip chip{};
    chip.chip_id = chip_id;
    VMM_TRY(detail::ioctl(fd(), KVM_GET_IRQCHIP, &chip, fmt::format("KVM_GET_IRQCHIP({})", name)));
    return chip;
  };
  VMM_TRY_ASSIGN(master, get_chip(KVM_IRQCHIP_PIC_MASTER, "PIC master"));
  VMM_TRY_ASSIGN(slave, get_chip(KVM_IRQCHIP_PIC_SLAVE, "PIC slave"));
  VMM_TRY_ASSIGN(ioapic, get_chip(KVM_IRQCHIP_IOAPIC, "IOAPIC"));
  state.pic_master = master.chip.pic;
  state.pic_slave = slave.chip.pic;
  state.ioapic = ioapic.chip.ioapic;
  VMM_TRY(detail::ioctl(fd(), KVM_GET_PIT2, &state.pit, "KVM_GET_PIT2"));
  VMM_TRY(detail::ioctl(fd(), KVM_GET_CLOCK, &state.clock, "KVM_GET_CLOCK"));
  return state;
}

Result<void> Vm::restore(const VmState& state) {
  auto set_chip = [&](uint32_t chip_id, const char* name, auto assign) -> Result<void> {
    kvm_irqchip chip{};
    chip.chip_id = chip_id;
    assign(chip);
    VMM_TRY(detail::ioctl(fd(), KVM_SET_IRQCHIP, &chip, fmt::format("KVM_SET_IRQCHIP({})", name)));
    return {};
  };
  VMM_TRY(set_chip(KVM_IRQCHIP_PIC_MASTER, "PIC master",
                   [&](kvm_irqchip& chip) { chip.chip.pic = state.pic_master; }));
  VMM_TRY(set_chip(KVM_IRQCHIP_PIC_SLAVE, "PIC slave",
                   [&](kvm_irqchip& chip) { chip.chip.pic = state.pic_slave; }));
  VMM_TRY(set_chip(KVM_IRQCHIP_IOAPIC, "IOAPIC",
                   [&](kvm_irqchip& chip) { chip.chip.ioapic = state.ioapic; }));
  kvm_pit_state2 pit = state.pit;
  VMM_TRY(detail::ioctl(fd(), KVM_SET_PIT2, &pit, "KVM_SET_PIT2"));

  // The guest gets exactly the saved clock. KVM_GET_CLOCK's flags are not
  // passed back: TSC_STABLE is rejected by KVM_SET_CLOCK before Linux 5.16
  // (Firecracker clears it too), and REALTIME would make KVM add the wall
  // time since the save on its own, on top of any downtime the caller already
  // accounts for (vmm/restore.cc advances the clock and the TSC together).
  kvm_clock_data clock = state.clock;
  clock.flags = 0;
  VMM_TRY(detail::ioctl(fd(), KVM_SET_CLOCK, &clock, "KVM_SET_CLOCK"));
  return {};
}

}  // namespace vmm::kvm
