// The exec backend's handover record: what the old vmm preserved, written into
// a sealed memfd whose number the new vmm receives on its command line
// (--luo-manifest-fd N). It plays the part of the KHO-serialized session list
// in a kernel live update.
//
// Layout (host byte order: both processes run on the same machine):
//   Header        40 bytes  magic "VMM-LUO\0", version, header size, session
//                           and entry counts, total size, FNV-1a 64 checksum
//                           of everything after the header
//   SessionRecord 72 bytes  each: name[64] (NUL-terminated), first entry,
//                           entry count
//   EntryRecord   48 bytes  each: token, fd number in the new process, kind,
//                           vm_token (guest_memfd: its VM's token), size, and
//                           st_dev/st_ino to check the fd really is that file
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "base/result.h"
#include "luo/file_kind.h"
#include "luo/uapi.h"

namespace vmm::luo::manifest {

inline constexpr char kMagic[8] = {'V', 'M', 'M', '-', 'L', 'U', 'O', '\0'};
inline constexpr uint32_t kVersion = 1;

struct Header {
  char magic[8];
  uint32_t version;
  uint32_t header_size;
  uint32_t session_count;
  uint32_t entry_count;
  uint64_t total_size;
  uint64_t checksum;
};

struct SessionRecord {
  char name[uapi::kSessionNameLength];
  uint32_t first_entry;
  uint32_t entry_count;
};

struct EntryRecord {
  uint64_t token;
  int32_t fd;
  uint32_t kind;  // FileKind
  uint64_t vm_token;
  uint64_t size;
  uint64_t dev;
  uint64_t ino;
};

static_assert(sizeof(Header) == 40);
static_assert(sizeof(SessionRecord) == 72);
static_assert(sizeof(EntryRecord) == 48);

struct Entry {
  uint64_t token = 0;
  int fd = -1;
  FileKind kind = FileKind::other;
  uint64_t vm_token = 0;
  uint64_t size = 0;
  uint64_t dev = 0;
  uint64_t ino = 0;
};

struct SessionEntries {
  std::string name;
  std::vector<Entry> entries;
};

struct Manifest {
  std::vector<SessionEntries> sessions;
};

[[nodiscard]] std::vector<uint8_t> encode(const Manifest& manifest);

// Checks everything that can be checked without looking at the fds: magic,
// version, sizes, checksum, names, kinds, unique tokens and fds, and that each
// guest_memfd's vm_token names a KVM VM in the same session. EINVAL (EPROTO
// for a version mismatch) with what is wrong.
[[nodiscard]] Result<Manifest> decode(std::span<const uint8_t> bytes);

[[nodiscard]] uint64_t checksum(std::span<const uint8_t> bytes);

}  // namespace vmm::luo::manifest
