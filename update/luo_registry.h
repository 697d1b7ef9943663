// The LUO agent's registry: which VMs to bring back after a kexec, and how.
//
// After a kexec nothing survives but what LUO preserved, and the kernel has
// no call that lists the incoming sessions. So before the kexec the agent
// writes every outgoing session it holds (its name and the arguments its
// `vmm restore` needs) into a memfd, preserves it in a session of its own
// (kRegistrySessionName), and the agent of the next kernel reads it back
// (docs/luo-agent.md, "The registry").
//
// The format, little-endian, as the state blob's (migration/state_blob.h):
//    0  u8[8] magic "VMMLUORG"
//    8  u16   major      a reader refuses another major version
//   10  u16   minor      added optional fields; a reader ignores what it does not know
//   12  u32   header_size  offset of the payload (a newer minor may write a longer header)
//   16  u64   payload_size bytes of JSON after the header
//   24  u32   payload_crc32c CRC32C of the payload
//   28  u32   flags      none in 1.x; readers ignore unknown bits
//   32  ...   payload: {"sessions": [{"name": N, "restore_args": [...]}...], "sealed_at_ns": T, "agent_pid": P}
#pragma once

#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/result.h"

namespace vmm {

inline constexpr const char* kRegistrySessionName = "vmm-luo-agent-registry";
inline constexpr uint64_t kRegistryToken = 1;
inline constexpr char kRegistryMagic[8] = {'V', 'M', 'M', 'L', 'U', 'O', 'R', 'G'};
inline constexpr uint16_t kRegistryMajor = 1;
inline constexpr uint16_t kRegistryMinor = 0;
inline constexpr uint32_t kRegistryHeaderSize = 32;
// The agent holds at most this many sessions' worth: 64 clients, each a
// request line of at most 4096 bytes; 1 MiB is far above that and still
// small enough to read whole.
inline constexpr size_t kMaxRegistryBytes = 1 << 20;

// Bounds on a session's restore arguments (the create-session request line
// holds 4096 bytes anyway).
inline constexpr size_t kMaxRestoreArgs = 64;
inline constexpr size_t kMaxRestoreArgBytes = 1024;

struct RegistryEntry {
  std::string name;
  std::vector<std::string> restore_args;
  friend bool operator==(const RegistryEntry&, const RegistryEntry&) = default;
};

struct Registry {
  uint16_t major = kRegistryMajor;
  uint16_t minor = kRegistryMinor;
  std::vector<RegistryEntry> entries;
  int64_t sealed_at_ns = 0;  // Unix time
  pid_t agent_pid = 0;       // the agent that sealed it
};

// The arguments `vmm restore` gets besides --session and --luo-agent (which
// the agent fills in): a JSON array of at most kMaxRestoreArgs strings of at
// most kMaxRestoreArgBytes, without NUL, and neither --session nor
// --luo-agent among them. EINVAL naming what is wrong.
[[nodiscard]] Result<std::vector<std::string>> parse_restore_args(const nlohmann::json& args);

[[nodiscard]] std::vector<uint8_t> encode_registry(const Registry& registry);
// Checks everything before trusting any of it: magic, major version, sizes,
// checksum, then the payload (names valid and unique, arguments as above).
// EPROTO with what is wrong and that nothing is restored from it.
[[nodiscard]] Result<Registry> decode_registry(std::span<const uint8_t> bytes);

}  // namespace vmm
