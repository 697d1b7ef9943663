// Saved state blob, format 1.1: a fixed header followed by a flattened device
// tree (FDT, built with libfdt's sequential-write API, read with its
// read-only API after fdt_check_full). docs/state-format.md documents both.
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
// The tree is described once, below ("the schema"): each node is a traits
// struct naming its plain-data owner and a table of properties, and each
// property is a name, a codec (how a value becomes FDT bytes and back, its
// documented type and its largest size), required or optional, the minor
// version that added it, and the field of the owner it holds. The writer,
// the exact and the maximal size, the reader, the comparison and
// state_schema() all walk these tables; nothing else spells a property name.
//
// Readers look properties and nodes up by name and ignore what they do not
// know, so a newer minor version may add either. A required property must be
// present with a valid size; an optional one that is absent gets its default
// (the plain type's own, or one its table entry computes from the rest of the
// node). vcpu@/region@ nodes are recognized by their prefix; other children
// of /vcpus and /memory are ignored.
#include "migration/state_blob.h"

#include <libfdt.h>

#include <algorithm>
#include <charconv>
#include <climits>
#include <concepts>
#include <cstring>
#include <expected>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>

namespace vmm::migration {
namespace {

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

  void begin_node(const char* name) {
    if (ok()) check(fdt_begin_node(fdt_, name));
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
  // Reserves a property of `size` bytes and returns where its value goes
  // (nullptr after an error), so a value is written in place.
  uint8_t* reserve(const char* name, size_t size) {
    void* value = nullptr;
    if (ok()) check(fdt_property_placeholder(fdt_, name, static_cast<int>(size), &value));
    return ok() ? static_cast<uint8_t*>(value) : nullptr;
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

// What libfdt's sequential writer spends, so sizes are computed rather than
// guessed: a 40-byte header, the reserve map (aligned to its 16-byte entries,
// one terminating entry), then the structure block (4-byte tags; a node's
// name and a property's value padded to 4 bytes; a property has a 12-byte
// tag, length and name offset) and the strings block (every property name
// with its NUL, once per property: names are not deduplicated).
constexpr size_t kFdtPrologue = 64;
constexpr size_t kFdtTag = 4;
constexpr size_t kFdtPropertyHead = 12;
constexpr size_t fdt_padded(size_t bytes) { return (bytes + 3) & ~size_t{3}; }

struct FdtBytes {
  size_t structure = 0;
  size_t strings = 0;
  FdtBytes& operator+=(const FdtBytes& other) {
    structure += other.structure;
    strings += other.strings;
    return *this;
  }
};

constexpr FdtBytes property_bytes(std::string_view name, size_t value_size) {
  return {kFdtPropertyHead + fdt_padded(value_size), name.size() + 1};
}
constexpr size_t node_bytes(size_t name_length) { return 2 * kFdtTag + fdt_padded(name_length + 1); }

// ---- reading ----------------------------------------------------------------

std::string fdt_error(int fdt_error) { return fdt_strerror(fdt_error); }

// A node of the (already fdt_check_full-ed) tree, with lookups that fail with
// the full path of what is missing or malformed.
class Node {
 public:
  Node(const void* fdt, int offset, std::string path)
      : fdt_(fdt), offset_(offset), path_(std::move(path)) {}

  [[nodiscard]] const std::string& path() const { return path_; }
  [[nodiscard]] std::string below(std::string_view name) const {
    return path_ + (path_ == "/" ? "" : "/") + std::string(name);
  }

  [[nodiscard]] Result<Node> child(std::string_view name) const {
    const int offset =
        fdt_subnode_offset_namelen(fdt_, offset_, name.data(), static_cast<int>(name.size()));
    if (offset == -FDT_ERR_NOTFOUND) return fail("state blob: node " + below(name) + " is missing");
    if (offset < 0) return fail("state blob: cannot look up " + below(name) + ": " + fdt_error(offset));
    return Node(fdt_, offset, below(name));
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

  // "state blob: property /path/name <what>"
  [[nodiscard]] Error bad(const char* name, const std::string& what) const {
    return Error{0, "state blob: property " + below(name) + " " + what};
  }
  [[nodiscard]] Result<void> exact_size(const char* name, std::span<const uint8_t> value, size_t size) const {
    if (value.size() != size)
      return std::unexpected(bad(name, "is " + std::to_string(value.size()) + " bytes, expected " +
                                           std::to_string(size)));
    return {};
  }

 private:
  const void* fdt_;
  int offset_;
  std::string path_;
};

// ---- codecs: one C++ value <-> one property's bytes --------------------------
//
// A codec has: Value, type (as docs/state-format.md names it), max_size (the
// largest value the format allows, in bytes; `fixed` codecs always write
// exactly that much), size(v), write(w, name, v),
// read(node, name, bytes) -> Result<Value> (bytes already known to be at most
// max_size), and equal(a, b).

template <size_t N>
struct Literal {
  char text[N];
  // Implicit, so a string literal can be a template argument.
  constexpr Literal(const char (&literal)[N]) { std::copy_n(literal, N, text); }
  [[nodiscard]] constexpr std::string_view view() const { return {text, N - 1}; }
};

template <class T>
struct TrivialEqual {
  static bool equal(const T& a, const T& b) { return a == b; }
};

struct U32 : TrivialEqual<uint32_t> {
  static constexpr bool fixed = true;
  using Value = uint32_t;
  static constexpr std::string_view type = "u32";
  static constexpr size_t max_size = 4;
  static size_t size(const Value&) { return 4; }
  static void write(FdtWriter& w, const char* name, const Value& value) {
    if (uint8_t* out = w.reserve(name, 4)) store_be(out, value);
  }
  static Result<Value> read(const Node& node, const char* name, std::span<const uint8_t> bytes) {
    VMM_TRY(node.exact_size(name, bytes, 4));
    return load_be<uint32_t>(bytes.data());
  }
};

struct U64 : TrivialEqual<uint64_t> {
  static constexpr bool fixed = true;
  using Value = uint64_t;
  static constexpr std::string_view type = "u64";
  static constexpr size_t max_size = 8;
  static size_t size(const Value&) { return 8; }
  static void write(FdtWriter& w, const char* name, const Value& value) {
    if (uint8_t* out = w.reserve(name, 8)) store_be(out, value);
  }
  static Result<Value> read(const Node& node, const char* name, std::span<const uint8_t> bytes) {
    VMM_TRY(node.exact_size(name, bytes, 8));
    return load_be<uint64_t>(bytes.data());
  }
};

// A boolean as one cell, 0 or 1.
struct Flag : TrivialEqual<bool> {
  static constexpr bool fixed = true;
  using Value = bool;
  static constexpr std::string_view type = "flag";
  static constexpr size_t max_size = 4;
  static size_t size(const Value&) { return 4; }
  static void write(FdtWriter& w, const char* name, const Value& value) { U32::write(w, name, value ? 1 : 0); }
  static Result<Value> read(const Node& node, const char* name, std::span<const uint8_t> bytes) {
    VMM_TRY_ASSIGN(value, U32::read(node, name, bytes));
    if (value > 1) return std::unexpected(node.bad(name, "is " + std::to_string(value) + ", expected 0 or 1"));
    return value == 1;
  }
};

// An 8-bit device register as one cell, 0..255.
struct Register8 : TrivialEqual<uint8_t> {
  static constexpr bool fixed = true;
  using Value = uint8_t;
  static constexpr std::string_view type = "u8";
  static constexpr size_t max_size = 4;
  static size_t size(const Value&) { return 4; }
  static void write(FdtWriter& w, const char* name, const Value& value) { U32::write(w, name, value); }
  static Result<Value> read(const Node& node, const char* name, std::span<const uint8_t> bytes) {
    VMM_TRY_ASSIGN(value, U32::read(node, name, bytes));
    if (value > 0xff)
      return std::unexpected(node.bad(name, "is " + std::to_string(value) + ", more than an 8-bit register holds"));
    return static_cast<uint8_t>(value);
  }
};

// Exactly one NUL, at the end: an embedded one would silently cut the string.
Result<std::string_view> nul_terminated(const Node& node, const char* name, std::span<const uint8_t> bytes) {
  const auto nul = std::ranges::find(bytes, uint8_t{0});
  if (bytes.empty() || nul != bytes.end() - 1)
    return std::unexpected(node.bad(name, "is not a single NUL-terminated string"));
  return std::string_view(reinterpret_cast<const char*>(bytes.data()), bytes.size() - 1);
}

void write_string(FdtWriter& w, const char* name, std::string_view value) {
  if (uint8_t* out = w.reserve(name, value.size() + 1)) {
    std::memcpy(out, value.data(), value.size());
    out[value.size()] = 0;
  }
}

template <size_t MaxLength>
struct String : TrivialEqual<std::string> {
  using Value = std::string;
  static constexpr std::string_view type = "string";
  static constexpr size_t max_size = MaxLength + 1;
  static size_t size(const Value& value) { return value.size() + 1; }
  static void write(FdtWriter& w, const char* name, const Value& value) { write_string(w, name, value); }
  static Result<Value> read(const Node& node, const char* name, std::span<const uint8_t> bytes) {
    VMM_TRY_ASSIGN(text, nul_terminated(node, name, bytes));
    return std::string(text);
  }
};

// An enum as its name (saved_state.h spells the names).
template <class E, std::string_view (*Name)(E), std::optional<E> (*FromName)(std::string_view)>
struct Enum : TrivialEqual<E> {
  using Value = E;
  static constexpr std::string_view type = "enum";
  static constexpr size_t max_size = 32;
  static size_t size(const Value& value) { return Name(value).size() + 1; }
  static void write(FdtWriter& w, const char* name, const Value& value) { write_string(w, name, Name(value)); }
  static Result<Value> read(const Node& node, const char* name, std::span<const uint8_t> bytes) {
    VMM_TRY_ASSIGN(text, nul_terminated(node, name, bytes));
    const std::optional<E> value = FromName(text);
    if (!value) return std::unexpected(node.bad(name, "has unknown value \"" + std::string(text) + "\""));
    return *value;
  }
};

template <size_t MaxSize>
struct Bytes : TrivialEqual<std::vector<uint8_t>> {
  using Value = std::vector<uint8_t>;
  static constexpr std::string_view type = "bytes";
  static constexpr size_t max_size = MaxSize;
  static size_t size(const Value& value) { return value.size(); }
  static void write(FdtWriter& w, const char* name, const Value& value) { w.bytes(name, value); }
  static Result<Value> read(const Node&, const char*, std::span<const uint8_t> bytes) {
    return Value(bytes.begin(), bytes.end());
  }
};

// A kernel struct as its raw bytes: the blob is read by the same host (the
// same KVM ABI) that wrote it.
template <class T, Literal Type>
struct KernelStruct {
  static_assert(std::is_trivially_copyable_v<T>);
  static constexpr bool fixed = true;
  using Value = T;
  static constexpr std::string_view type = Type.view();
  static constexpr size_t max_size = sizeof(T);
  static size_t size(const Value&) { return sizeof(T); }
  static void write(FdtWriter& w, const char* name, const Value& value) {
    w.bytes(name, {reinterpret_cast<const uint8_t*>(&value), sizeof(T)});
  }
  static Result<Value> read(const Node& node, const char* name, std::span<const uint8_t> bytes) {
    VMM_TRY(node.exact_size(name, bytes, sizeof(T)));
    T value;
    std::memcpy(&value, bytes.data(), sizeof(T));
    return value;
  }
  static bool equal(const Value& a, const Value& b) { return same_bytes(a, b); }
};

Result<void> whole_records(const Node& node, const char* name, std::span<const uint8_t> bytes, size_t record) {
  if (bytes.size() % record != 0)
    return std::unexpected(node.bad(name, "is " + std::to_string(bytes.size()) + " bytes, not a multiple of its " +
                                              std::to_string(record) + "-byte records"));
  return {};
}

// An array of kernel structs, back to back.
template <class T, Literal Type, size_t MaxCount>
struct KernelArray {
  static_assert(std::is_trivially_copyable_v<T>);
  using Value = std::vector<T>;
  static constexpr std::string_view type = Type.view();
  static constexpr size_t max_size = MaxCount * sizeof(T);
  static size_t size(const Value& value) { return value.size() * sizeof(T); }
  static void write(FdtWriter& w, const char* name, const Value& value) {
    w.bytes(name, {reinterpret_cast<const uint8_t*>(value.data()), value.size() * sizeof(T)});
  }
  static Result<Value> read(const Node& node, const char* name, std::span<const uint8_t> bytes) {
    VMM_TRY(whole_records(node, name, bytes, sizeof(T)));
    Value value(bytes.size() / sizeof(T));
    if (!bytes.empty()) std::memcpy(value.data(), bytes.data(), bytes.size());
    return value;
  }
  static bool equal(const Value& a, const Value& b) {
    return std::ranges::equal(a, b, [](const T& x, const T& y) { return same_bytes(x, y); });
  }
};

// MSRs as 16-byte records: be32 index, be32 0 (ignored), be64 data.
struct Msrs : TrivialEqual<std::vector<kvm::MsrEntry>> {
  static constexpr size_t kRecord = 16;
  using Value = std::vector<kvm::MsrEntry>;
  static constexpr std::string_view type = "msr[]";
  static constexpr size_t max_size = kMaxMsrsPerVcpu * kRecord;
  static size_t size(const Value& value) { return value.size() * kRecord; }
  static void write(FdtWriter& w, const char* name, const Value& msrs) {
    uint8_t* out = w.reserve(name, msrs.size() * kRecord);
    if (out == nullptr) return;
    for (const kvm::MsrEntry& msr : msrs) {
      store_be<uint32_t>(out, msr.index);
      store_be<uint32_t>(out + 4, 0);
      store_be<uint64_t>(out + 8, msr.data);
      out += kRecord;
    }
  }
  static Result<Value> read(const Node& node, const char* name, std::span<const uint8_t> bytes) {
    VMM_TRY(whole_records(node, name, bytes, kRecord));
    Value msrs;
    msrs.reserve(bytes.size() / kRecord);
    for (size_t offset = 0; offset < bytes.size(); offset += kRecord)
      msrs.push_back({load_be<uint32_t>(bytes.data() + offset), load_be<uint64_t>(bytes.data() + offset + 8)});
    return msrs;
  }
};

// format-version: <major minor>.
struct Version : TrivialEqual<std::array<uint32_t, 2>> {
  static constexpr bool fixed = true;
  using Value = std::array<uint32_t, 2>;
  static constexpr std::string_view type = "u32[2]";
  static constexpr size_t max_size = 8;
  static size_t size(const Value&) { return 8; }
  static void write(FdtWriter& w, const char* name, const Value& value) {
    if (uint8_t* out = w.reserve(name, 8)) {
      store_be(out, value[0]);
      store_be(out + 4, value[1]);
    }
  }
  static Result<Value> read(const Node& node, const char* name, std::span<const uint8_t> bytes) {
    VMM_TRY(node.exact_size(name, bytes, 8));
    return Value{load_be<uint32_t>(bytes.data()), load_be<uint32_t>(bytes.data() + 4)};
  }
};

// ---- properties: a codec bound to a field of the node's plain type ----------

template <class Owner>
struct Property {
  std::string_view name;  // a literal: NUL-terminated
  std::string_view type;
  Presence presence;
  uint16_t since_minor;
  size_t max_size;
  size_t (*size)(const Owner&);  // nullptr: always max_size
  void (*write)(FdtWriter&, const char* name, const Owner&);
  Result<void> (*read)(const Node&, const char* name, std::span<const uint8_t>, Owner&);
  bool (*equal)(const Owner&, const Owner&);
  // An optional property that is absent: fills its default from what the
  // node did carry (nullptr: the plain type's own default stays).
  void (*absent)(Owner&);
};

template <class T>
struct MemberOf;
template <class C, class T>
struct MemberOf<T C::*> {
  using Owner = C;
};

// owner.*First.*Rest...: a field, or a field of a field.
template <auto First, auto... Rest>
struct FieldPath {
  template <class Owner>
  static constexpr auto& get(Owner& owner) {
    return ((owner.*First) .* ... .* Rest);
  }
};

// `field<Codec, &Owner::member, &Member::submember...>(name, ...)`.
template <class Codec, auto First, auto... Rest>
constexpr auto field(const char* name, Presence presence = Presence::required, uint16_t since_minor = 0,
                     void (*absent)(typename MemberOf<decltype(First)>::Owner&) = nullptr) {
  using Owner = typename MemberOf<decltype(First)>::Owner;
  using Path = FieldPath<First, Rest...>;
  return Property<Owner>{
      .name = name,
      .type = Codec::type,
      .presence = presence,
      .since_minor = since_minor,
      .max_size = Codec::max_size,
      .size = requires { Codec::fixed; } ? nullptr
                                         : +[](const Owner& owner) { return Codec::size(Path::get(owner)); },
      .write = [](FdtWriter& w, const char* property, const Owner& owner) { Codec::write(w, property, Path::get(owner)); },
      .read = [](const Node& node, const char* property, std::span<const uint8_t> bytes, Owner& owner) -> Result<void> {
        VMM_TRY_ASSIGN(value, Codec::read(node, property, bytes));
        Path::get(owner) = std::move(value);
        return {};
      },
      .equal = [](const Owner& a, const Owner& b) { return Codec::equal(Path::get(a), Path::get(b)); },
      .absent = absent,
  };
}

// ---- the schema -------------------------------------------------------------

constexpr Presence kOptional = Presence::optional;

// The root's own properties: constants when written, checked when read.
struct RootProperties {
  std::string compatible = "vmm,saved-state";
  std::array<uint32_t, 2> format_version = {kFormatMajor, kFormatMinor};
};
constexpr Property<RootProperties> kRootProperties[] = {
    field<String<64>, &RootProperties::compatible>("compatible", kOptional),
    field<Version, &RootProperties::format_version>("format-version"),
};

using Name = String<kMaxStringLength>;
constexpr Property<SavedMetadata> kMetadataProperties[] = {
    field<Name, &SavedMetadata::vm_name>("vm-name"),
    field<U64, &SavedMetadata::generation>("generation"),
    field<Name, &SavedMetadata::program_version>("program-version", kOptional),
    field<U64, &SavedMetadata::saved_at_realtime_ns>("saved-at-realtime-ns"),
    field<Flag, &SavedMetadata::was_running>("was-running"),
    field<U64, &SavedMetadata::guest_tsc_at_save>("guest-tsc-at-save"),
    field<U64, &SavedMetadata::host_monotonic_ns_at_save>("host-monotonic-ns-at-save"),
    field<U64, &SavedMetadata::vm_luo_token>("vm-luo-token"),
};

constexpr Property<kvm::VmState> kVmProperties[] = {
    field<KernelStruct<kvm_pic_state, "struct kvm_pic_state">, &kvm::VmState::pic_master>("pic-master"),
    field<KernelStruct<kvm_pic_state, "struct kvm_pic_state">, &kvm::VmState::pic_slave>("pic-slave"),
    field<KernelStruct<kvm_ioapic_state, "struct kvm_ioapic_state">, &kvm::VmState::ioapic>("ioapic"),
    field<KernelStruct<kvm_pit_state2, "struct kvm_pit_state2">, &kvm::VmState::pit>("pit"),
    field<KernelStruct<kvm_clock_data, "struct kvm_clock_data">, &kvm::VmState::clock>("clock"),
};

using kvm::VcpuState;
constexpr Property<VcpuState> kVcpuProperties[] = {
    field<U32, &VcpuState::id>("id"),
    field<KernelStruct<kvm_regs, "struct kvm_regs">, &VcpuState::regs>("regs"),
    field<KernelStruct<kvm_sregs, "struct kvm_sregs">, &VcpuState::sregs>("sregs"),
    field<KernelStruct<kvm_fpu, "struct kvm_fpu">, &VcpuState::fpu>("fpu"),
    field<KernelStruct<kvm::uapi::Xsave, "struct kvm_xsave">, &VcpuState::xsave>("xsave"),
    field<KernelStruct<kvm_xcrs, "struct kvm_xcrs">, &VcpuState::xcrs>("xcrs"),
    field<Msrs, &VcpuState::msrs>("msrs"),
    field<KernelStruct<kvm_lapic_state, "struct kvm_lapic_state">, &VcpuState::lapic>("lapic"),
    field<KernelStruct<kvm_mp_state, "struct kvm_mp_state">, &VcpuState::mp_state>("mp-state"),
    field<KernelStruct<kvm_vcpu_events, "struct kvm_vcpu_events">, &VcpuState::events>("events"),
    field<KernelStruct<kvm_debugregs, "struct kvm_debugregs">, &VcpuState::debugregs>("debugregs"),
    field<KernelArray<kvm_cpuid_entry2, "struct kvm_cpuid_entry2[]", kMaxCpuidEntries>, &VcpuState::cpuid>("cpuid"),
    field<U64, &VcpuState::tsc_khz>("tsc-khz"),
};

// A 1.0 blob has no thr-interrupt-pending: count the interrupt as pending
// when the saved IIR reports it or the guest has the THR-empty interrupt
// enabled. A guest driver enables it only while it has more to send and
// waits for it; an extra THR-empty interrupt costs it one IIR read, a lost
// one stops its output for good.
void default_thr_interrupt_pending(UartState& uart) {
  constexpr uint8_t kIirThrEmpty = 0x02, kIerThrEmpty = 0x02;
  uart.thr_interrupt_pending = (uart.iir & 0x0f) == kIirThrEmpty || (uart.ier & kIerThrEmpty) != 0;
}

constexpr Property<UartState> kUartProperties[] = {
    field<Register8, &UartState::ier>("ier"),
    field<Register8, &UartState::iir>("iir"),
    field<Register8, &UartState::lcr>("lcr"),
    field<Register8, &UartState::mcr>("mcr"),
    field<Register8, &UartState::lsr>("lsr"),
    field<Register8, &UartState::msr>("msr"),
    field<Register8, &UartState::scr>("scr"),
    field<Register8, &UartState::dll>("dll"),
    field<Register8, &UartState::dlm>("dlm"),
    field<Register8, &UartState::fcr>("fcr"),
    field<Bytes<kMaxUartPendingInput>, &UartState::pending_input>("pending-input", kOptional),
    field<Flag, &UartState::irq_level>("irq-level"),
    field<Flag, &UartState::thr_interrupt_pending>("thr-interrupt-pending", kOptional, 1,
                                                   default_thr_interrupt_pending),
};

using VerifyResult = TestDeviceState::VerifyResult;
constexpr Property<TestDeviceState> kTestDeviceProperties[] = {
    field<U64, &TestDeviceState::last_verify_request>("last-verify-request"),
    field<U64, &TestDeviceState::last_result, &VerifyResult::pages_checked>("last-pages-checked"),
    field<U64, &TestDeviceState::last_result, &VerifyResult::mismatches>("last-mismatches"),
    field<U64, &TestDeviceState::heartbeat_at_save>("heartbeat-at-save"),
};

using memory::RegionSpec;
constexpr Property<RegionRef> kRegionProperties[] = {
    field<Name, &RegionRef::spec, &RegionSpec::name>("name"),
    field<Enum<memory::RegionRole, role_name, role_from_name>, &RegionRef::spec, &RegionSpec::role>("role"),
    field<Enum<memory::Backing, backing_name, backing_from_name>, &RegionRef::spec, &RegionSpec::backing>("backing"),
    field<U64, &RegionRef::spec, &RegionSpec::gpa>("gpa"),
    field<U64, &RegionRef::spec, &RegionSpec::size>("size"),
    field<U32, &RegionRef::spec, &RegionSpec::slot>("slot"),
    field<U64, &RegionRef::luo_token>("luo-token"),
    field<U64, &RegionRef::vm_token>("vm-token"),
    field<Enum<SlotKind, slot_kind_name, slot_kind_from_name>, &RegionRef::slot_kind>("slot-kind"),
};

// The nodes. Each names its plain type, its properties and where its
// instances live in a SavedState; NodeOps<> turns that into the operations
// the tree walks below use.
struct Limits {
  size_t vcpus = 0, regions = 0;
};

struct MetadataNode {
  using Owner = SavedMetadata;
  static constexpr std::span<const Property<Owner>> properties = kMetadataProperties;
  static const Owner& get(const SavedState& state, size_t) { return state.metadata; }
  static Owner& get(SavedState& state, size_t) { return state.metadata; }
};
struct VmNode {
  using Owner = kvm::VmState;
  static constexpr std::span<const Property<Owner>> properties = kVmProperties;
  static const Owner& get(const SavedState& state, size_t) { return state.vm; }
  static Owner& get(SavedState& state, size_t) { return state.vm; }
};
struct UartNode {
  using Owner = UartState;
  static constexpr std::span<const Property<Owner>> properties = kUartProperties;
  static const Owner& get(const SavedState& state, size_t) { return state.uart; }
  static Owner& get(SavedState& state, size_t) { return state.uart; }
};
struct TestDeviceNode {
  using Owner = TestDeviceState;
  static constexpr std::span<const Property<Owner>> properties = kTestDeviceProperties;
  static const Owner& get(const SavedState& state, size_t) { return state.test_device; }
  static Owner& get(SavedState& state, size_t) { return state.test_device; }
};
// vcpu@<id in hex>, one per vCPU.
struct VcpuNode {
  using Owner = VcpuState;
  static constexpr std::span<const Property<Owner>> properties = kVcpuProperties;
  static constexpr size_t kMaxNameLength = 5 + 8;  // "vcpu@ffffffff"
  static const Owner& get(const SavedState& state, size_t i) { return state.vcpus[i]; }
  static Owner& get(SavedState& state, size_t i) { return state.vcpus[i]; }
  static size_t count(const SavedState& state) { return state.vcpus.size(); }
  static size_t max_count(const Limits& limits) { return limits.vcpus; }
  static void resize(SavedState& state, size_t count) { state.vcpus.resize(count); }
  static uint64_t number(const SavedState& state, size_t i) { return state.vcpus[i].id; }
};
// region@<index in hex>, in layout order.
struct RegionNode {
  using Owner = RegionRef;
  static constexpr std::span<const Property<Owner>> properties = kRegionProperties;
  static constexpr size_t kMaxNameLength = 7 + 16;  // "region@" and a 64-bit index
  static const Owner& get(const SavedState& state, size_t i) { return state.memory[i]; }
  static Owner& get(SavedState& state, size_t i) { return state.memory[i]; }
  static size_t count(const SavedState& state) { return state.memory.size(); }
  static size_t max_count(const Limits& limits) { return limits.regions; }
  static void resize(SavedState& state, size_t count) { state.memory.resize(count); }
  static uint64_t number(const SavedState&, size_t i) { return i; }
};

// The operations on one node's properties, over a SavedState.
template <class N>
struct NodeOps {
  using Owner = typename N::Owner;

  // What the properties of fixed size and all the names cost, once.
  static constexpr FdtBytes kFixed = [] {
    FdtBytes bytes;
    for (const Property<Owner>& property : N::properties) {
      bytes.strings += property.name.size() + 1;
      bytes.structure += kFdtPropertyHead + (property.size ? 0 : fdt_padded(property.max_size));
    }
    return bytes;
  }();
  // Sets *too_big to the first property beyond the format's limits.
  static FdtBytes size(const SavedState& state, size_t i, const char** too_big) {
    const Owner& owner = N::get(state, i);
    FdtBytes bytes = kFixed;
    for (const Property<Owner>& property : N::properties) {
      if (!property.size) continue;
      const size_t value = property.size(owner);
      if (value > property.max_size && *too_big == nullptr) *too_big = property.name.data();
      bytes.structure += fdt_padded(value);
    }
    return bytes;
  }
  // The value of a property named by size(): for the error message.
  static std::pair<size_t, size_t> value_and_limit(const SavedState& state, size_t i, std::string_view name) {
    for (const Property<Owner>& property : N::properties)
      if (property.name == name)
        return {property.size ? property.size(N::get(state, i)) : property.max_size, property.max_size};
    return {0, 0};
  }
  static FdtBytes max_size() {
    FdtBytes bytes;
    for (const Property<Owner>& property : N::properties) bytes += property_bytes(property.name, property.max_size);
    return bytes;
  }
  static void write(FdtWriter& w, const SavedState& state, size_t i) {
    const Owner& owner = N::get(state, i);
    for (const Property<Owner>& property : N::properties) property.write(w, property.name.data(), owner);
  }
  static Result<void> read(const Node& node, SavedState& state, size_t i) { return read_into(node, N::get(state, i)); }
  static Result<void> read_into(const Node& node, Owner& owner) {
    static_assert(N::properties.size() <= 64);
    uint64_t absent = 0;
    for (size_t p = 0; p < N::properties.size(); ++p) {
      const Property<Owner>& property = N::properties[p];
      VMM_TRY_ASSIGN(bytes, node.optional_bytes(property.name.data()));
      if (!bytes) {
        if (property.presence == Presence::required)
          return fail("state blob: required property " + node.below(property.name) + " is missing");
        absent |= uint64_t{1} << p;
        continue;
      }
      if (bytes->size() > property.max_size)
        return std::unexpected(node.bad(property.name.data(), "is " + std::to_string(bytes->size()) + " bytes, more than the " +
                                                           std::to_string(property.max_size) + " the format allows"));
      VMM_TRY(property.read(node, property.name.data(), *bytes, owner));
    }
    // Defaults last: they may depend on any property the node did carry.
    for (size_t p = 0; p < N::properties.size(); ++p)
      if ((absent >> p & 1) && N::properties[p].absent) N::properties[p].absent(owner);
    return {};
  }
  static const char* difference(const SavedState& a, const SavedState& b, size_t i) {
    const Owner& x = N::get(a, i);
    const Owner& y = N::get(b, i);
    for (const Property<Owner>& property : N::properties)
      if (!property.equal(x, y)) return property.name.data();
    return nullptr;
  }
  static std::vector<SchemaProperty> describe() {
    std::vector<SchemaProperty> rows;
    for (const Property<Owner>& property : N::properties)
      rows.push_back({property.name, property.type, property.presence, property.since_minor, property.max_size});
    return rows;
  }
};

// The root: its properties are not part of a SavedState.
struct RootNode {
  using Owner = RootProperties;
  static constexpr std::span<const Property<Owner>> properties = kRootProperties;
  static const Owner& get(const SavedState&, size_t) {
    static const RootProperties written;
    return written;
  }
};

// The reader of a node whose properties live in a SavedState; none for the
// root (parse_tree reads and checks its properties).
template <class N>
constexpr Result<void> (*reader())(const Node&, SavedState&, size_t) {
  if constexpr (requires(SavedState& state) {
                  { N::get(state, size_t{0}) } -> std::same_as<typename N::Owner&>;
                })
    return NodeOps<N>::read;
  else
    return nullptr;
}

// A node of the tree, type-erased: a single node (one instance, or none for
// a container without properties) or a repeated one (count() instances named
// prefix + hex(number())), with its children.
struct NodeSpec {
  std::string_view name;  // the node's name, or a repeated node's prefix
  std::string_view instance_doc;  // how docs spell a repeated node's suffix: "<id>"
  bool has_properties;
  size_t max_name_length;
  size_t (*count)(const SavedState&);  // nullptr: exactly one
  size_t (*max_count)(const Limits&);
  void (*resize)(SavedState&, size_t);
  uint64_t (*number)(const SavedState&, size_t);
  FdtBytes (*size)(const SavedState&, size_t, const char** too_big);
  std::pair<size_t, size_t> (*value_and_limit)(const SavedState&, size_t, std::string_view);
  FdtBytes (*max_size)();
  void (*write)(FdtWriter&, const SavedState&, size_t);
  Result<void> (*read)(const Node&, SavedState&, size_t);
  const char* (*difference)(const SavedState&, const SavedState&, size_t);
  std::vector<SchemaProperty> (*describe)();
  std::span<const NodeSpec> children;
};

template <class N>
constexpr NodeSpec single(std::string_view name, std::span<const NodeSpec> children = {}) {
  return {.name = name, .instance_doc = {}, .has_properties = true, .max_name_length = name.size(),
          .count = nullptr, .max_count = nullptr, .resize = nullptr, .number = nullptr,
          .size = NodeOps<N>::size, .value_and_limit = NodeOps<N>::value_and_limit, .max_size = NodeOps<N>::max_size, .write = NodeOps<N>::write,
          .read = reader<N>(), .difference = NodeOps<N>::difference, .describe = NodeOps<N>::describe,
          .children = children};
}
template <class N>
constexpr NodeSpec repeated(std::string_view prefix, std::string_view instance_doc) {
  NodeSpec spec = single<N>(prefix);
  spec.instance_doc = instance_doc;
  spec.max_name_length = N::kMaxNameLength;
  spec.count = N::count;
  spec.max_count = N::max_count;
  spec.resize = N::resize;
  spec.number = N::number;
  return spec;
}
constexpr NodeSpec container(std::string_view name, std::span<const NodeSpec> children) {
  return {.name = name, .instance_doc = {}, .has_properties = false, .max_name_length = name.size(),
          .count = nullptr, .max_count = nullptr, .resize = nullptr, .number = nullptr, .size = nullptr,
          .value_and_limit = nullptr, .max_size = nullptr, .write = nullptr, .read = nullptr, .difference = nullptr, .describe = nullptr,
          .children = children};
}

constexpr NodeSpec kVcpusChildren[] = {repeated<VcpuNode>("vcpu@", "<id>")};
constexpr NodeSpec kDevicesChildren[] = {single<UartNode>("uart@3f8"), single<TestDeviceNode>("test-guest")};
constexpr NodeSpec kMemoryChildren[] = {repeated<RegionNode>("region@", "<index>")};
constexpr NodeSpec kRootChildren[] = {
    single<MetadataNode>("metadata"),          single<VmNode>("vm"),
    container("vcpus", kVcpusChildren),         container("devices", kDevicesChildren),
    container("memory", kMemoryChildren),
};
// The root is written and sized like any node; reading it checks its version
// against the header (parse_tree).
constexpr NodeSpec kRoot = single<RootNode>("", kRootChildren);

// ---- the walks --------------------------------------------------------------

size_t instances(const NodeSpec& spec, const SavedState& state) { return spec.count ? spec.count(state) : 1; }

std::string instance_name(const NodeSpec& spec, const SavedState& state, size_t i) {
  if (!spec.number) return std::string(spec.name);
  return std::string(spec.name) + hex(spec.number(state, i));
}

std::string child_path(const std::string& parent, std::string_view name) {
  return (parent == "/" ? "" : parent) + "/" + std::string(name);
}

size_t hex_digits(uint64_t value) {
  size_t digits = 1;
  while (value >>= 4) ++digits;
  return digits;
}

// The first property beyond the format's limits, found by tree_size().
struct TooBig {
  const NodeSpec* spec = nullptr;
  size_t instance = 0;
  const char* property = nullptr;
};

// Allocates nothing (it runs inside the blackout); notes in *too_big the
// first property beyond the format's limits.
FdtBytes tree_size(const NodeSpec& spec, const SavedState& state, TooBig& too_big) {
  FdtBytes bytes;
  for (size_t i = 0, n = instances(spec, state); i < n; ++i) {
    bytes.structure +=
        node_bytes(spec.name.size() + (spec.number ? hex_digits(spec.number(state, i)) : 0));
    if (spec.has_properties) {
      const char* property = nullptr;
      bytes += spec.size(state, i, &property);
      if (property && !too_big.property) too_big = {&spec, i, property};
    }
    for (const NodeSpec& child : spec.children) bytes += tree_size(child, state, too_big);
  }
  return bytes;
}

// The path of an instance of `target` in the tree, for messages.
bool find_path(const NodeSpec& spec, const NodeSpec& target, size_t instance, const SavedState& state,
               const std::string& parent, std::string& out) {
  const bool is_root = spec.name.empty();
  if (&spec == &target) {
    out = is_root ? "" : child_path(parent, instance_name(spec, state, instance));
    return true;
  }
  const std::string path = is_root ? "/" : child_path(parent, spec.name);
  for (const NodeSpec& child : spec.children)
    if (find_path(child, target, instance, state, path, out)) return true;
  return false;
}

FdtBytes tree_max_size(const NodeSpec& spec, const Limits& limits) {
  FdtBytes one;
  one.structure = node_bytes(spec.max_name_length);
  if (spec.has_properties) one += spec.max_size();
  for (const NodeSpec& child : spec.children) one += tree_max_size(child, limits);
  const size_t count = spec.max_count ? spec.max_count(limits) : 1;
  return {one.structure * count, one.strings * count};
}

void write_tree(FdtWriter& w, const NodeSpec& spec, const SavedState& state) {
  for (size_t i = 0, n = instances(spec, state); i < n; ++i) {
    if (spec.number) {
      // prefix + hex number, without allocating: this runs inside the blackout
      char name[40];
      static_assert(std::max(VcpuNode::kMaxNameLength, RegionNode::kMaxNameLength) < sizeof(name));
      std::memcpy(name, spec.name.data(), spec.name.size());
      char* end = std::to_chars(name + spec.name.size(), name + sizeof(name) - 1, spec.number(state, i), 16).ptr;
      *end = 0;
      w.begin_node(name);
    } else {
      w.begin_node(spec.name.data());  // every name above is a NUL-terminated literal
    }
    if (spec.has_properties) spec.write(w, state, i);
    for (const NodeSpec& child : spec.children) write_tree(w, child, state);
    w.end_node();
  }
}

Result<void> read_tree(const NodeSpec& spec, const Node& parent, SavedState& state) {
  std::vector<Node> nodes;
  if (spec.count) {
    VMM_TRY_ASSIGN(found, parent.children_named(spec.name));
    nodes = std::move(found);
    spec.resize(state, nodes.size());
  } else {
    VMM_TRY_ASSIGN(found, parent.child(spec.name));
    nodes.push_back(std::move(found));
  }
  for (size_t i = 0; i < nodes.size(); ++i) {
    if (spec.has_properties) VMM_TRY(spec.read(nodes[i], state, i));
    for (const NodeSpec& child : spec.children) VMM_TRY(read_tree(child, nodes[i], state));
  }
  return {};
}

std::optional<std::string> tree_difference(const NodeSpec& spec, const SavedState& a, const SavedState& b,
                                           const std::string& parent) {
  const size_t count = instances(spec, a);
  if (count != instances(spec, b)) return parent;
  for (size_t i = 0; i < count; ++i) {
    const std::string path = spec.name.empty() ? "/" : child_path(parent, instance_name(spec, a, i));
    if (spec.number && spec.number(a, i) != spec.number(b, i)) return path;
    if (spec.has_properties)
      if (const char* property = spec.difference(a, b, i)) return child_path(path, property);
    for (const NodeSpec& child : spec.children)
      if (auto found = tree_difference(child, a, b, path)) return found;
  }
  return std::nullopt;
}

void describe_tree(const NodeSpec& spec, const std::string& parent, std::vector<SchemaNode>& out) {
  const std::string path =
      spec.name.empty() ? "/" : child_path(parent, std::string(spec.name) + std::string(spec.instance_doc));
  out.push_back({path, spec.count != nullptr, spec.has_properties ? spec.describe() : std::vector<SchemaProperty>{}});
  for (const NodeSpec& child : spec.children) describe_tree(child, path, out);
}

// ---- encode and decode helpers ------------------------------------------------

std::expected<size_t, int> build_payload(const SavedState& state, std::span<uint8_t> buffer) {
  FdtWriter w(buffer);
  write_tree(w, kRoot, state);
  return w.finish();
}

// The payload's exact size, after validate() and the format's limits.
Result<size_t> payload_size(const SavedState& state) {
  if (auto valid = validate(state); !valid)
    return std::unexpected(valid.error().with_context("cannot encode state"));
  TooBig too_big;
  const FdtBytes bytes = tree_size(kRoot, state, too_big);
  if (too_big.property) {
    std::string path;
    find_path(kRoot, *too_big.spec, too_big.instance, state, "", path);
    const auto [value, limit] = too_big.spec->value_and_limit(state, too_big.instance, too_big.property);
    return fail("cannot encode state: property " + path + "/" + too_big.property + " is " + std::to_string(value) +
                " bytes, more than the " + std::to_string(limit) + " the format allows");
  }
  return kFdtPrologue + bytes.structure + kFdtTag + bytes.strings;  // FDT_END closes the structure block
}

// Writes the header in front of a payload already built at blob[kHeaderSize..].
void seal(std::span<uint8_t> blob, size_t payload_size) {
  BlobHeader header;
  header.payload_size = payload_size;
  header.payload_crc32c = crc32c(blob.subspan(kHeaderSize, payload_size));
  write_header(header, blob.first<kHeaderSize>());
}

Error fdt_write_error(int fdt_error) {
  if (fdt_error == -FDT_ERR_NOSPACE)
    return Error{0, "cannot build the state FDT: it outgrew its computed size (a bug in the state schema's "
                    "size arithmetic)"};
  return Error{0, std::string("cannot build the state FDT: ") + fdt_strerror(fdt_error)};
}

Result<SavedState> parse_tree(const void* fdt, const BlobHeader& header) {
  const Node root(fdt, 0, "/");
  RootProperties found;
  VMM_TRY(NodeOps<RootNode>::read_into(root, found));
  const auto [tree_major, tree_minor] = found.format_version;
  if (tree_major != header.format_major || tree_minor != header.format_minor)
    return fail("state blob: FDT says format " + std::to_string(tree_major) + "." +
                std::to_string(tree_minor) + " but its header says " +
                std::to_string(header.format_major) + "." + std::to_string(header.format_minor));

  SavedState state;
  for (const NodeSpec& child : kRoot.children) VMM_TRY(read_tree(child, root, state));
  if (auto valid = validate(state); !valid) return std::unexpected(valid.error().with_context("state blob"));
  return state;
}

}  // namespace

uint64_t max_encoded_size(size_t vcpu_count, size_t region_count) {
  const FdtBytes bytes = tree_max_size(kRoot, {.vcpus = vcpu_count, .regions = region_count});
  return kHeaderSize + kFdtPrologue + bytes.structure + kFdtTag + bytes.strings;
}

Result<size_t> encoded_size(const SavedState& state) {
  VMM_TRY_ASSIGN(payload, payload_size(state));
  return kHeaderSize + payload;
}

std::optional<std::string> first_difference(const SavedState& a, const SavedState& b) {
  return tree_difference(kRoot, a, b, "");
}

std::vector<SchemaNode> state_schema() {
  std::vector<SchemaNode> nodes;
  describe_tree(kRoot, "", nodes);
  return nodes;
}

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
  VMM_TRY_ASSIGN(payload, payload_size(state));
  std::vector<uint8_t> blob(kHeaderSize + payload);
  const std::expected<size_t, int> built = build_payload(state, std::span(blob).subspan(kHeaderSize));
  if (!built) return std::unexpected(fdt_write_error(built.error()));
  seal(blob, *built);
  return blob;
}

Result<size_t> encode_into(const SavedState& state, std::span<uint8_t> dest) {
  // Whatever happens next, what is in dest stops being a valid blob first.
  std::ranges::fill(dest.first(std::min(dest.size(), kStateMagic.size())), 0);

  VMM_TRY_ASSIGN(payload, payload_size(state));
  const size_t blob_size = kHeaderSize + payload;
  if (blob_size > dest.size())
    return fail("state (" + std::to_string(blob_size) + " bytes) does not fit the state memfd (" +
                std::to_string(dest.size()) + " bytes)");
  if (is_fdt_aligned(dest.data() + kHeaderSize)) {
    // Exactly the payload's size: libfdt clears all of the buffer it is given.
    const std::expected<size_t, int> built = build_payload(state, dest.subspan(kHeaderSize, payload));
    if (!built) return std::unexpected(fdt_write_error(built.error()));
    seal(dest, *built);
    return kHeaderSize + *built;
  }
  // Misaligned for libfdt: encode aside and copy, payload before header.
  VMM_TRY_ASSIGN(blob, encode(state));
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
