// Shared by the kvm and memory tests: a fixture that opens /dev/kvm (or skips
// the test, saying why), a minimal VM for real-mode test code, and an fd count.
#pragma once

#include <dirent.h>
#include <gtest/gtest.h>

#include <optional>
#include <utility>

#include "kvm/system.h"
#include "kvm/vm.h"

namespace vmm::kvm::testing {

// Descriptors open in this process (entries of /proc/self/fd, minus the one
// opendir itself holds).
inline int count_open_fds() {
  DIR* dir = ::opendir("/proc/self/fd");
  if (dir == nullptr) return -1;
  int count = 0;
  while (const dirent* entry = ::readdir(dir)) {
    if (entry->d_name[0] != '.') ++count;
  }
  ::closedir(dir);
  return count - 1;
}

class KvmTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto opened = System::open();
    if (!opened) GTEST_SKIP() << "/dev/kvm not available: " << opened.error().describe();
    system_.emplace(std::move(*opened));
  }

  System& system() { return *system_; }

  // A VM that can run real-mode code (TSS and identity map where QEMU puts
  // them, needed by VMX without unrestricted guest) with the in-kernel
  // irqchip and PIT, as the VMM creates them.
  Result<Vm> make_vm() {
    VMM_TRY_ASSIGN(vm, system().create_vm());
    VMM_TRY(vm.set_identity_map_addr(0xfffbc000));
    VMM_TRY(vm.set_tss_addr(0xfffbd000));
    VMM_TRY(vm.create_irqchip());
    VMM_TRY(vm.create_pit2());
    return vm;
  }

 private:
  std::optional<System> system_;
};

}  // namespace vmm::kvm::testing
