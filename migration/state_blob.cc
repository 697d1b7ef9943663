// Saved state blob, format 1.0: a fixed header followed by a flattened device
// tree (FDT, built with libfdt's sequential-write API, read with its
// read-only API after fdt_check_full). Also described in docs/state-format.md.
//
// Header (32 bytes, little-endian):
//   0  u8[8] magic "VMMSTATE"
//   8  u16   format major      unknown major: refused
//  10  u16   format minor      newer minor: accepted
//  12  u32   header size       >= 32; the payload starts here
//  16  u64   payload size      bytes of FDT (== its totalsize)
//  24  u32   payload CRC32C
//  28  u32   flags             none defined; ignored
//
// FDT (integers are big-endian FDT cells: u32 = 1 cell, u64 = 2 cells;
// kernel structs are their raw bytes, as the same host's KVM ABI lays them
// out; strings are NUL-terminated):
//
//   / {
//     compatible = "vmm,saved-state";             // optional, informational
//     format-version = <major minor>;               // must match the header
//     metadata {
//       vm-name = "...";
//       generation = <u64>;
//       program-version = "...";                    // optional, default ""
//       saved-at-realtime-ns = <u64>;               // CLOCK_REALTIME
//       was-running = <u32 0|1>;
//       guest-tsc-at-save = <u64>;
//       host-monotonic-ns-at-save = <u64>;          // CLOCK_MONOTONIC, same instant
//       vm-luo-token = <u64>;
//     };
//     vm {
//       pic-master, pic-slave = [kvm_pic_state];
//       ioapic = [kvm_ioapic_state];
//       pit = [kvm_pit_state2];
//       clock = [kvm_clock_data];
//     };
//     vcpus {
//       vcpu@<id, hex> {
//         id = <u32>;
//         regs = [kvm_regs]; sregs = [kvm_sregs]; fpu = [kvm_fpu];
//         xsave = [4096 bytes: the legacy kvm_xsave region]; xcrs = [kvm_xcrs];
//         msrs = [16 bytes per MSR: be32 index, be32 0 (ignored), be64 data];
//         lapic = [kvm_lapic_state]; mp-state = [kvm_mp_state];
//         events = [kvm_vcpu_events]; debugregs = [kvm_debugregs];
//         cpuid = [kvm_cpuid_entry2 array];
//         tsc-khz = <u64>;
//       };
//     };
//     devices {
//       uart@3f8 {
//         ier, iir, lcr, mcr, lsr, msr, scr, dll, dlm, fcr = <u32 0..255>;
//         pending-input = [bytes];                  // optional, default empty
//         irq-level = <u32 0|1>;
//       };
//       test-guest {
//         last-verify-request, last-pages-checked, last-mismatches,
//         heartbeat-at-save = <u64>;
//       };
//     };
//     memory {
//       region@<index, hex> {                       // in layout order
//         name = "..."; role = "ram"|"shared"; backing = "guest_memfd"|"memfd";
//         gpa, size = <u64>; slot = <u32>;
//         luo-token, vm-token = <u64>; slot-kind = "guest_memfd"|"userspace";
//       };
//     };
//   };
//
// Readers look properties and nodes up by name and ignore what they do not
// know, so a newer minor version may add either. A property this reader
// requires must be present with the exact size; the short list of optional
// ones gets defaults. vcpu@/region@ nodes are recognized by their prefix;
// other children of /vcpus and /memory are ignored.
#include "migration/state_blob.h"

#include <libfdt.h>

#include <algorithm>
#include <charconv>
#include <climits>
#include <cstring>
#include <expected>
#include <optional>
#include <string>
#include <string_view>

