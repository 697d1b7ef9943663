#include "migration/saved_state.h"

#include "migration/state_blob.h"

#include <algorithm>
#include <charconv>
#include <map>
#include <set>

namespace vmm::migration {
namespace {

template <class T>
bool same_elements(const std::vector<T>& a, const std::vector<T>& b) {
  return std::ranges::equal(a, b, [](const T& x, const T& y) { return same_bytes(x, y); });
}

std::string hex(uint64_t value) {
  char digits[16];
  auto [end, ec] = std::to_chars(std::begin(digits), std::end(digits), value, 16);
  return "0x" + std::string(digits, end);
}

std::string size_text(uint64_t bytes) {
  constexpr uint64_t kMiB = 1ULL << 20;
  if (bytes % kMiB == 0) return std::to_string(bytes / kMiB) + " MiB";
  return std::to_string(bytes) + " bytes";
}

bool has_nul(std::string_view text) { return text.find('\0') != std::string_view::npos; }

}  // namespace

std::string_view slot_kind_name(SlotKind kind) {
  switch (kind) {
    case SlotKind::guest_memfd: return "guest_memfd";
    case SlotKind::userspace: return "userspace";
  }
  return "unknown";
}

std::optional<SlotKind> slot_kind_from_name(std::string_view name) {
  if (name == "guest_memfd") return SlotKind::guest_memfd;
  if (name == "userspace") return SlotKind::userspace;
  return std::nullopt;
}

std::string_view backing_name(memory::Backing backing) {
  switch (backing) {
    case memory::Backing::guest_memfd: return "guest_memfd";
    case memory::Backing::memfd: return "memfd";
  }
  return "unknown";
}

std::optional<memory::Backing> backing_from_name(std::string_view name) {
  if (name == "guest_memfd") return memory::Backing::guest_memfd;
  if (name == "memfd") return memory::Backing::memfd;
  return std::nullopt;
}

std::string_view role_name(memory::RegionRole role) {
  switch (role) {
    case memory::RegionRole::ram: return "ram";
    case memory::RegionRole::shared: return "shared";
  }
  return "unknown";
}

std::optional<memory::RegionRole> role_from_name(std::string_view name) {
  if (name == "ram") return memory::RegionRole::ram;
  if (name == "shared") return memory::RegionRole::shared;
  return std::nullopt;
}

bool same_vm_state(const kvm::VmState& a, const kvm::VmState& b) {
  return same_bytes(a.pic_master, b.pic_master) && same_bytes(a.pic_slave, b.pic_slave) &&
         same_bytes(a.ioapic, b.ioapic) && same_bytes(a.pit, b.pit) &&
         same_bytes(a.clock, b.clock);
}

bool same_vcpu_state(const kvm::VcpuState& a, const kvm::VcpuState& b) {
  return a.id == b.id && same_bytes(a.regs, b.regs) && same_bytes(a.sregs, b.sregs) &&
         same_bytes(a.fpu, b.fpu) && same_bytes(a.xsave, b.xsave) && same_bytes(a.xcrs, b.xcrs) &&
         a.msrs == b.msrs && same_bytes(a.lapic, b.lapic) && same_bytes(a.mp_state, b.mp_state) &&
         same_bytes(a.events, b.events) && same_bytes(a.debugregs, b.debugregs) &&
         same_elements(a.cpuid, b.cpuid) && a.tsc_khz == b.tsc_khz;
}

bool operator==(const SavedState& a, const SavedState& b) { return !first_difference(a, b).has_value(); }

Result<void> validate(const SavedState& state) {
  if (has_nul(state.metadata.vm_name) || has_nul(state.metadata.program_version))
    return fail("metadata has a string with an embedded NUL byte");

  if (state.vcpus.empty()) return fail("no vCPUs; a VM needs at least one");
  std::set<uint32_t> vcpu_ids;
  for (const kvm::VcpuState& vcpu : state.vcpus) {
    if (!vcpu_ids.insert(vcpu.id).second)
      return fail("vCPU id " + std::to_string(vcpu.id) + " appears more than once");
  }

  bool has_ram = false;
  std::set<std::string_view> names;
  std::map<uint32_t, std::string_view> slot_owner;
  for (const RegionRef& region : state.memory) {
    const memory::RegionSpec& spec = region.spec;
    if (spec.name.empty() || has_nul(spec.name))
      return fail("a memory region has an empty name or one with an embedded NUL byte");
    if (!names.insert(spec.name).second)
      return fail("memory region \"" + spec.name + "\" appears more than once");
    auto [owner, inserted] = slot_owner.emplace(spec.slot, spec.name);
    if (!inserted)
      return fail("memslot " + std::to_string(spec.slot) + " is given to both \"" +
                  std::string(owner->second) + "\" and \"" + spec.name + "\"");
    has_ram = has_ram || spec.role == memory::RegionRole::ram;
  }
  if (!has_ram) return fail("no RAM region; a VM needs at least one");
  return {};
}

std::string describe(const SavedState& state) {
  const SavedMetadata& meta = state.metadata;
  std::string text = "vm \"" + meta.vm_name + "\" generation " + std::to_string(meta.generation);
  if (!meta.program_version.empty()) text += " (written by vmm " + meta.program_version + ")";
  text += meta.was_running ? ", running" : ", paused";
  text += ": " + std::to_string(state.vcpus.size()) + " vCPU" +
          (state.vcpus.size() == 1 ? "" : "s") + ", memory";
  for (size_t i = 0; i < state.memory.size(); ++i) {
    const memory::RegionSpec& spec = state.memory[i].spec;
    text += (i == 0 ? " " : ", ") + spec.name + " " + std::string(backing_name(spec.backing)) +
            " " + size_text(spec.size) + " @" + hex(spec.gpa);
  }
  return text;
}

}  // namespace vmm::migration
