#include "luo/manifest.h"

#include <algorithm>
#include <cstring>
#include <fmt/format.h>
#include <set>

#include "luo/session.h"

namespace vmm::luo::manifest {

namespace {

// Far above anything real; keeps the size arithmetic below from overflowing.
constexpr uint32_t kMaxSessions = 4096;

std::unexpected<Error> corrupt(const std::string& what) {
  return fail(fmt::format("LUO exec manifest is corrupt: {}; the old vmm and this one disagree on "
                          "the handover (restart the guest from a snapshot instead)",
                          what),
              EINVAL);
}

bool valid_kind(uint32_t kind) {
  return kind == static_cast<uint32_t>(FileKind::memfd) ||
         kind == static_cast<uint32_t>(FileKind::guest_memfd) ||
         kind == static_cast<uint32_t>(FileKind::kvm_vm);
}

}  // namespace

uint64_t checksum(std::span<const uint8_t> bytes) {
  uint64_t hash = 0xcbf29ce484222325ULL;  // FNV-1a 64
  for (uint8_t b : bytes) {
    hash ^= b;
    hash *= 0x100000001b3ULL;
  }
  return hash;
}

std::vector<uint8_t> encode(const Manifest& manifest) {
  size_t entry_count = 0;
  for (const auto& s : manifest.sessions) entry_count += s.entries.size();
  const size_t total = sizeof(Header) + manifest.sessions.size() * sizeof(SessionRecord) +
                       entry_count * sizeof(EntryRecord);
  std::vector<uint8_t> out(total, 0);

  size_t offset = sizeof(Header);
  uint32_t next_entry = 0;
  for (const auto& s : manifest.sessions) {
    SessionRecord rec{};
    std::memcpy(rec.name, s.name.data(), std::min(s.name.size(), sizeof(rec.name) - 1));
    rec.first_entry = next_entry;
    rec.entry_count = static_cast<uint32_t>(s.entries.size());
    next_entry += rec.entry_count;
    std::memcpy(out.data() + offset, &rec, sizeof(rec));
    offset += sizeof(rec);
  }
  for (const auto& s : manifest.sessions) {
    for (const auto& e : s.entries) {
      EntryRecord rec{};
      rec.token = e.token;
      rec.fd = e.fd;
      rec.kind = static_cast<uint32_t>(e.kind);
      rec.vm_token = e.vm_token;
      rec.size = e.size;
      rec.dev = e.dev;
      rec.ino = e.ino;
      std::memcpy(out.data() + offset, &rec, sizeof(rec));
      offset += sizeof(rec);
    }
  }

  Header header{};
  std::memcpy(header.magic, kMagic, sizeof(kMagic));
  header.version = kVersion;
  header.header_size = sizeof(Header);
  header.session_count = static_cast<uint32_t>(manifest.sessions.size());
  header.entry_count = static_cast<uint32_t>(entry_count);
  header.total_size = total;
  header.checksum = checksum(std::span<const uint8_t>(out).subspan(sizeof(Header)));
  std::memcpy(out.data(), &header, sizeof(header));
  return out;
}

Result<Manifest> decode(std::span<const uint8_t> bytes) {
  if (bytes.size() < sizeof(Header)) {
    return corrupt(fmt::format("{} bytes, shorter than its {}-byte header", bytes.size(), sizeof(Header)));
  }
  Header header{};
  std::memcpy(&header, bytes.data(), sizeof(header));
  if (std::memcmp(header.magic, kMagic, sizeof(kMagic)) != 0) {
    return corrupt("bad magic (is the --luo-manifest-fd number right?)");
  }
  if (header.version != kVersion) {
    return fail(fmt::format("LUO exec manifest version {} is not the version {} this vmm reads: upgrade "
                            "between binaries that share the handover format",
                            header.version, kVersion),
                EPROTO);
  }
  if (header.header_size != sizeof(Header)) {
    return corrupt(fmt::format("header size {} (expected {})", header.header_size, sizeof(Header)));
  }
  if (header.session_count > kMaxSessions ||
      header.entry_count > static_cast<uint64_t>(kMaxSessions) * kMaxFilesPerSession) {
    return corrupt(fmt::format("{} sessions with {} files", header.session_count, header.entry_count));
  }
  const uint64_t expected = sizeof(Header) + uint64_t{header.session_count} * sizeof(SessionRecord) +
                            uint64_t{header.entry_count} * sizeof(EntryRecord);
  if (header.total_size != expected || bytes.size() != expected) {
    return corrupt(fmt::format("size {} (header says {}, counts imply {})", bytes.size(), header.total_size,
                               expected));
  }
  if (checksum(bytes.subspan(sizeof(Header))) != header.checksum) return corrupt("checksum mismatch");

  Manifest manifest;
  std::set<std::string> names;
  std::set<int> fds;
  uint32_t next_entry = 0;
  const uint8_t* entries_base =
      bytes.data() + sizeof(Header) + size_t{header.session_count} * sizeof(SessionRecord);
  for (uint32_t i = 0; i < header.session_count; ++i) {
    SessionRecord rec{};
    std::memcpy(&rec, bytes.data() + sizeof(Header) + size_t{i} * sizeof(SessionRecord), sizeof(rec));
    const size_t len = strnlen(rec.name, sizeof(rec.name));
    if (len == sizeof(rec.name)) return corrupt(fmt::format("session {} has no NUL-terminated name", i));
    std::string name(rec.name, len);
    if (auto ok = validate_session_name(name); !ok) return corrupt(ok.error().message);
    if (!names.insert(name).second) return corrupt(fmt::format("session '{}' appears twice", name));
    if (rec.first_entry != next_entry || rec.entry_count > kMaxFilesPerSession ||
        uint64_t{rec.first_entry} + rec.entry_count > header.entry_count) {
      return corrupt(fmt::format("session '{}' claims entries {}+{}", name, rec.first_entry, rec.entry_count));
    }
    next_entry += rec.entry_count;

    SessionEntries session{std::move(name), {}};
    std::set<uint64_t> tokens;
    for (uint32_t j = 0; j < rec.entry_count; ++j) {
      EntryRecord er{};
      std::memcpy(&er, entries_base + size_t{rec.first_entry + j} * sizeof(EntryRecord), sizeof(er));
      if (!valid_kind(er.kind)) {
        return corrupt(fmt::format("token {:#x} in session '{}' has unknown kind {}", er.token, session.name,
                                   er.kind));
      }
      if (er.fd < 3) {
        return corrupt(fmt::format("token {:#x} in session '{}' claims fd {}", er.token, session.name, er.fd));
      }
      if (!tokens.insert(er.token).second) {
        return corrupt(fmt::format("token {:#x} appears twice in session '{}'", er.token, session.name));
      }
      if (!fds.insert(er.fd).second) return corrupt(fmt::format("fd {} is claimed twice", er.fd));
      session.entries.push_back(Entry{er.token, er.fd, static_cast<FileKind>(er.kind), er.vm_token, er.size,
                                      er.dev, er.ino});
    }
    for (const auto& e : session.entries) {
      if (e.kind != FileKind::guest_memfd) continue;
      const bool vm_found = std::ranges::any_of(session.entries, [&](const Entry& other) {
        return other.kind == FileKind::kvm_vm && other.token == e.vm_token;
      });
      if (!vm_found) {
        return corrupt(fmt::format("guest_memfd token {:#x} in session '{}' names VM token {:#x}, which is "
                                   "not a KVM VM of that session",
                                   e.token, session.name, e.vm_token));
      }
    }
    manifest.sessions.push_back(std::move(session));
  }
  if (next_entry != header.entry_count) {
    return corrupt(fmt::format("{} entries, sessions account for {}", header.entry_count, next_entry));
  }
  return manifest;
}

}  // namespace vmm::luo::manifest