namespace vmm::migration {
namespace {

constexpr size_t kMsrRecordSize = 16;
constexpr std::string_view kVcpuPrefix = "vcpu@";
constexpr std::string_view kRegionPrefix = "region@";
constexpr const char* kUartNode = "uart@3f8";

// ---- byte order -------------------------------------------------------------

template <class T>
void store_le(uint8_t* out, T value) {
  for (size_t i = 0; i < sizeof(T); ++i) out[i] = static_cast<uint8_t>(value >> (8 * i));
}
template <class T>
T load_le(const uint8_t* in) {
  T value = 0;
  for (size_t i = 0; i < sizeof(T); ++i) value |= static_cast<T>(in[i]) << (8 * i);
  return value;
}
template <class T>
void store_be(uint8_t* out, T value) {
  for (size_t i = 0; i < sizeof(T); ++i)
    out[i] = static_cast<uint8_t>(value >> (8 * (sizeof(T) - 1 - i)));
}
template <class T>
T load_be(const uint8_t* in) {
  T value = 0;
  for (size_t i = 0; i < sizeof(T); ++i) value = static_cast<T>(value << 8) | in[i];
  return value;
}

std::string hex(uint64_t value) {
  char digits[16];
  auto [end, ec] = std::to_chars(std::begin(digits), std::end(digits), value, 16);
  return std::string(digits, end);
}

bool is_fdt_aligned(const void* address) {
  // libfdt refuses a tree that is not 8-byte aligned (FDT_ERR_ALIGNMENT).
  return reinterpret_cast<uintptr_t>(address) % 8 == 0;
}

// ---- CRC32C -----------------------------------------------------------------

constexpr std::array<uint32_t, 256> make_crc32c_table() {
  constexpr uint32_t kReflectedCastagnoli = 0x82F63B78;
  std::array<uint32_t, 256> table{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t crc = i;
    for (int bit = 0; bit < 8; ++bit) crc = (crc >> 1) ^ ((crc & 1) ? kReflectedCastagnoli : 0);
    table[i] = crc;
  }
  return table;
}
constexpr std::array<uint32_t, 256> kCrc32cTable = make_crc32c_table();

// ---- writing ----------------------------------------------------------------

// libfdt's sequential-write calls, with the first error kept and every later
// call skipped, so building the tree reads as straight-line code.
class FdtWriter {
 public:
  explicit FdtWriter(std::span<uint8_t> buffer) : fdt_(buffer.data()) {
    const int size = static_cast<int>(std::min<size_t>(buffer.size(), INT_MAX));
    // No name deduplication: libfdt would compare every property name with
    // every name so far, and the blob is written inside the blackout.
    check(fdt_create_with_flags(fdt_, size, FDT_CREATE_FLAG_NO_NAME_DEDUP));
    if (ok()) check(fdt_finish_reservemap(fdt_));
  }

  void begin_node(const std::string& name) {
    if (ok()) check(fdt_begin_node(fdt_, name.c_str()));
  }
  void end_node() {
    if (ok()) check(fdt_end_node(fdt_));
  }
  void bytes(const char* name, std::span<const uint8_t> value) {
    // libfdt memcpy()s from the value even when it is empty: never pass null.
    static constexpr uint8_t kNothing = 0;
    if (ok()) check(fdt_property(fdt_, name, value.empty() ? &kNothing : value.data(),
                                 static_cast<int>(value.size())));
  }
  void u32(const char* name, uint32_t value) {
    uint8_t cell[4];
    store_be(cell, value);
    bytes(name, cell);
  }
  void u64(const char* name, uint64_t value) {
    uint8_t cells[8];
    store_be(cells, value);
    bytes(name, cells);
  }
  void string(const char* name, const std::string& value) {
    bytes(name, {reinterpret_cast<const uint8_t*>(value.c_str()), value.size() + 1});
  }
  template <class T>
  void raw(const char* name, const T& value) {
    static_assert(std::is_trivially_copyable_v<T>);
    bytes(name, {reinterpret_cast<const uint8_t*>(&value), sizeof(T)});
  }

  // The tree's total size, or the first libfdt error (FDT_ERR_NOSPACE: the
  // buffer was too small).
  [[nodiscard]] std::expected<size_t, int> finish() {
    if (ok()) check(fdt_finish(fdt_));
    if (!ok()) return std::unexpected(error_);
    return fdt_totalsize(fdt_);
  }

 private:
  [[nodiscard]] bool ok() const { return error_ == 0; }
  void check(int rc) {
    if (rc < 0) error_ = rc;
  }

