// A 16550A UART on the legacy COM1 ports: what the guest writes goes to the
// console sink (stdout, a file, or nowhere). Transmission is instantaneous,
// so the transmitter is always empty.
#pragma once

#include <cstdint>
#include <algorithm>
#include <deque>
#include <functional>
#include <mutex>
#include <string>

#include "base/result.h"
#include "base/unique_fd.h"
#include "machine/devices/bus.h"
#include "migration/saved_state.h"

namespace vmm::devices {

inline constexpr uint16_t kCom1Base = 0x3f8;
inline constexpr uint16_t kCom1Irq = 4;

// Where console output goes. Writes whole lines (or full buffers) at a time.
class ConsoleSink {
 public:
  static ConsoleSink none() { return ConsoleSink(UniqueFd(), false); }
  static ConsoleSink stdout_sink();
  // Creates or appends to PATH; the error names the path.
  [[nodiscard]] static Result<ConsoleSink> file(const std::string& path);

  void put(uint8_t byte);
  void flush();

 private:
  ConsoleSink(UniqueFd fd, bool enabled) : fd_(std::move(fd)), enabled_(enabled) {}
  UniqueFd fd_;  // stdout is borrowed: its UniqueFd holds a dup
  bool enabled_ = false;
  std::string pending_;
};

class Serial final : public BusDevice {
 public:
  using IrqLine = std::function<void(bool level)>;
  Serial(ConsoleSink sink, IrqLine irq) : sink_(std::move(sink)), irq_(std::move(irq)) {}

  void read(uint64_t offset, std::span<uint8_t> data) override;
  void write(uint64_t offset, std::span<const uint8_t> data) override;

  // Input for the guest (not wired to stdin yet; used by save/restore and tests).
  void enqueue_input(uint8_t byte);
  void flush() { std::lock_guard lock(mutex_); sink_.flush(); }

  // Everything the guest can observe, as plain data (with the derived IIR,
  // LSR and interrupt line level as they are now; reading them here has none
  // of the side effects a guest read has).
  [[nodiscard]] migration::UartState save() const;
  // Takes over a saved state: registers, receive FIFO, the pending
  // transmitter-empty interrupt, and drives the interrupt line to the level
  // they imply (the irqchip restored before may hold either). Refuses, and
  // changes nothing, a state this UART cannot hold: more pending input than
  // its FIFO, or register bits a 16550 does not have.
  [[nodiscard]] Result<void> restore(const migration::UartState& state);

 private:
  // The registers as stored; IIR and LSR are computed from them.
  struct Registers {
    uint8_t ier = 0, lcr = 0, mcr = 0, msr = 0, scr = 0;
    uint8_t dll = 0x0c, dlm = 0, fcr = 0;
    bool thr_interrupt_pending = false;
    std::deque<uint8_t> rx;
  };

  uint8_t read_register(uint64_t offset);
  void write_register(uint64_t offset, uint8_t value);
  uint8_t interrupt_identification() const;
  uint8_t line_status() const;
  bool irq_level_wanted() const;
  void update_irq();

  mutable std::mutex mutex_;
  Registers regs_;
  ConsoleSink sink_;
  IrqLine irq_;
  bool irq_level_ = false;
};

// isa-debug-exit compatible port: any write is the guest asking to shut down.
class ExitPort final : public BusDevice {
 public:
  explicit ExitPort(std::function<void(uint8_t code)> on_exit) : on_exit_(std::move(on_exit)) {}
  void read(uint64_t, std::span<uint8_t> data) override { std::ranges::fill(data, 0xff); }
  void write(uint64_t, std::span<const uint8_t> data) override {
    on_exit_(data.empty() ? 0 : data[0]);
  }

 private:
  std::function<void(uint8_t)> on_exit_;
};

}  // namespace vmm::devices
