// The devices of a Machine: the port I/O and MMIO buses, the COM1 serial
// port, the exit port and the VMM's end of the test-guest protocol. Called
// from vCPU threads (each device locks its own state).
#pragma once

#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>

#include "base/result.h"
#include "kvm/vm.h"
#include "machine/devices/bus.h"
#include "machine/devices/serial.h"
#include "machine/devices/test_guest.h"
#include "memory/guest_memory.h"

namespace vmm {

class DeviceSet {
 public:
  // The exit port (isa-debug-exit); a write parks the writing vCPU.
  static constexpr uint16_t kExitPort = VMM_GUEST_EXIT_PORT;

  // Wires the serial port's interrupt to `vm` and the exit port to
  // `on_guest_exit`; the test-guest link sits on `memory`'s shared region.
  // Both must outlive the set.
  [[nodiscard]] static Result<std::unique_ptr<DeviceSet>> build(devices::ConsoleSink console, kvm::Vm& vm,
                                                                const memory::GuestMemory& memory,
                                                                std::function<void(uint8_t code)> on_guest_exit);
  DeviceSet(const DeviceSet&) = delete;
  DeviceSet& operator=(const DeviceSet&) = delete;

  // False when nothing claims the address (reads then float high).
  bool io_in(uint16_t port, std::span<uint8_t> data);
  bool io_out(uint16_t port, std::span<const uint8_t> data);
  bool mmio_read(uint64_t address, std::span<uint8_t> data);
  bool mmio_write(uint64_t address, std::span<const uint8_t> data);

  [[nodiscard]] devices::Serial& serial() { return *serial_; }
  [[nodiscard]] devices::TestGuestLink& guest() { return *guest_link_; }
  void flush_console() { serial_->flush(); }

 private:
  DeviceSet() = default;
  devices::Bus pio_bus_{"port I/O"};
  devices::Bus mmio_bus_{"MMIO"};
  std::unique_ptr<devices::Serial> serial_;
  std::unique_ptr<devices::ExitPort> exit_port_;
  std::unique_ptr<devices::TestGuestLink> guest_link_;
  std::atomic<uint64_t> unclaimed_accesses_{0};
};

}  // namespace vmm
