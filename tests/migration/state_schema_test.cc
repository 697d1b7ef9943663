// The state schema: its documentation, its size arithmetic, the comparison
// built on it, and compatibility with blobs and readers of format 1.0.
#include <gtest/gtest.h>
#include <libfdt.h>

#include <fstream>
#include <iterator>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "migration/state_blob.h"
#include "tests/migration/legacy/state_blob_1_0.h"
#include "tests/migration/sample_states.h"

namespace vmm::migration {
namespace {

std::string source_file(const std::string& relative) { return std::string(VMM_SOURCE_DIR) + "/" + relative; }

std::vector<uint8_t> read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  EXPECT_TRUE(in.good()) << "cannot open " << path;
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

std::vector<uint8_t> encoded(const SavedState& state) {
  auto blob = encode(state);
  EXPECT_TRUE(blob.has_value()) << blob.error().describe();
  return blob.value_or(std::vector<uint8_t>{});
}

// ---- compatibility with format 1.0 ---------------------------------------------

// tests/migration/data/state-1.0.bin was written by the 1.0 encoder from
// golden_state(); this version must restore what the deployed one saved.
TEST(Compatibility, ABlobWrittenByThe1_0EncoderDecodes) {
  const std::vector<uint8_t> blob = read_bytes(source_file("tests/migration/data/state-1.0.bin"));
  auto header = read_header(blob);
  ASSERT_TRUE(header.has_value()) << header.error().describe();
  EXPECT_EQ(header->format_major, 1);
  EXPECT_EQ(header->format_minor, 0);
  auto decoded = decode(blob);
  ASSERT_TRUE(decoded.has_value()) << decoded.error().describe();

  SavedState expected = golden_state();
  // 1.0 has no thr-interrupt-pending; the golden UART has the THR-empty
  // interrupt enabled (IER 0x03), so the default counts it as pending.
  expected.uart.thr_interrupt_pending = true;
  EXPECT_EQ(first_difference(*decoded, expected), std::nullopt);
  EXPECT_EQ(decoded->uart.pending_input, (std::vector<uint8_t>{'o', 'k', '\n'}));
  EXPECT_EQ(decoded->vcpus.at(0).msrs.size(), 4u);
}

TEST(Compatibility, TheFrozen1_0ReaderDecodesTheGoldenBlob) {
  // The frozen reader is the one that wrote (and read) the golden blob.
  auto decoded = legacy_1_0::decode(read_bytes(source_file("tests/migration/data/state-1.0.bin")));
  ASSERT_TRUE(decoded.has_value()) << decoded.error().describe();
  EXPECT_EQ(first_difference(*decoded, golden_state()), std::nullopt);
}

// An older vmm rolling back (or a kexec into an older one) reads a 1.1 blob:
// it must ignore the properties 1.1 added and get everything else.
TEST(Compatibility, TheFrozen1_0ReaderDecodesWhatThisVersionWrites) {
  for (uint64_t seed : {1, 2, 3}) {
    SCOPED_TRACE(seed);
    const SavedState state = full_state(seed);
    ASSERT_TRUE(state.uart.thr_interrupt_pending);
    const std::vector<uint8_t> blob = encoded(state);
    ASSERT_EQ(read_header(blob)->format_minor, 1);
    auto decoded = legacy_1_0::decode(blob);
    ASSERT_TRUE(decoded.has_value()) << decoded.error().describe();
    SavedState expected = state;
    expected.uart.thr_interrupt_pending = false;  // what 1.0 cannot know
    EXPECT_EQ(first_difference(*decoded, expected), std::nullopt);
  }
}

// ---- the documentation ---------------------------------------------------------

struct DocumentedProperty {
  std::string type, presence, since;
  bool operator==(const DocumentedProperty&) const = default;
};
using DocumentedNodes = std::map<std::string, std::map<std::string, DocumentedProperty>>;

std::string trimmed(std::string text) {
  std::erase(text, '`');
  const size_t first = text.find_first_not_of(" \t");
  if (first == std::string::npos) return "";
  return text.substr(first, text.find_last_not_of(" \t") - first + 1);
}

std::vector<std::string> cells(const std::string& row) {
  std::vector<std::string> out;
  std::stringstream stream(row.substr(1));  // after the leading '|'
  std::string cell;
  while (std::getline(stream, cell, '|')) out.push_back(trimmed(cell));
  return out;
}

// Every "### `/path`" heading of the "Nodes and properties" section, with the
// rows of the property table under it (property | type | presence | since |
// meaning).
DocumentedNodes documented_nodes(const std::string& markdown) {
  DocumentedNodes nodes;
  std::stringstream lines(markdown);
  std::string line, node;
  bool in_section = false;
  while (std::getline(lines, line)) {
    if (line.starts_with("## ")) {
      in_section = line == "## Nodes and properties";
      node.clear();
      continue;
    }
    if (!in_section) continue;
    if (line.starts_with("### `")) {
      node = trimmed(line.substr(4));
      EXPECT_FALSE(nodes.contains(node)) << node << " is documented twice";
      nodes[node];
      continue;
    }
    if (node.empty() || !line.starts_with("| `")) continue;
    const std::vector<std::string> row = cells(line);
    EXPECT_GE(row.size(), 5u) << line;
    if (row.size() < 5) continue;
    EXPECT_FALSE(nodes[node].contains(row[0])) << node << "/" << row[0] << " is documented twice";
    nodes[node][row[0]] = {row[1], row[2], row[3]};
  }
  return nodes;
}

TEST(Schema, MatchesTheDocumentation) {
  const std::vector<uint8_t> bytes = read_bytes(source_file("docs/state-format.md"));
  const DocumentedNodes documented = documented_nodes(std::string(bytes.begin(), bytes.end()));
  ASSERT_FALSE(documented.empty()) << "no \"### `/path`\" nodes under \"## Nodes and properties\"";

  DocumentedNodes in_code;
  for (const SchemaNode& node : state_schema()) {
    auto& properties = in_code[node.path];
    for (const SchemaProperty& property : node.properties)
      properties[std::string(property.name)] = {
          std::string(property.type), property.presence == Presence::required ? "required" : "optional",
          "1." + std::to_string(property.since_minor)};
  }

  for (const auto& [node, properties] : in_code) {
    SCOPED_TRACE(node);
    auto found = documented.find(node);
    if (found == documented.end()) {
      ADD_FAILURE() << "node " << node << " is not documented in docs/state-format.md";
      continue;
    }
    for (const auto& [name, property] : properties) {
      auto doc = found->second.find(name);
      if (doc == found->second.end()) {
        ADD_FAILURE() << node << " property " << name << " is not documented";
        continue;
      }
      EXPECT_EQ(doc->second.type, property.type) << name;
      EXPECT_EQ(doc->second.presence, property.presence) << name;
      EXPECT_EQ(doc->second.since, property.since) << name;
    }
    for (const auto& [name, property] : found->second)
      EXPECT_TRUE(properties.contains(name)) << node << " property " << name << " is documented but not in the schema";
  }
  for (const auto& [node, properties] : documented)
    EXPECT_TRUE(in_code.contains(node)) << "node " << node << " is documented but not in the schema";
}

// What the writer puts in the tree is what the schema lists, no more.
TEST(Schema, TheWriterWritesExactlyTheSchema) {
  const std::vector<uint8_t> blob = encoded(full_state());
  std::vector<uint64_t> aligned((blob.size() - kHeaderSize + 7) / 8);
  std::memcpy(aligned.data(), blob.data() + kHeaderSize, blob.size() - kHeaderSize);
  const void* fdt = aligned.data();

  std::map<std::string, std::vector<std::string>> written;  // node (instance names generalized) -> properties
  for (int node = 0; node >= 0; node = fdt_next_node(fdt, node, nullptr)) {
    char path_buffer[256];
    ASSERT_EQ(fdt_get_path(fdt, node, path_buffer, sizeof(path_buffer)), 0);
    std::string path = path_buffer;
    for (const auto& [prefix, doc] : {std::pair{"/vcpus/vcpu@", "<id>"}, std::pair{"/memory/region@", "<index>"}})
      if (path.starts_with(prefix)) path = std::string(prefix) + doc;
    auto& names = written[path];
    int property = 0;
    std::vector<std::string> these;
    fdt_for_each_property_offset(property, fdt, node) {
      const char* name = nullptr;
      fdt_getprop_by_offset(fdt, property, &name, nullptr);
      these.push_back(name);
    }
    names = these;  // every instance of a repeated node has the same list
  }
  std::map<std::string, std::vector<std::string>> schema;
  for (const SchemaNode& node : state_schema()) {
    auto& names = schema[node.path];
    for (const SchemaProperty& property : node.properties) names.emplace_back(property.name);
  }
  EXPECT_EQ(written, schema);
}

// ---- sizes -------------------------------------------------------------------

// A state of random shape: vCPU and region counts, MSR and CPUID counts,
// string lengths, pending input.
SavedState random_shape(std::mt19937_64& rng) {
  SavedState state = full_state(rng());
  state.metadata.vm_name = std::string(1 + rng() % 100, 'v');
  state.metadata.program_version = std::string(rng() % 20, 'p');
  state.vcpus.clear();
  const size_t vcpus = 1 + rng() % 9;
  for (size_t i = 0; i < vcpus; ++i)
    state.vcpus.push_back(random_vcpu(static_cast<uint32_t>(i * (rng() % 5000 + 1)), rng() % 40, rng() % 80, rng));
  const size_t regions = 1 + rng() % 20;
  state.memory.resize(regions);
  for (size_t i = 0; i < regions; ++i) {
    state.memory[i].spec.name = "r" + std::to_string(i) + std::string(rng() % 9, 'x');
    state.memory[i].spec.slot = static_cast<uint32_t>(i);
  }
  state.uart.pending_input.assign(rng() % (kMaxUartPendingInput + 1), 'i');
  return state;
}

TEST(Schema, EncodedSizeIsExact) {
  std::mt19937_64 rng(77);
  for (int i = 0; i < 200; ++i) {
    const SavedState state = random_shape(rng);
    auto size = encoded_size(state);
    ASSERT_TRUE(size.has_value()) << size.error().describe();
    ASSERT_EQ(*size, encoded(state).size()) << "iteration " << i;
  }
  EXPECT_EQ(*encoded_size(small_state()), encoded(small_state()).size());
}

// Every variable-length value at the format's limit, vCPU ids with the most
// hex digits: the largest state with this many vCPUs and regions.
SavedState largest_state(size_t vcpus, size_t regions) {
  std::mt19937_64 rng(9);
  SavedState state = full_state();
  state.metadata.vm_name = std::string(kMaxStringLength, 'n');
  state.metadata.program_version = std::string(kMaxStringLength, 'p');
  state.vcpus.clear();
  for (size_t i = 0; i < vcpus; ++i)
    state.vcpus.push_back(random_vcpu(0xffff'ffffu - static_cast<uint32_t>(i), kMaxMsrsPerVcpu, kMaxCpuidEntries, rng));
  state.memory.resize(regions);
  for (size_t i = 0; i < regions; ++i) {
    state.memory[i].spec.name = std::string(kMaxStringLength - 4, 'r') + std::to_string(1000 + i);
    state.memory[i].spec.slot = static_cast<uint32_t>(i);
    state.memory[i].spec.backing = memory::Backing::guest_memfd;
    state.memory[i].slot_kind = SlotKind::guest_memfd;
  }
  state.uart.pending_input.assign(kMaxUartPendingInput, 0xee);
  return state;
}

TEST(Schema, MaxEncodedSizeBoundsTheLargestState) {
  for (const auto& [vcpus, regions] : {std::pair<size_t, size_t>{1, 1}, {2, 3}, {8, 2}, {64, 4}}) {
    SCOPED_TRACE(std::to_string(vcpus) + " vCPUs, " + std::to_string(regions) + " regions");
    const uint64_t bound = max_encoded_size(vcpus, regions);
    const size_t largest = encoded(largest_state(vcpus, regions)).size();
    EXPECT_LE(largest, bound);
    // Tight: the bound only allows for longer enum names (32 bytes each),
    // region indexes of 16 hex digits and a longer "compatible".
    EXPECT_LE(bound - largest, regions * 80 + 64) << "bound " << bound << ", largest " << largest;
    // And a pre-sized memfd of that size takes it.
    std::vector<uint64_t> memfd(bound / 8 + 1);
    auto written = encode_into(largest_state(vcpus, regions), {reinterpret_cast<uint8_t*>(memfd.data()), bound});
    EXPECT_TRUE(written.has_value()) << written.error().describe();
  }
  EXPECT_LT(max_encoded_size(2, 2), max_encoded_size(3, 2));
  EXPECT_LT(max_encoded_size(2, 2), max_encoded_size(2, 3));
}

TEST(Schema, EncodeRefusesValuesBeyondTheFormatsLimits) {
  struct Case {
    const char* what;
    void (*grow)(SavedState&);
    const char* message;
  };
  const Case cases[] = {
      {"vm name", [](SavedState& s) { s.metadata.vm_name.assign(kMaxStringLength + 1, 'n'); },
       "cannot encode state: property /metadata/vm-name is 1026 bytes, more than the 1025 the format allows"},
      {"MSRs", [](SavedState& s) { s.vcpus[1].msrs.resize(kMaxMsrsPerVcpu + 1); },
       "cannot encode state: property /vcpus/vcpu@2/msrs is 4112 bytes, more than the 4096 the format allows"},
      {"CPUID", [](SavedState& s) { s.vcpus[0].cpuid.resize(kMaxCpuidEntries + 1); },
       "cannot encode state: property /vcpus/vcpu@0/cpuid is 10280 bytes, more than the 10240 the format allows"},
      {"UART input", [](SavedState& s) { s.uart.pending_input.resize(kMaxUartPendingInput + 1); },
       "cannot encode state: property /devices/uart@3f8/pending-input is 65 bytes, more than the 64 the format "
       "allows"},
      {"region name", [](SavedState& s) { s.memory[2].spec.name.assign(kMaxStringLength + 1, 's'); },
       "cannot encode state: property /memory/region@2/name is 1026 bytes, more than the 1025 the format allows"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    SavedState state = full_state();
    c.grow(state);
    auto blob = encode(state);
    ASSERT_FALSE(blob.has_value());
    EXPECT_EQ(blob.error().message, c.message);
    std::vector<uint8_t> dest(1 << 20);
    auto written = encode_into(state, dest);
    ASSERT_FALSE(written.has_value());
    EXPECT_EQ(written.error().message, c.message);
    EXPECT_EQ(encoded_size(state).error().message, c.message);
  }
}

// ---- comparison ------------------------------------------------------------------

TEST(Schema, FirstDifferenceNamesThePropertyPath) {
  const SavedState state = full_state();
  EXPECT_EQ(first_difference(state, state), std::nullopt);
  struct Case {
    void (*change)(SavedState&);
    const char* path;
  };
  const Case cases[] = {
      {[](SavedState& s) { reinterpret_cast<uint8_t*>(&s.vcpus[1].xsave)[4000] ^= 1; }, "/vcpus/vcpu@2/xsave"},
      {[](SavedState& s) { s.vcpus.pop_back(); }, "/vcpus"},
      {[](SavedState& s) { s.vcpus[2].id = 30; }, "/vcpus/vcpu@1f"},
      {[](SavedState& s) { s.uart.thr_interrupt_pending = false; }, "/devices/uart@3f8/thr-interrupt-pending"},
      {[](SavedState& s) { s.uart.pending_input.pop_back(); }, "/devices/uart@3f8/pending-input"},
      {[](SavedState& s) { s.test_device.last_result.mismatches = 9; }, "/devices/test-guest/last-mismatches"},
      {[](SavedState& s) { s.memory[1].spec.backing = memory::Backing::memfd; }, "/memory/region@1/backing"},
      {[](SavedState& s) { s.metadata.was_running = false; }, "/metadata/was-running"},
      {[](SavedState& s) { reinterpret_cast<uint8_t*>(&s.vm.pit)[3] ^= 0x40; }, "/vm/pit"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.path);
    SavedState changed = state;
    c.change(changed);
    EXPECT_EQ(first_difference(state, changed), std::optional<std::string>(c.path));
    EXPECT_FALSE(state == changed);
  }
}

}  // namespace
}  // namespace vmm::migration