  void* fdt_;
  int error_ = 0;
};

std::vector<uint8_t> encode_msrs(const std::vector<kvm::MsrEntry>& msrs) {
  std::vector<uint8_t> out(msrs.size() * kMsrRecordSize);
  for (size_t i = 0; i < msrs.size(); ++i) {
    uint8_t* record = out.data() + i * kMsrRecordSize;
    store_be<uint32_t>(record, msrs[i].index);
    store_be<uint32_t>(record + 4, 0);
    store_be<uint64_t>(record + 8, msrs[i].data);
  }
  return out;
}

std::expected<size_t, int> build_payload(const SavedState& state, std::span<uint8_t> buffer) {
  FdtWriter w(buffer);
  w.begin_node("");
  w.string("compatible", "vmm,saved-state");
  {
    uint8_t version[8];
    store_be<uint32_t>(version, kFormatMajor);
    store_be<uint32_t>(version + 4, kFormatMinor);
    w.bytes("format-version", version);
  }

  const SavedMetadata& meta = state.metadata;
  w.begin_node("metadata");
  w.string("vm-name", meta.vm_name);
  w.u64("generation", meta.generation);
  w.string("program-version", meta.program_version);
  w.u64("saved-at-realtime-ns", meta.saved_at_realtime_ns);
  w.u32("was-running", meta.was_running ? 1 : 0);
  w.u64("guest-tsc-at-save", meta.guest_tsc_at_save);
  w.u64("host-monotonic-ns-at-save", meta.host_monotonic_ns_at_save);
  w.u64("vm-luo-token", meta.vm_luo_token);
  w.end_node();

  w.begin_node("vm");
  w.raw("pic-master", state.vm.pic_master);
  w.raw("pic-slave", state.vm.pic_slave);
  w.raw("ioapic", state.vm.ioapic);
  w.raw("pit", state.vm.pit);
  w.raw("clock", state.vm.clock);
  w.end_node();

  w.begin_node("vcpus");
  for (const kvm::VcpuState& vcpu : state.vcpus) {
    w.begin_node(std::string(kVcpuPrefix) + hex(vcpu.id));
    w.u32("id", vcpu.id);
    w.raw("regs", vcpu.regs);
    w.raw("sregs", vcpu.sregs);
    w.raw("fpu", vcpu.fpu);
    w.raw("xsave", vcpu.xsave);
    w.raw("xcrs", vcpu.xcrs);
    w.bytes("msrs", encode_msrs(vcpu.msrs));
    w.raw("lapic", vcpu.lapic);
    w.raw("mp-state", vcpu.mp_state);
    w.raw("events", vcpu.events);
    w.raw("debugregs", vcpu.debugregs);
    w.bytes("cpuid", {reinterpret_cast<const uint8_t*>(vcpu.cpuid.data()),
                      vcpu.cpuid.size() * sizeof(kvm_cpuid_entry2)});
    w.u64("tsc-khz", vcpu.tsc_khz);
    w.end_node();
  }
  w.end_node();

  w.begin_node("devices");
  const UartState& uart = state.uart;
  w.begin_node(kUartNode);
  w.u32("ier", uart.ier);
  w.u32("iir", uart.iir);
  w.u32("lcr", uart.lcr);
  w.u32("mcr", uart.mcr);
  w.u32("lsr", uart.lsr);
  w.u32("msr", uart.msr);
  w.u32("scr", uart.scr);
  w.u32("dll", uart.dll);
  w.u32("dlm", uart.dlm);
  w.u32("fcr", uart.fcr);
  w.bytes("pending-input", uart.pending_input);
  w.u32("irq-level", uart.irq_level ? 1 : 0);
  w.end_node();
  const TestDeviceState& test = state.test_device;
  w.begin_node("test-guest");
  w.u64("last-verify-request", test.last_verify_request);
  w.u64("last-pages-checked", test.last_result.pages_checked);
  w.u64("last-mismatches", test.last_result.mismatches);
  w.u64("heartbeat-at-save", test.heartbeat_at_save);
  w.end_node();
  w.end_node();

  w.begin_node("memory");
  for (size_t i = 0; i < state.memory.size(); ++i) {
    const RegionRef& region = state.memory[i];
    w.begin_node(std::string(kRegionPrefix) + hex(i));
    w.string("name", region.spec.name);
    w.string("role", std::string(role_name(region.spec.role)));
    w.string("backing", std::string(backing_name(region.spec.backing)));
    w.u64("gpa", region.spec.gpa);
    w.u64("size", region.spec.size);
    w.u32("slot", region.spec.slot);
    w.u64("luo-token", region.luo_token);
    w.u64("vm-token", region.vm_token);
    w.string("slot-kind", std::string(slot_kind_name(region.slot_kind)));
    w.end_node();
  }
  w.end_node();

  w.end_node();
  return w.finish();
}

// A first guess at the payload size: the kernel structs dominate; names,
// strings and FDT tags get a generous allowance. build_payload tells us if
// it was too small and encode() grows the buffer.
size_t estimate_payload_size(const SavedState& state) {
  size_t size = 4096 + sizeof(kvm::VmState) + state.uart.pending_input.size() +
                state.metadata.vm_name.size() + state.metadata.program_version.size();
  for (const kvm::VcpuState& vcpu : state.vcpus) {
    size += 1024 + sizeof(vcpu.regs) + sizeof(vcpu.sregs) + sizeof(vcpu.fpu) +
            sizeof(vcpu.xsave) + sizeof(vcpu.xcrs) + sizeof(vcpu.lapic) + sizeof(vcpu.mp_state) +
            sizeof(vcpu.events) + sizeof(vcpu.debugregs) + vcpu.msrs.size() * kMsrRecordSize +
            vcpu.cpuid.size() * sizeof(kvm_cpuid_entry2);
  }
  for (const RegionRef& region : state.memory) size += 512 + region.spec.name.size();
  return size;
}

// Writes the header in front of a payload already built at blob[kHeaderSize..].
void seal(std::span<uint8_t> blob, size_t payload_size) {
  BlobHeader header;
  header.payload_size = payload_size;
  header.payload_crc32c = crc32c(blob.subspan(kHeaderSize, payload_size));
  write_header(header, blob.first<kHeaderSize>());
}

Error fdt_write_error(int fdt_error) {
  return Error{0, std::string("cannot build the state FDT: ") + fdt_strerror(fdt_error)};
}

// ---- reading ----------------------------------------------------------------

std::string fdt_error(int fdt_error) { return fdt_strerror(fdt_error); }

// A node of the (already fdt_check_full-ed) tree, with lookups that fail with
// the full path of what is missing or malformed.
class Node {
 public:
  Node(const void* fdt, int offset, std::string path)
      : fdt_(fdt), offset_(offset), path_(std::move(path)) {}

