// What `vmm-bench blackout` measures and where it writes.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace bench {

struct RamSize {
  std::string label;  // as given, e.g. "4G"
  uint64_t bytes = 0;
};

struct BlackoutOptions {
  std::vector<RamSize> sizes;                 // --sizes
  std::vector<uint32_t> vcpus{1, 2};          // --vcpus
  int updates = 10;                           // --updates
  int large_updates = 3;                      // --large-updates, for sizes >= kLargeSize
  std::vector<std::string> modes{"exec", "transfer"};        // --modes
  std::vector<std::string> peers{"qemu-shared", "qemu-file"};  // --peers (empty: none)
  std::string backing = "guest_memfd";        // --backing
  std::string out;                            // --out
  std::string vmm;                            // --vmm
  std::string qemu = "qemu-system-x86_64";    // --qemu
  std::string guest;                          // --guest: the PVH ELF QEMU boots
  int sweep_ms = 50;                          // --sweep-ms
  std::string work_dir;                       // --work-dir: sockets, QEMU's state file
  std::string shm_dir = "/dev/shm";           // QEMU's guest RAM files
  std::string command_line;                   // as invoked, for the report

  // Sizes from which --large-updates applies: each update there waits out a
  // brown-out of tens of seconds (the guest re-faults GiBs page by page).
  static constexpr uint64_t kLargeSize = uint64_t{4} << 30;
  [[nodiscard]] int updates_for(const RamSize& size) const {
    return size.bytes >= kLargeSize ? large_updates : updates;
  }
};

}  // namespace bench
