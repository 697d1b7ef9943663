// The reader of format 1.0 exactly as vmm shipped it before the schema
// tables (migration/state_blob.cc at commit c41e378), kept frozen so tests
// can check what an older vmm does with a newer minor version's blob: it
// must decode it, ignoring the properties it does not know. Only the names
// moved (namespace legacy_1_0, the version constant). Do not edit: it stands
// for a binary that is already deployed.
#include "tests/migration/legacy/state_blob_1_0.h"

#include <libfdt.h>

#include <algorithm>
#include <charconv>
#include <climits>
#include <cstring>
#include <expected>
#include <optional>
#include <string>
#include <string_view>

namespace vmm::migration::legacy_1_0 {
namespace {

constexpr uint16_t kFormatMajor = 1;
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


Result<BlobHeader> read_header_1_0(std::span<const uint8_t> blob) {
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

}  // namespace

Result<SavedState> decode(std::span<const uint8_t> blob) {
  VMM_TRY_ASSIGN(header, read_header_1_0(blob));
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

}  // namespace vmm::migration::legacy_1_0
