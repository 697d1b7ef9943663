// The exec handover manifest: round trip and the corruptions it must refuse.
#include <gtest/gtest.h>

#include <cstring>
#include <vector>

#include "luo/manifest.h"

namespace vmm::luo::manifest {
namespace {

Manifest sample() {
  Manifest m;
  m.sessions.push_back({"vmm", {{0x1, 10, FileKind::kvm_vm, 0, 0, 1, 2},
                                {0x2, 11, FileKind::guest_memfd, 0x1, 1 << 20, 3, 4},
                                {0x3, 12, FileKind::memfd, 0, 4096, 5, 6}}});
  m.sessions.push_back({"empty", {}});
  m.sessions.push_back({"second", {{0x1, 13, FileKind::memfd, 0, 8192, 7, 8}}});
  return m;
}

// Re-seals a modified manifest so only the intended defect remains.
void fix_checksum(std::vector<uint8_t>& bytes) {
  Header header{};
  std::memcpy(&header, bytes.data(), sizeof(header));
  header.checksum = checksum(std::span<const uint8_t>(bytes).subspan(sizeof(Header)));
  std::memcpy(bytes.data(), &header, sizeof(header));
}

std::vector<uint8_t> with_entry(size_t index, auto&& edit) {
  auto bytes = encode(sample());
  const size_t offset = sizeof(Header) + 3 * sizeof(SessionRecord) + index * sizeof(EntryRecord);
  EntryRecord entry{};
  std::memcpy(&entry, bytes.data() + offset, sizeof(entry));
  edit(entry);
  std::memcpy(bytes.data() + offset, &entry, sizeof(entry));
  fix_checksum(bytes);
  return bytes;
}

void expect_corrupt(const std::vector<uint8_t>& bytes, const std::string& words, int code = EINVAL) {
  auto decoded = decode(bytes);
  ASSERT_FALSE(decoded);
  EXPECT_EQ(decoded.error().code, code);
  EXPECT_NE(decoded.error().message.find(words), std::string::npos) << decoded.error().message;
}

TEST(LuoManifest, RoundTrips) {
  const auto bytes = encode(sample());
  EXPECT_EQ(bytes.size(), sizeof(Header) + 3 * sizeof(SessionRecord) + 4 * sizeof(EntryRecord));
  auto decoded = decode(bytes);
  ASSERT_TRUE(decoded) << decoded.error().describe();
  ASSERT_EQ(decoded->sessions.size(), 3u);
  EXPECT_EQ(decoded->sessions[0].name, "vmm");
  ASSERT_EQ(decoded->sessions[0].entries.size(), 3u);
  const auto& gmem = decoded->sessions[0].entries[1];
  EXPECT_EQ(gmem.token, 0x2u);
  EXPECT_EQ(gmem.fd, 11);
  EXPECT_EQ(gmem.kind, FileKind::guest_memfd);
  EXPECT_EQ(gmem.vm_token, 0x1u);
  EXPECT_EQ(gmem.size, 1u << 20);
  EXPECT_EQ(gmem.dev, 3u);
  EXPECT_EQ(gmem.ino, 4u);
  EXPECT_TRUE(decoded->sessions[1].entries.empty());
  EXPECT_EQ(decoded->sessions[2].entries[0].fd, 13);
}

TEST(LuoManifest, EmptyManifestIsValid) {
  auto decoded = decode(encode(Manifest{}));
  ASSERT_TRUE(decoded);
  EXPECT_TRUE(decoded->sessions.empty());
}

TEST(LuoManifest, RefusesWrongMagicVersionAndSize) {
  auto bytes = encode(sample());
  expect_corrupt(std::vector<uint8_t>(bytes.begin(), bytes.begin() + 10), "shorter than its");

  auto bad_magic = bytes;
  bad_magic[0] = 'X';
  expect_corrupt(bad_magic, "bad magic");

  auto bad_version = bytes;
  Header header{};
  std::memcpy(&header, bad_version.data(), sizeof(header));
  header.version = kVersion + 1;
  std::memcpy(bad_version.data(), &header, sizeof(header));
  expect_corrupt(bad_version, "version", EPROTO);

  auto truncated = bytes;
  truncated.pop_back();
  expect_corrupt(truncated, "size");

  auto longer = bytes;
  longer.push_back(0);
  expect_corrupt(longer, "size");
}

TEST(LuoManifest, RefusesChecksumMismatch) {
  auto bytes = encode(sample());
  bytes.back() ^= 0xFF;
  expect_corrupt(bytes, "checksum");
}

TEST(LuoManifest, RefusesBadEntries) {
  expect_corrupt(with_entry(2, [](EntryRecord& e) { e.kind = 99; }), "unknown kind");
  expect_corrupt(with_entry(2, [](EntryRecord& e) { e.fd = 1; }), "claims fd 1");
  expect_corrupt(with_entry(2, [](EntryRecord& e) { e.token = 0x1; }), "appears twice");
  expect_corrupt(with_entry(3, [](EntryRecord& e) { e.fd = 10; }), "claimed twice");
  expect_corrupt(with_entry(1, [](EntryRecord& e) { e.vm_token = 0x3; }), "not a KVM VM");
}

TEST(LuoManifest, RefusesUnterminatedOrDuplicateSessionNames) {
  auto bytes = encode(sample());
  SessionRecord record{};
  std::memcpy(&record, bytes.data() + sizeof(Header), sizeof(record));
  std::memset(record.name, 'a', sizeof(record.name));
  std::memcpy(bytes.data() + sizeof(Header), &record, sizeof(record));
  fix_checksum(bytes);
  expect_corrupt(bytes, "NUL-terminated");

  Manifest twice;
  twice.sessions.push_back({"same", {}});
  twice.sessions.push_back({"same", {}});
  expect_corrupt(encode(twice), "appears twice");
}

}  // namespace
}  // namespace vmm::luo::manifest
