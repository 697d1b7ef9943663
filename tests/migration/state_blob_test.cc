// The saved-state blob: round trips, every refusal with its message, forward
// compatibility, and a mutation loop that must never crash.
#include "migration/state_blob.h"

#include "tests/migration/sample_states.h"

#include <gtest/gtest.h>
#include <libfdt.h>

#include <algorithm>
#include <cstring>
#include <random>
#include <set>
#include <string>
#include <vector>

namespace vmm::migration {
namespace {

std::vector<uint8_t> encoded(const SavedState& state) {
  auto blob = encode(state);
  EXPECT_TRUE(blob.has_value()) << blob.error().describe();
  return blob.value_or(std::vector<uint8_t>{});
}

// "decoded" on success, otherwise the error message.
std::string decode_outcome(std::span<const uint8_t> blob) {
  auto state = decode(blob);
  return state ? std::string("decoded") : state.error().message;
}

#define EXPECT_CONTAINS(text, fragment)                                          \
  EXPECT_NE(std::string(text).find(fragment), std::string::npos)                 \
      << "expected \"" << (fragment) << "\" in: " << (text)

BlobHeader header_of(const std::vector<uint8_t>& blob) {
  auto header = read_header(blob);
  EXPECT_TRUE(header.has_value());
  return header.value_or(BlobHeader{});
}

void rewrite_header(std::vector<uint8_t>& blob, const BlobHeader& header) {
  write_header(header, std::span(blob).first<kHeaderSize>());
}

// The payload of a blob, opened with room to edit it with libfdt's read-write
// API; seal() packs it and wraps it in a header with a fresh checksum, so
// what decode then sees is a structurally edited but uncorrupted blob.
class EditableTree {
 public:
  explicit EditableTree(const std::vector<uint8_t>& blob) : header_(header_of(blob)) {
    storage_.resize((header_.payload_size + 64 * 1024) / 8);
    const int rc = fdt_open_into(blob.data() + header_.header_size, storage_.data(),
                                 static_cast<int>(storage_.size() * 8));
    EXPECT_EQ(rc, 0) << fdt_strerror(rc);
  }

  void* fdt() { return storage_.data(); }
  int node(const char* path) {
    const int offset = fdt_path_offset(fdt(), path);
    EXPECT_GE(offset, 0) << path << ": " << fdt_strerror(offset);
    return offset;
  }
  void set_bytes(const char* path, const char* property, std::span<const uint8_t> value) {
    ASSERT_EQ(fdt_setprop(fdt(), node(path), property, value.data(), static_cast<int>(value.size())), 0);
  }
  void set_u32(const char* path, const char* property, uint32_t value) {
    ASSERT_EQ(fdt_setprop_u32(fdt(), node(path), property, value), 0);
  }
  void set_string(const char* path, const char* property, const char* value) {
    ASSERT_EQ(fdt_setprop_string(fdt(), node(path), property, value), 0);
  }
  void remove_property(const char* path, const char* property) {
    ASSERT_EQ(fdt_delprop(fdt(), node(path), property), 0) << path << "/" << property;
  }
  void remove_node(const char* path) { ASSERT_EQ(fdt_del_node(fdt(), node(path)), 0) << path; }
  std::vector<uint8_t> property(const char* path, const char* property) {
    int length = 0;
    const auto* data = static_cast<const uint8_t*>(fdt_getprop(fdt(), node(path), property, &length));
    EXPECT_NE(data, nullptr) << path << "/" << property;
    return data ? std::vector<uint8_t>(data, data + length) : std::vector<uint8_t>{};
  }

  std::vector<uint8_t> seal(BlobHeader header) {
    EXPECT_EQ(fdt_pack(fdt()), 0);
    const auto* payload = static_cast<const uint8_t*>(fdt());
    const size_t payload_size = fdt_totalsize(fdt());
    std::vector<uint8_t> blob(header.header_size + payload_size);
    std::memcpy(blob.data() + header.header_size, payload, payload_size);
    header.payload_size = payload_size;
    header.payload_crc32c = crc32c({payload, payload_size});
    rewrite_header(blob, header);
    return blob;
  }
  std::vector<uint8_t> seal() { return seal(header_); }

