// Failures a test injects into a live update ("x-inject" on live-update).
//
// Injection exists only in a build compiled with VMM_FAULT_INJECTION defined:
// the test suite's `vmm-faults` binary (vmm_update_faults, built with the tests). A normal vmm does not know the
// argument at all: `x-inject` is refused like any other unknown parameter,
// so no client of a production socket can crash or stall an update.
#pragma once

#include <chrono>
#include <optional>
#include <string>
#include <string_view>

#include "base/result.h"

namespace vmm {

// Whether this binary was built with fault injection (a function, not a
// constant: the same headers are compiled into both builds).
[[nodiscard]] bool fault_injection_built();

enum class Fault {
  none,
  preserve_refused,  // prepare: preserve a file the backend has no handler for
  state_too_large,   // freeze: a state memfd too small for the state
  corrupt_state,     // restore: the new process sees a corrupted state blob
  wrong_token,       // restore: the new process asks for a region by a wrong token
  wrong_vm_token,    // restore: a guest_memfd's VM token does not match the VM
  target_refuses,    // transfer prepare: the new process reports it cannot build the VM
  target_crash,      // transfer handover: the new process dies after receiving the state
  delay_loaded,      // transfer: the new process says "loaded" only after the old one's deadline
  delay_go,          // transfer: the old process waits 300 ms before it says "go"
  skip_version_check,  // exec, transfer: hand over without asking the new binary its versions
  give_up_after_rebuild,  // restore: the new process gives up once it rebuilt the VM, before the guest runs
};

[[nodiscard]] Result<Fault> fault_from_string(std::string_view name);
[[nodiscard]] std::string_view to_string(Fault fault);
// Whether `fault` can be injected into an update in `mode`.
[[nodiscard]] bool fault_applies(Fault fault, std::string_view mode);
// Whether `fault` acts in the new process of an exec or kexec (`vmm
// restore`), so that it travels in the handover record.
[[nodiscard]] bool fault_acts_in_luo_restore(Fault fault);

// A test's fault plus the deadlines it shortens, so the crossing of a
// message and a deadline can be tested without waiting 30 s.
struct FaultPlan {
  Fault fault = Fault::none;
  std::optional<std::chrono::milliseconds> commit_timeout;  // transfer: how long the old side waits for "loaded"
};

}  // namespace vmm
