// The one way a Machine is built. Its three entry points differ only in
// where the VM and its memory come from:
//
//   NewMemory     (Machine::create)   a new VM; memory created and
//                 preallocated; the kernel loaded; vCPUs at the PVH entry,
//                 no thread started yet.
//   PrebuildInputs (Machine::prebuild) a new VM on the memory files a
//                 transfer received; empty vCPUs, threads parked; the state
//                 comes later (load_state).
//   RestoreInputs (Machine::restore)  the VM fd and files retrieved from a
//                 LUO session; empty vCPUs, threads parked, then load_state.
//
// Every path runs the same steps in the same order (docs/architecture.md,
// "How a Machine is built"); a failed build leaves nothing behind.
#pragma once

#include <memory>
#include <variant>

#include "base/result.h"
#include "machine/machine.h"

namespace vmm {

class MachineBuilder {
 public:
  struct NewMemory {};
  using MemorySource = std::variant<NewMemory, PrebuildInputs, RestoreInputs>;

  [[nodiscard]] static Result<std::unique_ptr<Machine>> build(MachineConfig config, MemorySource source);
};

}  // namespace vmm
