#include "update/faults.h"

#include <array>
#include <utility>

#include <fmt/format.h>

namespace vmm {
namespace {

constexpr std::array<std::pair<Fault, std::string_view>, 12> kNames{{
    {Fault::none, "none"},
    {Fault::preserve_refused, "preserve-refused"},
    {Fault::state_too_large, "state-too-large"},
    {Fault::corrupt_state, "corrupt-state"},
    {Fault::wrong_token, "wrong-token"},
    {Fault::wrong_vm_token, "wrong-vm-token"},
    {Fault::target_refuses, "target-refuses"},
    {Fault::target_crash, "target-crash"},
    {Fault::delay_loaded, "delay-loaded"},
    {Fault::delay_go, "delay-go"},
    {Fault::skip_version_check, "skip-version-check"},
    {Fault::give_up_after_rebuild, "give-up-after-rebuild"},
}};

}  // namespace

bool fault_injection_built() {
#if defined(VMM_FAULT_INJECTION)
  return true;
#else
  return false;
#endif
}

Result<Fault> fault_from_string(std::string_view name) {
  for (const auto& [fault, text] : kNames)
    if (text == name) return fault;
  std::string known;
  for (const auto& [fault, text] : kNames) {
    if (fault == Fault::none) continue;
    if (!known.empty()) known += ", ";
    known += text;
  }
  return fail(fmt::format("unknown fault '{}': use one of {}", name, known), EINVAL);
}

std::string_view to_string(Fault fault) {
  for (const auto& [value, text] : kNames)
    if (value == fault) return text;
  return "none";
}

bool fault_applies(Fault fault, std::string_view mode) {
  const bool transfer = mode == "transfer";
  switch (fault) {
    case Fault::none: return true;
    case Fault::state_too_large:
    case Fault::corrupt_state: return true;
    case Fault::preserve_refused:
    case Fault::wrong_token:
    case Fault::wrong_vm_token:
    case Fault::give_up_after_rebuild: return !transfer;
    case Fault::target_refuses:
    case Fault::target_crash:
    case Fault::delay_loaded:
    case Fault::delay_go: return transfer;
    case Fault::skip_version_check: return mode != "kexec" && mode != "fdstore";
  }
  return false;
}

bool fault_acts_in_luo_restore(Fault fault) {
  return fault == Fault::corrupt_state || fault == Fault::wrong_token || fault == Fault::wrong_vm_token ||
         fault == Fault::give_up_after_rebuild;
}

}  // namespace vmm