 private:
  BlobHeader header_;
  std::vector<uint64_t> storage_;  // libfdt wants the tree 8-byte aligned
};

// Every (node path, property name) of a tree.
std::vector<std::pair<std::string, std::string>> all_properties(const void* fdt) {
  std::vector<std::pair<std::string, std::string>> found;
  for (int node = 0; node >= 0; node = fdt_next_node(fdt, node, nullptr)) {
    char path[256];
    EXPECT_EQ(fdt_get_path(fdt, node, path, sizeof(path)), 0);
    int property = 0;
    fdt_for_each_property_offset(property, fdt, node) {
      const char* name = nullptr;
      fdt_getprop_by_offset(fdt, property, &name, nullptr);
      found.emplace_back(path, name);
    }
  }
  return found;
}

// ---- checksum and round trips -----------------------------------------------

TEST(Crc32c, MatchesTheCastagnoliCheckValue) {
  const std::string_view check = "123456789";
  EXPECT_EQ(crc32c({reinterpret_cast<const uint8_t*>(check.data()), check.size()}), 0xE3069283u);
  EXPECT_EQ(crc32c({}), 0u);
}

// RFC 3720 B.4: long enough for the 8-bytes-at-a-time path, and unaligned.
TEST(Crc32c, MatchesTheIscsiTestVectors) {
  std::vector<uint8_t> zeros(32, 0x00), ones(32, 0xff), ascending(32), unaligned(33);
  for (size_t i = 0; i < ascending.size(); ++i) ascending[i] = static_cast<uint8_t>(i);
  EXPECT_EQ(crc32c(zeros), 0x8A9136AAu);
  EXPECT_EQ(crc32c(ones), 0x62A8AB43u);
  EXPECT_EQ(crc32c(ascending), 0x46DD794Eu);
  std::copy(ascending.begin(), ascending.end(), unaligned.begin() + 1);
  EXPECT_EQ(crc32c(std::span<const uint8_t>(unaligned).subspan(1)), 0x46DD794Eu);
}

TEST(StateBlob, FullyPopulatedStateRoundTripsEqual) {
  const SavedState state = full_state();
  const std::vector<uint8_t> blob = encoded(state);
  auto decoded = decode(blob);
  ASSERT_TRUE(decoded.has_value()) << decoded.error().describe();
  EXPECT_TRUE(*decoded == state);
  EXPECT_EQ(decoded->vcpus.size(), 3u);
  EXPECT_EQ(decoded->vcpus[0].msrs, state.vcpus[0].msrs);
  EXPECT_EQ(decoded->memory, state.memory);  // order preserved
  EXPECT_EQ(decoded->uart, state.uart);
}

TEST(StateBlob, EqualityNoticesAOneByteDifferenceInAKernelStruct) {
  const SavedState state = full_state();
  SavedState changed = state;
  reinterpret_cast<uint8_t*>(&changed.vcpus[1].xsave)[4000] ^= 1;
  EXPECT_FALSE(changed == state);
  changed = state;
  reinterpret_cast<uint8_t*>(&changed.vm.clock)[0] ^= 1;
  EXPECT_FALSE(changed == state);
}

TEST(StateBlob, SmallStateRoundTripsEqual) {
  const SavedState state = small_state();
  auto decoded = decode(encoded(state));
  ASSERT_TRUE(decoded.has_value()) << decoded.error().describe();
  EXPECT_TRUE(*decoded == state);
}

TEST(StateBlob, EncodingIsDeterministic) { EXPECT_EQ(encoded(full_state(3)), encoded(full_state(3))); }

TEST(StateBlob, HeaderDescribesTheBlob) {
  const std::vector<uint8_t> blob = encoded(full_state());
  ASSERT_EQ(std::memcmp(blob.data(), "VMMSTATE", 8), 0);
  const BlobHeader header = header_of(blob);
  EXPECT_EQ(header.format_major, 1);
  EXPECT_EQ(header.format_minor, 1);
  EXPECT_EQ(header.header_size, kHeaderSize);
  EXPECT_EQ(header.blob_size(), blob.size());
  EXPECT_EQ(header.flags, 0u);
  EXPECT_EQ(header.payload_crc32c, crc32c(std::span(blob).subspan(kHeaderSize)));
}

TEST(StateBlob, TrailingBytesAfterTheBlobAreIgnored) {
  std::vector<uint8_t> blob = encoded(full_state());
  blob.resize(blob.size() + 4096, 0xAA);  // the rest of a pre-sized memfd
  EXPECT_EQ(decode_outcome(blob), "decoded");
}

TEST(StateBlob, MisalignedInputDecodes) {
  const std::vector<uint8_t> blob = encoded(full_state());
  std::vector<uint8_t> shifted(blob.size() + 3);
  std::memcpy(shifted.data() + 3, blob.data(), blob.size());
  auto decoded = decode(std::span(shifted).subspan(3));
  ASSERT_TRUE(decoded.has_value()) << decoded.error().describe();
  EXPECT_TRUE(*decoded == full_state());
}

// ---- encode_into ------------------------------------------------------------

TEST(EncodeInto, WritesTheSameBytesAsEncode) {
  const SavedState state = full_state();
  const std::vector<uint8_t> expected = encoded(state);
  std::vector<uint64_t> memfd((expected.size() + 4096) / 8);  // aligned, with room to spare
  std::span<uint8_t> dest(reinterpret_cast<uint8_t*>(memfd.data()), memfd.size() * 8);
  auto written = encode_into(state, dest);
  ASSERT_TRUE(written.has_value()) << written.error().describe();
  ASSERT_EQ(*written, expected.size());
  EXPECT_TRUE(std::ranges::equal(dest.first(*written), expected));
  EXPECT_EQ(decode_outcome(dest), "decoded");
}

TEST(EncodeInto, WorksIntoAnExactlySizedMisalignedBuffer) {
  const SavedState state = full_state();
  const std::vector<uint8_t> expected = encoded(state);
  std::vector<uint8_t> storage(expected.size() + 1);
  auto written = encode_into(state, std::span(storage).subspan(1));
  ASSERT_TRUE(written.has_value()) << written.error().describe();
  EXPECT_TRUE(std::ranges::equal(std::span(storage).subspan(1), expected));
}

TEST(EncodeInto, TooSmallBufferSaysHowBigTheStateIs) {
  const SavedState state = full_state();
  const size_t needed = encoded(state).size();
  for (size_t size : {size_t{0}, size_t{8}, size_t{kHeaderSize}, size_t{4096}, needed - 1}) {
    SCOPED_TRACE(size);
    std::vector<uint64_t> memfd(size / 8 + 1);
    auto written = encode_into(state, {reinterpret_cast<uint8_t*>(memfd.data()), size});
    ASSERT_FALSE(written.has_value());
    EXPECT_EQ(written.error().message, "state (" + std::to_string(needed) +
                                           " bytes) does not fit the state memfd (" +
                                           std::to_string(size) + " bytes)");
  }
}

TEST(EncodeInto, AFailedEncodeLeavesNoStaleValidBlob) {
  const std::vector<uint8_t> old_blob = encoded(small_state());
  std::vector<uint64_t> memfd((old_blob.size() + 7) / 8);
  std::span<uint8_t> dest(reinterpret_cast<uint8_t*>(memfd.data()), old_blob.size());
  std::ranges::copy(old_blob, dest.begin());
  ASSERT_EQ(decode_outcome(dest), "decoded");

  ASSERT_FALSE(encode_into(full_state(), dest).has_value());  // bigger than the old one
  EXPECT_CONTAINS(decode_outcome(dest), "magic");
}

// ---- encode refuses inconsistent states ------------------------------------

TEST(Encode, RefusesInconsistentStates) {
  struct Case {
    const char* what;
    void (*break_it)(SavedState&);
    const char* message;
  };
  const Case cases[] = {
      {"no vCPUs", [](SavedState& s) { s.vcpus.clear(); }, "no vCPUs"},
      {"duplicate vCPU ids", [](SavedState& s) { s.vcpus[1].id = s.vcpus[0].id; },
       "vCPU id 0 appears more than once"},
      {"no RAM", [](SavedState& s) { std::erase_if(s.memory, [](const RegionRef& r) { return r.spec.role == memory::RegionRole::ram; }); },
       "no RAM region"},
      {"duplicate region", [](SavedState& s) { s.memory[1].spec.name = "ram0"; },
       "memory region \"ram0\" appears more than once"},
      {"shared memslot", [](SavedState& s) { s.memory[2].spec.slot = 0; },
       "memslot 0 is given to both \"ram0\" and \"shared\""},
      {"NUL in name", [](SavedState& s) { s.metadata.vm_name = std::string("a\0b", 3); },
       "embedded NUL"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    SavedState state = full_state();
    c.break_it(state);
    auto blob = encode(state);
    ASSERT_FALSE(blob.has_value());
    EXPECT_CONTAINS(blob.error().message, "cannot encode state: ");
    EXPECT_CONTAINS(blob.error().message, c.message);
    std::vector<uint8_t> dest(1 << 20);
    EXPECT_FALSE(encode_into(state, dest).has_value());
  }
}

// ---- header refusals --------------------------------------------------------

TEST(DecodeHeader, EveryTruncationIsRefused) {
  const std::vector<uint8_t> blob = encoded(small_state());
  for (size_t length = 0; length < blob.size(); ++length) {
    const std::string outcome = decode_outcome(std::span(blob).first(length));
    if (length < kHeaderSize) {
      ASSERT_EQ(outcome, "state blob is " + std::to_string(length) +
                             " bytes, shorter than the 32-byte header");
    } else {
      ASSERT_NE(outcome.find("state blob is truncated"), std::string::npos)
          << length << ": " << outcome;
    }
  }
  EXPECT_EQ(decode_outcome(blob), "decoded");
}

TEST(DecodeHeader, BadMagicIsRefused) {
  std::vector<uint8_t> blob = encoded(small_state());
  blob[0] = 'X';
  EXPECT_CONTAINS(decode_outcome(blob), "has no \"VMMSTATE\" magic");
  std::vector<uint8_t> zeros(4096, 0);  // a state memfd nobody wrote
  EXPECT_CONTAINS(decode_outcome(zeros), "has no \"VMMSTATE\" magic");
}

TEST(DecodeHeader, UnknownMajorVersionIsRefused) {
  std::vector<uint8_t> blob = encoded(small_state());
  BlobHeader header = header_of(blob);
  header.format_major = 3;
  header.format_minor = 2;
  rewrite_header(blob, header);
  EXPECT_EQ(decode_outcome(blob),
            "state format 3.x is newer than this vmm understands (1.x); upgrade vmm or restore "
            "with the version that wrote it");
  header.format_major = 0;
  rewrite_header(blob, header);
  EXPECT_CONTAINS(decode_outcome(blob), "state format 0.x is older than this vmm understands");
}

TEST(DecodeHeader, NewerMinorVersionIsAccepted) {
  const SavedState state = full_state();
  EditableTree tree(encoded(state));
  const uint8_t version_1_5[] = {0, 0, 0, 1, 0, 0, 0, 5};
  tree.set_bytes("/", "format-version", version_1_5);
  BlobHeader header;
  header.format_minor = 5;
  auto decoded = decode(tree.seal(header));
  ASSERT_TRUE(decoded.has_value()) << decoded.error().describe();
  EXPECT_TRUE(*decoded == state);
}

TEST(DecodeHeader, HeaderAndTreeMustAgreeOnTheVersion) {
  std::vector<uint8_t> blob = encoded(small_state());
  BlobHeader header = header_of(blob);
  header.format_minor = 2;  // the tree still says 1.1
  rewrite_header(blob, header);
  EXPECT_EQ(decode_outcome(blob), "state blob: FDT says format 1.1 but its header says 1.2");
}

TEST(DecodeHeader, LongerHeaderFromANewerWriterIsSkipped) {
  const SavedState state = full_state();
  EditableTree tree(encoded(state));
  BlobHeader header;
  header.header_size = 48;  // 16 bytes of header fields this reader does not know
  std::vector<uint8_t> blob = tree.seal(header);
  std::fill(blob.begin() + kHeaderSize, blob.begin() + 48, 0xEE);
  auto decoded = decode(blob);
  ASSERT_TRUE(decoded.has_value()) << decoded.error().describe();
  EXPECT_TRUE(*decoded == state);
}

TEST(DecodeHeader, HeaderSizeBelowTheFixedHeaderIsRefused) {
  std::vector<uint8_t> blob = encoded(small_state());
  BlobHeader header = header_of(blob);
  header.header_size = 16;
  rewrite_header(blob, header);
  EXPECT_EQ(decode_outcome(blob),
            "state blob header size 16 is smaller than the 32 bytes of a 1.x header");
}

TEST(DecodeHeader, HeaderClaimingMoreThanTheBufferIsTruncation) {
  std::vector<uint8_t> blob = encoded(small_state());
  BlobHeader header = header_of(blob);
  for (uint64_t payload_size : {header.payload_size + 1, uint64_t{1} << 40, ~uint64_t{0}}) {
    header.payload_size = payload_size;
    rewrite_header(blob, header);
    EXPECT_CONTAINS(decode_outcome(blob), "state blob is truncated: its header announces 32 + " +
                                              std::to_string(payload_size) + " bytes but only " +
                                              std::to_string(blob.size()) + " are available");
  }
  header = header_of(encoded(small_state()));
  header.header_size = 0xFFFF'FFF0;
  rewrite_header(blob, header);
  EXPECT_CONTAINS(decode_outcome(blob), "state blob is truncated");
}

TEST(DecodeHeader, UnknownFlagsAreIgnored) {
  std::vector<uint8_t> blob = encoded(small_state());
  BlobHeader header = header_of(blob);
  header.flags = 0xFFFF'FFFF;
  rewrite_header(blob, header);
  EXPECT_EQ(decode_outcome(blob), "decoded");
}

// ---- payload refusals -------------------------------------------------------

TEST(DecodePayload, AnyFlippedPayloadByteFailsTheChecksum) {
  const std::vector<uint8_t> blob = encoded(full_state());
  for (size_t offset = kHeaderSize; offset < blob.size(); offset += 61) {
    std::vector<uint8_t> corrupted = blob;
    corrupted[offset] ^= 0x10;
    ASSERT_NE(decode_outcome(corrupted).find("checksum mismatch"), std::string::npos) << offset;
  }
  std::vector<uint8_t> corrupted = blob;
  corrupted.back() ^= 0x80;
  EXPECT_CONTAINS(decode_outcome(corrupted), "checksum mismatch");
}

std::vector<uint8_t> blob_with_payload(std::span<const uint8_t> payload) {
  std::vector<uint8_t> blob(kHeaderSize + payload.size());
  std::ranges::copy(payload, blob.begin() + kHeaderSize);
  BlobHeader header;
  header.payload_size = payload.size();
  header.payload_crc32c = crc32c(payload);
  rewrite_header(blob, header);
  return blob;
}

TEST(DecodePayload, ChecksummedGarbageIsNotAnFdt) {
  std::vector<uint8_t> junk(256);
  std::mt19937_64 rng(5);
  for (uint8_t& byte : junk) byte = static_cast<uint8_t>(rng());
  EXPECT_CONTAINS(decode_outcome(blob_with_payload(junk)), "state blob payload is not a valid FDT");
  EXPECT_EQ(decode_outcome(blob_with_payload(std::span(junk).first(8))),
            "state blob payload (8 bytes) is too small to be an FDT");
  EXPECT_EQ(decode_outcome(blob_with_payload({})),
            "state blob payload (0 bytes) is too small to be an FDT");
}

TEST(DecodePayload, PayloadSizeMustMatchTheFdt) {
  const std::vector<uint8_t> blob = encoded(small_state());
  std::vector<uint8_t> payload(blob.begin() + kHeaderSize, blob.end());
  payload.resize(payload.size() + 8, 0);
  EXPECT_CONTAINS(decode_outcome(blob_with_payload(payload)), "but its FDT says");
}

TEST(DecodePayload, StructurallyBrokenFdtIsRefused) {
  const std::vector<uint8_t> blob = encoded(small_state());
  std::vector<uint8_t> payload(blob.begin() + kHeaderSize, blob.end());
  // Point the strings block past the end of the tree (fdt_header.off_dt_strings).
  const uint32_t bad_offset = static_cast<uint32_t>(payload.size()) + 64;
  const uint8_t be[] = {uint8_t(bad_offset >> 24), uint8_t(bad_offset >> 16),
                        uint8_t(bad_offset >> 8), uint8_t(bad_offset)};
  std::memcpy(payload.data() + 12, be, 4);
  const std::string outcome = decode_outcome(blob_with_payload(payload));
  EXPECT_TRUE(outcome.starts_with("state blob payload is not a valid FDT") ||
              outcome.starts_with("state blob FDT is malformed"))
      << outcome;
}

// Properties a 1.x reader accepts without: everything else is required.
// What 1.1 added is optional, so that 1.0 blobs still decode.
const std::set<std::string> kOptionalProperties = {"/compatible", "/metadata/program-version",
                                                   "/devices/uart@3f8/pending-input",
                                                   "/devices/uart@3f8/thr-interrupt-pending"};

TEST(DecodePayload, EveryRequiredPropertyIsRequired) {
  const std::vector<uint8_t> blob = encoded(full_state());
  EditableTree original(blob);
  const auto properties = all_properties(original.fdt());
  ASSERT_GT(properties.size(), 60u);
  for (const auto& [path, name] : properties) {
    const std::string full = (path == "/" ? "" : path) + "/" + name;
    SCOPED_TRACE(full);
    EditableTree tree(blob);
    tree.remove_property(path.c_str(), name.c_str());
    const std::string outcome = decode_outcome(tree.seal());
    if (kOptionalProperties.contains(full)) {
      EXPECT_EQ(outcome, "decoded");
    } else {
      EXPECT_EQ(outcome, "state blob: required property " + full + " is missing");
    }
  }
}

TEST(DecodePayload, OptionalPropertiesGetDefaults) {
  const SavedState state = full_state();
  EditableTree tree(encoded(state));
  tree.remove_property("/metadata", "program-version");
  tree.remove_property("/devices/uart@3f8", "pending-input");
  auto decoded = decode(tree.seal());
  ASSERT_TRUE(decoded.has_value()) << decoded.error().describe();
  EXPECT_EQ(decoded->metadata.program_version, "");
  EXPECT_TRUE(decoded->uart.pending_input.empty());
  SavedState expected = state;
  expected.metadata.program_version.clear();
  expected.uart.pending_input.clear();
  EXPECT_TRUE(*decoded == expected);
}

// A 1.0 blob has no thr-interrupt-pending: it counts as pending when the
// saved IIR says so or the THR-empty interrupt is enabled (a driver waiting
// for it); otherwise not.
TEST(DecodePayload, AbsentThrInterruptPendingDefaultsFromTheRegisters) {
  struct Case {
    uint8_t ier, iir;
    bool pending;
  };
  for (const Case c : {Case{0x00, 0x01, false}, Case{0x01, 0xc4, false}, Case{0x0d, 0xc1, false},
                       Case{0x02, 0xc1, true}, Case{0x00, 0xc2, true}}) {
    SCOPED_TRACE(testing::Message() << "ier " << int(c.ier) << " iir " << int(c.iir));
    SavedState state = full_state();
    state.uart.ier = c.ier;
    state.uart.iir = c.iir;
    state.uart.thr_interrupt_pending = !c.pending;
    EditableTree tree(encoded(state));
    tree.remove_property("/devices/uart@3f8", "thr-interrupt-pending");
    auto decoded = decode(tree.seal());
    ASSERT_TRUE(decoded.has_value()) << decoded.error().describe();
    EXPECT_EQ(decoded->uart.thr_interrupt_pending, c.pending);
  }
}

TEST(DecodePayload, ValuesBeyondTheFormatsLimitsAreRefused) {
  {
    EditableTree tree(encoded(full_state()));
    const std::vector<uint8_t> input(kMaxUartPendingInput + 1, 'x');
    tree.set_bytes("/devices/uart@3f8", "pending-input", input);
    EXPECT_EQ(decode_outcome(tree.seal()),
              "state blob: property /devices/uart@3f8/pending-input is 65 bytes, more than the 64 the format allows");
  }
  {
    EditableTree tree(encoded(full_state()));
    tree.set_string("/metadata", "vm-name", std::string(kMaxStringLength + 1, 'n').c_str());
    EXPECT_EQ(decode_outcome(tree.seal()),
              "state blob: property /metadata/vm-name is 1026 bytes, more than the 1025 the format allows");
  }
  {
    EditableTree tree(encoded(full_state()));
    const std::vector<uint8_t> msrs((kMaxMsrsPerVcpu + 1) * 16, 0);
    tree.set_bytes("/vcpus/vcpu@0", "msrs", msrs);
    EXPECT_EQ(decode_outcome(tree.seal()),
              "state blob: property /vcpus/vcpu@0/msrs is 4112 bytes, more than the 4096 the format allows");
  }
}

TEST(DecodePayload, EveryPropertyWithAnExtraByteIsRefused) {
  const std::vector<uint8_t> blob = encoded(full_state());
  EditableTree original(blob);
  const std::set<std::string> any_length = {"/compatible", "/devices/uart@3f8/pending-input"};
  for (const auto& [path, name] : all_properties(original.fdt())) {
    const std::string full = (path == "/" ? "" : path) + "/" + name;
    if (any_length.contains(full)) continue;
    SCOPED_TRACE(full);
    EditableTree tree(blob);
    std::vector<uint8_t> value = tree.property(path.c_str(), name.c_str());
    value.push_back(0);
    tree.set_bytes(path.c_str(), name.c_str(), value);
    const std::string outcome = decode_outcome(tree.seal());
    EXPECT_TRUE(outcome.starts_with("state blob: property " + full + " is ")) << outcome;
  }
}

TEST(DecodePayload, KernelStructOfTheWrongSizeIsRefused) {
  EditableTree tree(encoded(full_state()));
  std::vector<uint8_t> regs = tree.property("/vcpus/vcpu@2", "regs");
  regs.pop_back();
  tree.set_bytes("/vcpus/vcpu@2", "regs", regs);
  EXPECT_EQ(decode_outcome(tree.seal()),
            "state blob: property /vcpus/vcpu@2/regs is " + std::to_string(sizeof(kvm_regs) - 1) +
                " bytes, expected " + std::to_string(sizeof(kvm_regs)));
}

TEST(DecodePayload, IntegerOfTheWrongSizeIsRefused) {
  EditableTree tree(encoded(full_state()));
  tree.set_u32("/memory/region@1", "gpa", 1);  // a u64 written as one cell
  EXPECT_EQ(decode_outcome(tree.seal()),
            "state blob: property /memory/region@1/gpa is 4 bytes, expected 8");
}

TEST(DecodePayload, MsrArrayMustBeWholeRecords) {
  EditableTree tree(encoded(full_state()));
  std::vector<uint8_t> msrs = tree.property("/vcpus/vcpu@0", "msrs");
  ASSERT_EQ(msrs.size(), 12u * 16);
  msrs.erase(msrs.end() - 8, msrs.end());
  tree.set_bytes("/vcpus/vcpu@0", "msrs", msrs);
  EXPECT_CONTAINS(decode_outcome(tree.seal()),
                  "property /vcpus/vcpu@0/msrs is 184 bytes, not a multiple of its 16-byte records");
}

TEST(DecodePayload, MissingNodeIsRefused) {
  for (const char* path : {"/metadata", "/vm", "/vcpus", "/devices", "/devices/uart@3f8",
                           "/devices/test-guest", "/memory"}) {
    SCOPED_TRACE(path);
    EditableTree tree(encoded(full_state()));
    tree.remove_node(path);
    EXPECT_EQ(decode_outcome(tree.seal()), std::string("state blob: node ") + path + " is missing");
  }
}

TEST(DecodePayload, DuplicateVcpuIdsAreRefused) {
  EditableTree tree(encoded(full_state()));
  tree.set_u32("/vcpus/vcpu@1f", "id", 2);
  EXPECT_EQ(decode_outcome(tree.seal()), "state blob: vCPU id 2 appears more than once");
}

TEST(DecodePayload, ZeroVcpusAreRefused) {
  EditableTree tree(encoded(full_state()));
  for (const char* path : {"/vcpus/vcpu@0", "/vcpus/vcpu@2", "/vcpus/vcpu@1f"})
    tree.remove_node(path);
  EXPECT_EQ(decode_outcome(tree.seal()), "state blob: no vCPUs; a VM needs at least one");
}

TEST(DecodePayload, NoRamRegionIsRefused) {
  EditableTree tree(encoded(full_state()));
  tree.remove_node("/memory/region@0");
  tree.remove_node("/memory/region@1");
  EXPECT_EQ(decode_outcome(tree.seal()), "state blob: no RAM region; a VM needs at least one");
}

TEST(DecodePayload, UnknownEnumNamesAreRefused) {
  EditableTree tree(encoded(full_state()));
  tree.set_string("/memory/region@2", "backing", "pmem");
  EXPECT_EQ(decode_outcome(tree.seal()),
            "state blob: property /memory/region@2/backing has unknown value \"pmem\"");
}

TEST(DecodePayload, OutOfRangeValuesAreRefused) {
  {
    EditableTree tree(encoded(full_state()));
    tree.set_u32("/devices/uart@3f8", "lcr", 0x100);
    EXPECT_EQ(decode_outcome(tree.seal()),
              "state blob: property /devices/uart@3f8/lcr is 256, more than an 8-bit register holds");
  }
  {
    EditableTree tree(encoded(full_state()));
    tree.set_u32("/metadata", "was-running", 2);
    EXPECT_EQ(decode_outcome(tree.seal()),
              "state blob: property /metadata/was-running is 2, expected 0 or 1");
  }
  {
    EditableTree tree(encoded(full_state()));
    const uint8_t embedded_nul[] = {'a', 0, 'b', 0};
    tree.set_bytes("/metadata", "vm-name", embedded_nul);
    EXPECT_EQ(decode_outcome(tree.seal()),
              "state blob: property /metadata/vm-name is not a single NUL-terminated string");
  }
}

// ---- forward compatibility --------------------------------------------------

TEST(ForwardCompatibility, UnknownNodesAndPropertiesAreIgnored) {
  const SavedState state = full_state();
  EditableTree tree(encoded(state));
  void* fdt = tree.fdt();
  // What a 1.3 writer might add: new properties on known nodes, new nodes
  // at every level, including non-vcpu/non-region children of /vcpus, /memory.
  ASSERT_EQ(fdt_setprop_u64(fdt, tree.node("/"), "future-root-property", 42), 0);
  ASSERT_EQ(fdt_setprop_string(fdt, tree.node("/metadata"), "host-kernel", "6.99"), 0);
  ASSERT_EQ(fdt_setprop_u32(fdt, tree.node("/vcpus/vcpu@2"), "nested-state-size", 0), 0);
  ASSERT_EQ(fdt_setprop_u32(fdt, tree.node("/memory/region@0"), "numa-node", 1), 0);
  const int future = fdt_add_subnode(fdt, tree.node("/"), "iommu");
  ASSERT_GE(future, 0);
  ASSERT_EQ(fdt_setprop_u64(fdt, future, "page-table-root", 0x1000), 0);
  ASSERT_GE(fdt_add_subnode(fdt, future, "domain@0"), 0);
  ASSERT_GE(fdt_add_subnode(fdt, tree.node("/vcpus"), "hotplug-policy"), 0);
  ASSERT_GE(fdt_add_subnode(fdt, tree.node("/memory"), "balloon"), 0);
  ASSERT_GE(fdt_add_subnode(fdt, tree.node("/devices"), "virtio-blk@1000"), 0);
  ASSERT_GE(fdt_add_subnode(fdt, tree.node("/vcpus/vcpu@0"), "nested"), 0);
  const uint8_t version_1_3[] = {0, 0, 0, 1, 0, 0, 0, 3};
  tree.set_bytes("/", "format-version", version_1_3);
  BlobHeader header;
  header.format_minor = 3;

  auto decoded = decode(tree.seal(header));
  ASSERT_TRUE(decoded.has_value()) << decoded.error().describe();
  EXPECT_TRUE(*decoded == state);
}

// ---- describe ---------------------------------------------------------------

TEST(Describe, SummarizesTheState) {
  EXPECT_EQ(describe(full_state()),
            "vm \"demo-vm\" generation 7 (written by vmm 0.1.0-test), running: 3 vCPUs, memory "
            "ram0 guest_memfd 3072 MiB @0x0, ram1 guest_memfd 1024 MiB @0x100000000, shared "
            "memfd 16 MiB @0xd0000000");
  EXPECT_EQ(describe(small_state()),
            "vm \"small\" generation 0, paused: 1 vCPU, memory ram0 memfd 1 MiB @0x0");
}

// ---- mutations --------------------------------------------------------------

// Random damage must be refused cleanly (or, rarely, decode to a state that
// is itself consistent); never a crash, hang or sanitizer report. Odd
// iterations damage only the payload and fix up the checksum, so the damage
// reaches libfdt and the parser instead of stopping at the CRC.
TEST(Mutation, RandomDamageNeverCrashes) {
  const std::vector<uint8_t> blob = encoded(full_state());
  const BlobHeader header = header_of(blob);
  std::mt19937_64 rng(20240601);
  int decoded_count = 0;
  for (int iteration = 0; iteration < 4000; ++iteration) {
    std::vector<uint8_t> mutated = blob;
    const bool payload_only = iteration % 2 == 1;
    const int edits = 1 + static_cast<int>(rng() % 4);
    for (int edit = 0; edit < edits; ++edit) {
      // Bias towards the blob header, the FDT header and the start of the
      // structure block, where one byte changes the meaning of what follows.
      size_t offset;
      switch (rng() % 3) {
        case 0: offset = payload_only ? kHeaderSize + rng() % 40 : rng() % (kHeaderSize + 40); break;
        case 1: offset = kHeaderSize + rng() % std::min<size_t>(2048, header.payload_size); break;
        default: offset = (payload_only ? kHeaderSize : 0) + rng() % (mutated.size() - (payload_only ? kHeaderSize : 0)); break;
      }
      switch (rng() % 8) {
        case 0: case 1: case 2: mutated[offset] ^= static_cast<uint8_t>(1u << (rng() % 8)); break;
        case 3: case 4: mutated[offset] = static_cast<uint8_t>(rng()); break;
        case 5: case 6: mutated[offset] = (rng() % 2) ? 0x00 : 0xff; break;
        default:
          if (!payload_only) mutated.resize(std::max<size_t>(offset, 1));
          break;
      }
    }
    if (payload_only) {
      BlobHeader fixed = header;
      fixed.payload_crc32c = crc32c(std::span(mutated).subspan(kHeaderSize));
      rewrite_header(mutated, fixed);
    }
    auto decoded = decode(mutated);
    if (decoded) {
      ++decoded_count;
      // Whatever decodes is consistent and survives another round trip.
      auto again = encode(*decoded);
      ASSERT_TRUE(again.has_value()) << again.error().describe();
      auto redecoded = decode(*again);
      ASSERT_TRUE(redecoded.has_value());
      ASSERT_TRUE(*redecoded == *decoded);
    } else {
      ASSERT_FALSE(decoded.error().message.empty());
    }
  }
  RecordProperty("decoded", decoded_count);
}

}  // namespace
}  // namespace vmm::migration
