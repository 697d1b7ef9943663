#include "machine/device_set.h"

#include <algorithm>

#include <spdlog/spdlog.h>

namespace vmm {

Result<std::unique_ptr<DeviceSet>> DeviceSet::build(devices::ConsoleSink console, kvm::Vm& vm,
                                                    const memory::GuestMemory& memory,
                                                    std::function<void(uint8_t code)> on_guest_exit) {
  std::unique_ptr<DeviceSet> set(new DeviceSet());
  set->serial_ = std::make_unique<devices::Serial>(std::move(console), [&vm](bool level) {
    if (auto raised = vm.set_irq_line(devices::kCom1Irq, level); !raised)
      spdlog::warn("serial interrupt: {}", raised.error().describe());
  });
  VMM_TRY(set->pio_bus_.add(devices::kCom1Base, 8, set->serial_.get()));
  set->exit_port_ = std::make_unique<devices::ExitPort>(std::move(on_guest_exit));
  VMM_TRY(set->pio_bus_.add(kExitPort, 1, set->exit_port_.get()));

  const memory::Region* shared = memory.region("shared");
  if (!shared) return fail("the memory layout has no shared region");
  set->guest_link_ = std::make_unique<devices::TestGuestLink>(shared->host(), shared->size());
  return set;
}

bool DeviceSet::io_in(uint16_t port, std::span<uint8_t> data) {
  if (pio_bus_.read(port, data)) return true;
  std::ranges::fill(data, 0xff);  // nothing there: the bus floats high
  if (unclaimed_accesses_.fetch_add(1) < 16) spdlog::debug("unclaimed port read 0x{:x}", port);
  return false;
}

bool DeviceSet::io_out(uint16_t port, std::span<const uint8_t> data) {
  if (pio_bus_.write(port, data)) return true;
  if (unclaimed_accesses_.fetch_add(1) < 16) spdlog::debug("unclaimed port write 0x{:x}", port);
  return false;
}

bool DeviceSet::mmio_read(uint64_t address, std::span<uint8_t> data) {
  if (mmio_bus_.read(address, data)) return true;
  std::ranges::fill(data, 0xff);
  if (unclaimed_accesses_.fetch_add(1) < 16) spdlog::debug("unclaimed MMIO read 0x{:x}", address);
  return false;
}

bool DeviceSet::mmio_write(uint64_t address, std::span<const uint8_t> data) {
  if (mmio_bus_.write(address, data)) return true;
  if (unclaimed_accesses_.fetch_add(1) < 16) spdlog::debug("unclaimed MMIO write 0x{:x}", address);
  return false;
}

}  // namespace vmm
