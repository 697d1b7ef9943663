// Dispatch of port I/O and MMIO exits to devices by address range.
#pragma once

#include <cstdint>
#include <map>
#include <span>
#include <string>

#include "base/result.h"

namespace vmm::devices {

class BusDevice {
 public:
  virtual ~BusDevice() = default;
  // `offset` is relative to the base the device was registered at. Called
  // from vCPU threads, possibly concurrently: devices lock their own state.
  virtual void read(uint64_t offset, std::span<uint8_t> data) = 0;
  virtual void write(uint64_t offset, std::span<const uint8_t> data) = 0;
};

class Bus {
 public:
  explicit Bus(std::string name) : name_(std::move(name)) {}
  // Registers [base, base+length) for `device` (not owned). Fails on overlap.
  [[nodiscard]] Result<void> add(uint64_t base, uint64_t length, BusDevice* device);
  // False when nothing is mapped at `address`: the caller decides what an
  // unclaimed access means (reads as all-ones, writes are dropped).
  bool read(uint64_t address, std::span<uint8_t> data) const;
  bool write(uint64_t address, std::span<const uint8_t> data) const;

 private:
  struct Range {
    uint64_t length;
    BusDevice* device;
  };
  const std::pair<const uint64_t, Range>* find(uint64_t address) const;
  std::string name_;
  std::map<uint64_t, Range> ranges_;  // by base; built before vCPUs run, read-only after
};

}  // namespace vmm::devices