  [[nodiscard]] const std::string& path() const { return path_; }

  [[nodiscard]] Result<std::optional<Node>> optional_child(std::string_view name) const {
    const int offset =
        fdt_subnode_offset_namelen(fdt_, offset_, name.data(), static_cast<int>(name.size()));
    if (offset == -FDT_ERR_NOTFOUND) return std::nullopt;
    if (offset < 0) return fail("state blob: cannot look up " + below(name) + ": " + fdt_error(offset));
    return Node(fdt_, offset, below(name));
  }
  [[nodiscard]] Result<Node> child(std::string_view name) const {
    VMM_TRY_ASSIGN(found, optional_child(name));
    if (!found) return fail("state blob: node " + below(name) + " is missing");
    return std::move(*found);
  }
  // Children whose name starts with `prefix`, in tree order; others are
  // ignored (a newer writer may add them).
  [[nodiscard]] Result<std::vector<Node>> children_named(std::string_view prefix) const {
    std::vector<Node> found;
    int offset = 0;
    fdt_for_each_subnode(offset, fdt_, offset_) {
      int length = 0;
      const char* name = fdt_get_name(fdt_, offset, &length);
      if (name == nullptr) return fail("state blob: unreadable node under " + path_ + ": " + fdt_error(length));
      const std::string_view node_name(name, static_cast<size_t>(length));
      if (node_name.starts_with(prefix)) found.emplace_back(fdt_, offset, below(node_name));
    }
    if (offset != -FDT_ERR_NOTFOUND)
      return fail("state blob: cannot list the nodes under " + path_ + ": " + fdt_error(offset));
    return found;
  }

  [[nodiscard]] Result<std::optional<std::span<const uint8_t>>> optional_bytes(const char* name) const {
    int length = 0;
    const void* data = fdt_getprop(fdt_, offset_, name, &length);
    if (data == nullptr) {
      if (length == -FDT_ERR_NOTFOUND) return std::nullopt;
      return fail("state blob: cannot read property " + below(name) + ": " + fdt_error(length));
    }
    return std::span(static_cast<const uint8_t*>(data), static_cast<size_t>(length));
  }
  [[nodiscard]] Result<std::span<const uint8_t>> bytes(const char* name) const {
    VMM_TRY_ASSIGN(found, optional_bytes(name));
    if (!found) return fail("state blob: required property " + below(name) + " is missing");
    return *found;
  }
  [[nodiscard]] Result<std::span<const uint8_t>> sized(const char* name, size_t size) const {
    VMM_TRY_ASSIGN(value, bytes(name));
    if (value.size() != size)
      return fail("state blob: property " + below(name) + " is " + std::to_string(value.size()) +
                  " bytes, expected " + std::to_string(size));
    return value;
  }
  // A property that is an array of `record_size`-byte records.
  [[nodiscard]] Result<std::span<const uint8_t>> records(const char* name, size_t record_size) const {
    VMM_TRY_ASSIGN(value, bytes(name));
    if (value.size() % record_size != 0)
      return fail("state blob: property " + below(name) + " is " + std::to_string(value.size()) +
                  " bytes, not a multiple of its " + std::to_string(record_size) + "-byte records");
    return value;
  }
  template <class T>
  [[nodiscard]] Result<void> read_struct(const char* name, T& out) const {
    static_assert(std::is_trivially_copyable_v<T>);
    VMM_TRY_ASSIGN(value, sized(name, sizeof(T)));
    std::memcpy(&out, value.data(), sizeof(T));
    return {};
  }
  [[nodiscard]] Result<uint32_t> u32(const char* name) const {
    VMM_TRY_ASSIGN(value, sized(name, 4));
    return load_be<uint32_t>(value.data());
  }
  [[nodiscard]] Result<uint64_t> u64(const char* name) const {
    VMM_TRY_ASSIGN(value, sized(name, 8));
    return load_be<uint64_t>(value.data());
  }
  [[nodiscard]] Result<bool> flag(const char* name) const {
    VMM_TRY_ASSIGN(value, u32(name));
    if (value > 1)
      return fail("state blob: property " + below(name) + " is " + std::to_string(value) +
                  ", expected 0 or 1");
    return value == 1;
  }
  [[nodiscard]] Result<uint8_t> byte_register(const char* name) const {
    VMM_TRY_ASSIGN(value, u32(name));
    if (value > 0xff)
      return fail("state blob: property " + below(name) + " is " + std::to_string(value) +
                  ", more than an 8-bit register holds");
    return static_cast<uint8_t>(value);
  }
  [[nodiscard]] Result<std::string> string(const char* name) const {
    VMM_TRY_ASSIGN(value, bytes(name));
    return as_string(name, value);
  }
  [[nodiscard]] Result<std::string> optional_string(const char* name, std::string fallback) const {
    VMM_TRY_ASSIGN(value, optional_bytes(name));
    if (!value) return fallback;
    return as_string(name, *value);
  }

