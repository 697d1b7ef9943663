// The saved state as a versioned blob: a fixed little-endian header followed
// by a flattened device tree (built and parsed with libfdt, like the kernel's
// KHO). The tree is described once, as per-node property tables in
// state_blob.cc (state_schema() lists them); the writer, the reader, the size
// computations and the comparison all walk those tables, and
// docs/state-format.md documents them (a test checks the two agree).
//
// Compatibility: the format version is independent of the program version.
// A reader accepts any minor version of a major it knows (a newer minor only
// adds optional properties and nodes, which the reader ignores; properties a
// newer reader expects but an older writer did not write get defaults), and
// refuses an unknown major version.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "base/result.h"
#include "migration/saved_state.h"

namespace vmm::migration {

inline constexpr std::array<uint8_t, 8> kStateMagic = {'V', 'M', 'M', 'S', 'T', 'A', 'T', 'E'};
inline constexpr uint16_t kFormatMajor = 1;
// 1.1 added /devices/uart@3f8/thr-interrupt-pending.
inline constexpr uint16_t kFormatMinor = 1;
// Size of the header as this version writes it. A newer minor version may
// write a longer header; the payload then starts at its header_size.
inline constexpr uint32_t kHeaderSize = 32;

// The header fields (magic excluded). On the wire, little-endian:
//   0  u8[8] magic "VMMSTATE"
//   8  u16   format_major
//  10  u16   format_minor
//  12  u32   header_size      offset of the payload
//  16  u64   payload_size     bytes of FDT
//  24  u32   payload_crc32c   CRC32C (Castagnoli) of the payload
//  28  u32   flags            none defined in 1.x; readers ignore unknown bits
struct BlobHeader {
  uint16_t format_major = kFormatMajor;
  uint16_t format_minor = kFormatMinor;
  uint32_t header_size = kHeaderSize;
  uint64_t payload_size = 0;
  uint32_t payload_crc32c = 0;
  uint32_t flags = 0;
  // header plus payload; bytes after it (a pre-sized memfd) are not part of the blob
  [[nodiscard]] uint64_t blob_size() const { return header_size + payload_size; }
  friend bool operator==(const BlobHeader&, const BlobHeader&) = default;
};

// CRC32C (Castagnoli, reflected, init and final xor ~0): check value
// crc32c("123456789") == 0xE3069283.
[[nodiscard]] uint32_t crc32c(std::span<const uint8_t> bytes);

// Reads and checks the header: length, magic, known major version, header
// size, and that the payload it announces is present. The checksum and the
// payload itself are left to decode().
[[nodiscard]] Result<BlobHeader> read_header(std::span<const uint8_t> blob);
// Writes the first kHeaderSize bytes of a header (magic included).
void write_header(const BlobHeader& header, std::span<uint8_t, kHeaderSize> dest);

// Validates the state and encodes it as a complete blob.
[[nodiscard]] Result<std::vector<uint8_t>> encode(const SavedState& state);

// Encodes straight into `dest` (e.g. a pre-sized state memfd mapping) and
// returns the blob's size. Fails with "state (N bytes) does not fit the state
// memfd (M bytes)" when it is too small. The header is written last, after
// its magic has been cleared first, so a failed or interrupted encode never
// leaves an older blob that still looks valid.
[[nodiscard]] Result<size_t> encode_into(const SavedState& state, std::span<uint8_t> dest);

// The largest blob a state with `vcpu_count` vCPUs and `region_count` memory
// regions can encode to, header included: every variable-length property at
// the largest size the format allows (the limits are in the schema and
// enforced by encode and decode). For sizing a state memfd before the pause.
[[nodiscard]] uint64_t max_encoded_size(size_t vcpu_count, size_t region_count);

// The exact size encode() produces for `state` (header included), or why it
// cannot be encoded (a property beyond the format's limits, or a state that
// fails validate()).
[[nodiscard]] Result<size_t> encoded_size(const SavedState& state);

// The first property in which two states differ, as its path in the tree
// ("/vcpus/vcpu@1/xsave"; "/vcpus" when the vCPU counts differ), or nothing
// when everything the format carries is equal. Kernel structs compare byte
// for byte. SavedState's operator== is first_difference() == nullopt.
[[nodiscard]] std::optional<std::string> first_difference(const SavedState& a, const SavedState& b);

// The schema as data, for documentation and its test: every node in tree
// order, each with its properties in the order they are written.
enum class Presence : uint8_t { required, optional };
struct SchemaProperty {
  std::string_view name;
  std::string_view type;  // as docs/state-format.md spells it: "u64", "flag", "struct kvm_regs", ...
  Presence presence;
  uint16_t since_minor;   // added in format 1.<since_minor>
  size_t max_size;        // the largest value the format allows, in bytes
};
struct SchemaNode {
  std::string path;       // "/devices/uart@3f8"; a repeated node as "/vcpus/vcpu@<id>"
  bool repeated;          // zero or more instances, recognized by name prefix
  std::vector<SchemaProperty> properties;
};
[[nodiscard]] std::vector<SchemaNode> state_schema();

// Checks the blob before trusting any of it (header, checksum, FDT structure,
// every required property with its exact size, then validate()) and rebuilds
// the state. Bytes after the blob are ignored. `blob` need not be aligned.
[[nodiscard]] Result<SavedState> decode(std::span<const uint8_t> blob);

}  // namespace vmm::migration