 private:
  [[nodiscard]] std::string below(std::string_view name) const {
    return path_ + (path_ == "/" ? "" : "/") + std::string(name);
  }
  [[nodiscard]] Result<std::string> as_string(const char* name, std::span<const uint8_t> value) const {
    // Exactly one NUL, at the end: an embedded one would silently cut the string.
    const auto nul = std::ranges::find(value, uint8_t{0});
    if (value.empty() || nul != value.end() - 1)
      return fail("state blob: property " + below(name) + " is not a single NUL-terminated string");
    return std::string(reinterpret_cast<const char*>(value.data()), value.size() - 1);
  }

  const void* fdt_;
  int offset_;
  std::string path_;
};

template <class Enum>
Result<Enum> named_enum(const Node& node, const char* property,
                        std::optional<Enum> (*from_name)(std::string_view)) {
  VMM_TRY_ASSIGN(name, node.string(property));
  const std::optional<Enum> value = from_name(name);
  if (!value)
    return fail("state blob: property " + node.path() + "/" + property + " has unknown value \"" +
                name + "\"");
  return *value;
}

Result<SavedMetadata> parse_metadata(const Node& root) {
  VMM_TRY_ASSIGN(node, root.child("metadata"));
  SavedMetadata meta;
  VMM_TRY_ASSIGN(vm_name, node.string("vm-name"));
  VMM_TRY_ASSIGN(generation, node.u64("generation"));
  VMM_TRY_ASSIGN(program_version, node.optional_string("program-version", ""));
  VMM_TRY_ASSIGN(saved_at, node.u64("saved-at-realtime-ns"));
  VMM_TRY_ASSIGN(was_running, node.flag("was-running"));
  VMM_TRY_ASSIGN(guest_tsc, node.u64("guest-tsc-at-save"));
  VMM_TRY_ASSIGN(monotonic, node.u64("host-monotonic-ns-at-save"));
  VMM_TRY_ASSIGN(vm_luo_token, node.u64("vm-luo-token"));
  meta.vm_name = std::move(vm_name);
  meta.generation = generation;
  meta.program_version = std::move(program_version);
  meta.saved_at_realtime_ns = saved_at;
  meta.was_running = was_running;
  meta.guest_tsc_at_save = guest_tsc;
  meta.host_monotonic_ns_at_save = monotonic;
  meta.vm_luo_token = vm_luo_token;
  return meta;
}

Result<kvm::VmState> parse_vm(const Node& root) {
  VMM_TRY_ASSIGN(node, root.child("vm"));
  kvm::VmState vm;
  VMM_TRY(node.read_struct("pic-master", vm.pic_master));
  VMM_TRY(node.read_struct("pic-slave", vm.pic_slave));
  VMM_TRY(node.read_struct("ioapic", vm.ioapic));
  VMM_TRY(node.read_struct("pit", vm.pit));
  VMM_TRY(node.read_struct("clock", vm.clock));
  return vm;
}

Result<kvm::VcpuState> parse_vcpu(const Node& node) {
  kvm::VcpuState vcpu;
  VMM_TRY_ASSIGN(id, node.u32("id"));
  vcpu.id = id;
  VMM_TRY(node.read_struct("regs", vcpu.regs));
  VMM_TRY(node.read_struct("sregs", vcpu.sregs));
  VMM_TRY(node.read_struct("fpu", vcpu.fpu));
  VMM_TRY(node.read_struct("xsave", vcpu.xsave));
  VMM_TRY(node.read_struct("xcrs", vcpu.xcrs));
  VMM_TRY_ASSIGN(msrs, node.records("msrs", kMsrRecordSize));
  for (size_t offset = 0; offset < msrs.size(); offset += kMsrRecordSize) {
    const uint8_t* record = msrs.data() + offset;
    vcpu.msrs.push_back({load_be<uint32_t>(record), load_be<uint64_t>(record + 8)});
  }
  VMM_TRY(node.read_struct("lapic", vcpu.lapic));
  VMM_TRY(node.read_struct("mp-state", vcpu.mp_state));
  VMM_TRY(node.read_struct("events", vcpu.events));
  VMM_TRY(node.read_struct("debugregs", vcpu.debugregs));
  VMM_TRY_ASSIGN(cpuid, node.records("cpuid", sizeof(kvm_cpuid_entry2)));
  vcpu.cpuid.resize(cpuid.size() / sizeof(kvm_cpuid_entry2));
  if (!cpuid.empty()) std::memcpy(vcpu.cpuid.data(), cpuid.data(), cpuid.size());
  VMM_TRY_ASSIGN(tsc_khz, node.u64("tsc-khz"));
  vcpu.tsc_khz = tsc_khz;
  return vcpu;
}

Result<UartState> parse_uart(const Node& devices) {
  VMM_TRY_ASSIGN(node, devices.child(kUartNode));
  UartState uart;
  const std::pair<const char*, uint8_t*> registers[] = {
      {"ier", &uart.ier}, {"iir", &uart.iir}, {"lcr", &uart.lcr}, {"mcr", &uart.mcr},
      {"lsr", &uart.lsr}, {"msr", &uart.msr}, {"scr", &uart.scr}, {"dll", &uart.dll},
      {"dlm", &uart.dlm}, {"fcr", &uart.fcr},
  };
  for (const auto& [name, field] : registers) {
    VMM_TRY_ASSIGN(value, node.byte_register(name));
    *field = value;
  }
  VMM_TRY_ASSIGN(pending, node.optional_bytes("pending-input"));
  if (pending) uart.pending_input.assign(pending->begin(), pending->end());
  VMM_TRY_ASSIGN(irq_level, node.flag("irq-level"));
  uart.irq_level = irq_level;
  return uart;
}

Result<TestDeviceState> parse_test_device(const Node& devices) {
  VMM_TRY_ASSIGN(node, devices.child("test-guest"));
  TestDeviceState test;
  VMM_TRY_ASSIGN(request, node.u64("last-verify-request"));
  VMM_TRY_ASSIGN(pages_checked, node.u64("last-pages-checked"));
  VMM_TRY_ASSIGN(mismatches, node.u64("last-mismatches"));
  VMM_TRY_ASSIGN(heartbeat, node.u64("heartbeat-at-save"));
  test.last_verify_request = request;
  test.last_result = {pages_checked, mismatches};
  test.heartbeat_at_save = heartbeat;
  return test;
}

Result<RegionRef> parse_region(const Node& node) {
  RegionRef region;
  VMM_TRY_ASSIGN(name, node.string("name"));
  VMM_TRY_ASSIGN(role, named_enum(node, "role", role_from_name));
  VMM_TRY_ASSIGN(backing, named_enum(node, "backing", backing_from_name));
  VMM_TRY_ASSIGN(gpa, node.u64("gpa"));
  VMM_TRY_ASSIGN(size, node.u64("size"));
  VMM_TRY_ASSIGN(slot, node.u32("slot"));
  VMM_TRY_ASSIGN(luo_token, node.u64("luo-token"));
  VMM_TRY_ASSIGN(vm_token, node.u64("vm-token"));
  VMM_TRY_ASSIGN(slot_kind, named_enum(node, "slot-kind", slot_kind_from_name));
  region.spec = {std::move(name), role, backing, gpa, size, slot};
  region.luo_token = luo_token;
  region.vm_token = vm_token;
  region.slot_kind = slot_kind;
  return region;
}

Result<SavedState> parse_tree(const void* fdt, const BlobHeader& header) {
  const Node root(fdt, 0, "/");
  VMM_TRY_ASSIGN(version, root.sized("format-version", 8));
  const uint32_t tree_major = load_be<uint32_t>(version.data());
  const uint32_t tree_minor = load_be<uint32_t>(version.data() + 4);
  if (tree_major != header.format_major || tree_minor != header.format_minor)
    return fail("state blob: FDT says format " + std::to_string(tree_major) + "." +
                std::to_string(tree_minor) + " but its header says " +
                std::to_string(header.format_major) + "." + std::to_string(header.format_minor));

  SavedState state;
  VMM_TRY_ASSIGN(metadata, parse_metadata(root));
  state.metadata = std::move(metadata);
  VMM_TRY_ASSIGN(vm, parse_vm(root));
  state.vm = vm;

  VMM_TRY_ASSIGN(vcpus, root.child("vcpus"));
  VMM_TRY_ASSIGN(vcpu_nodes, vcpus.children_named(kVcpuPrefix));
  for (const Node& node : vcpu_nodes) {
    VMM_TRY_ASSIGN(vcpu, parse_vcpu(node));
    state.vcpus.push_back(std::move(vcpu));
  }

  VMM_TRY_ASSIGN(devices, root.child("devices"));
  VMM_TRY_ASSIGN(uart, parse_uart(devices));
  state.uart = std::move(uart);
  VMM_TRY_ASSIGN(test_device, parse_test_device(devices));
  state.test_device = test_device;

  VMM_TRY_ASSIGN(memory, root.child("memory"));
  VMM_TRY_ASSIGN(region_nodes, memory.children_named(kRegionPrefix));
  for (const Node& node : region_nodes) {
    VMM_TRY_ASSIGN(region, parse_region(node));
    state.memory.push_back(std::move(region));
  }

  if (auto valid = validate(state); !valid) return std::unexpected(valid.error().with_context("state blob"));
  return state;
}

}  // namespace

namespace {

uint32_t crc32c_table(uint32_t crc, std::span<const uint8_t> bytes) {
  for (uint8_t byte : bytes) crc = kCrc32cTable[(crc ^ byte) & 0xff] ^ (crc >> 8);
  return crc;
}

#if defined(__x86_64__)
// SSE4.2's crc32 instruction computes the same Castagnoli CRC 8 bytes at a
// time: the state is checksummed inside the blackout, twice.
__attribute__((target("sse4.2"))) uint32_t crc32c_sse42(uint32_t crc, std::span<const uint8_t> bytes) {
  size_t i = 0;
  uint64_t wide = crc;
  for (; i + 8 <= bytes.size(); i += 8) {
    uint64_t word;
    std::memcpy(&word, bytes.data() + i, sizeof word);
    wide = __builtin_ia32_crc32di(wide, word);
  }
  return crc32c_table(static_cast<uint32_t>(wide), bytes.subspan(i));
}
#endif

}  // namespace

uint32_t crc32c(std::span<const uint8_t> bytes) {
#if defined(__x86_64__)
  static const bool has_sse42 = __builtin_cpu_supports("sse4.2");
  if (has_sse42) return ~crc32c_sse42(~0u, bytes);
#endif
  return ~crc32c_table(~0u, bytes);
}

void write_header(const BlobHeader& header, std::span<uint8_t, kHeaderSize> dest) {
  std::ranges::copy(kStateMagic, dest.begin());
  store_le<uint16_t>(&dest[8], header.format_major);
  store_le<uint16_t>(&dest[10], header.format_minor);
  store_le<uint32_t>(&dest[12], header.header_size);
  store_le<uint64_t>(&dest[16], header.payload_size);
  store_le<uint32_t>(&dest[24], header.payload_crc32c);
  store_le<uint32_t>(&dest[28], header.flags);
}

Result<BlobHeader> read_header(std::span<const uint8_t> blob) {
  if (blob.size() < kHeaderSize)
    return fail("state blob is " + std::to_string(blob.size()) + " bytes, shorter than the " +
                std::to_string(kHeaderSize) + "-byte header");
  if (!std::ranges::equal(blob.first(kStateMagic.size()), kStateMagic))
    return fail("state blob has no \"VMMSTATE\" magic: it is not a saved vmm state, or the state "
                "was never completely written");

  BlobHeader header;
  header.format_major = load_le<uint16_t>(&blob[8]);
  header.format_minor = load_le<uint16_t>(&blob[10]);
  header.header_size = load_le<uint32_t>(&blob[12]);
  header.payload_size = load_le<uint64_t>(&blob[16]);
  header.payload_crc32c = load_le<uint32_t>(&blob[24]);
  header.flags = load_le<uint32_t>(&blob[28]);

  const std::string known = std::to_string(kFormatMajor) + ".x";
  if (header.format_major > kFormatMajor)
    return fail("state format " + std::to_string(header.format_major) +
                ".x is newer than this vmm understands (" + known +
                "); upgrade vmm or restore with the version that wrote it");
  if (header.format_major < kFormatMajor)
    return fail("state format " + std::to_string(header.format_major) +
                ".x is older than this vmm understands (" + known +
                "); restore with the version that wrote it");
  if (header.header_size < kHeaderSize)
    return fail("state blob header size " + std::to_string(header.header_size) +
                " is smaller than the " + std::to_string(kHeaderSize) + " bytes of a " + known +
                " header");
  const uint64_t available = blob.size();
  if (header.header_size > available || header.payload_size > available - header.header_size)
    return fail("state blob is truncated: its header announces " +
                std::to_string(header.header_size) + " + " + std::to_string(header.payload_size) +
                " bytes but only " + std::to_string(available) + " are available");
  if (header.payload_size > INT_MAX)
    return fail("state blob payload of " + std::to_string(header.payload_size) +
                " bytes is larger than an FDT can be");
  return header;
}

Result<std::vector<uint8_t>> encode(const SavedState& state) {
  if (auto valid = validate(state); !valid)
    return std::unexpected(valid.error().with_context("cannot encode state"));

  size_t capacity = estimate_payload_size(state);
  for (;;) {
    std::vector<uint8_t> blob(kHeaderSize + capacity);
    const std::expected<size_t, int> built = build_payload(state, std::span(blob).subspan(kHeaderSize));
    if (built) {
      blob.resize(kHeaderSize + *built);
      seal(blob, *built);
      return blob;
    }
    if (built.error() != -FDT_ERR_NOSPACE || capacity >= INT_MAX)
      return std::unexpected(fdt_write_error(built.error()));
    capacity = std::min<size_t>(capacity * 2, INT_MAX);
  }
}

Result<size_t> encode_into(const SavedState& state, std::span<uint8_t> dest) {
  if (auto valid = validate(state); !valid)
    return std::unexpected(valid.error().with_context("cannot encode state"));

  // Whatever happens next, what is in dest stops being a valid blob first.
  std::ranges::fill(dest.first(std::min(dest.size(), kStateMagic.size())), 0);

  if (dest.size() > kHeaderSize && is_fdt_aligned(dest.data() + kHeaderSize)) {
    // libfdt clears its whole buffer first: offer it a generous guess of the
    // size (a vCPU is ~10 KiB) before the rest of a large destination.
    const std::span<uint8_t> area = dest.subspan(kHeaderSize);
    const size_t guess = 16 * 1024 + 24 * 1024 * state.vcpus.size();
    for (std::span<uint8_t> buffer : {area.first(std::min(area.size(), guess)), area}) {
      const std::expected<size_t, int> built = build_payload(state, buffer);
      if (built) {
        seal(dest, *built);
        return kHeaderSize + *built;
      }
      if (built.error() != -FDT_ERR_NOSPACE) return std::unexpected(fdt_write_error(built.error()));
      if (buffer.size() == area.size()) break;
    }
  }

  // Too small (encode to learn by how much), or misaligned for libfdt
  // (encode aside and copy, payload before header).
  VMM_TRY_ASSIGN(blob, encode(state));
  if (blob.size() > dest.size())
    return fail("state (" + std::to_string(blob.size()) + " bytes) does not fit the state memfd (" +
                std::to_string(dest.size()) + " bytes)");
  std::ranges::copy(std::span(blob).subspan(kHeaderSize), dest.begin() + kHeaderSize);
  std::ranges::copy(std::span(blob).first(kHeaderSize), dest.begin());
  return blob.size();
}

Result<SavedState> decode(std::span<const uint8_t> blob) {
  VMM_TRY_ASSIGN(header, read_header(blob));
  const std::span<const uint8_t> payload = blob.subspan(header.header_size, header.payload_size);

  const uint32_t actual_crc = crc32c(payload);
  if (actual_crc != header.payload_crc32c)
    return fail("state blob checksum mismatch (payload CRC32C 0x" + hex(actual_crc) +
                ", header says 0x" + hex(header.payload_crc32c) +
                "): the state was corrupted or only partly written");

  if (payload.size() < sizeof(fdt_header))
    return fail("state blob payload (" + std::to_string(payload.size()) +
                " bytes) is too small to be an FDT");
  // libfdt needs the tree 8-byte aligned; a blob from a page-aligned memfd
  // already is, anything else is copied.
  std::vector<uint64_t> aligned_copy;
  const void* fdt = payload.data();
  if (!is_fdt_aligned(fdt)) {
    aligned_copy.resize((payload.size() + 7) / 8);
    std::memcpy(aligned_copy.data(), payload.data(), payload.size());
    fdt = aligned_copy.data();
  }
  if (const int rc = fdt_check_header(fdt); rc != 0)
    return fail("state blob payload is not a valid FDT: " + fdt_error(rc));
  if (fdt_totalsize(fdt) != payload.size())
    return fail("state blob payload is " + std::to_string(payload.size()) +
                " bytes but its FDT says " + std::to_string(fdt_totalsize(fdt)));
  if (const int rc = fdt_check_full(fdt, payload.size()); rc != 0)
    return fail("state blob FDT is malformed: " + fdt_error(rc));

  return parse_tree(fdt, header);
}

}  // namespace vmm::migration
