// The handover record: everything the new vmm needs besides the LUO session
// and the saved state, encoded once, in one versioned format, for every mode.
//
//   exec      a sealed memfd; the new process gets `vmm restore --handover-fd N`
//   kexec     the same memfd, preserved in the LUO session under kRecordToken
//   transfer  the body of the channel's "state" message
//
// Layout (little-endian):
//    0  u8[8]  magic "VMMHANDO"
//    8  u16    major version (a reader refuses a major it does not know)
//   10  u16    minor version (a reader takes any minor of its major)
//   12  u32    header size (this version writes 32; a reader skips the rest)
//   16  u32    descriptor count D
//   20  u32    body size
//   24  u32    CRC32C of the descriptor table and the body
//   28  u32    reserved (0)
//   32  i32[D] descriptor table: exec's fd numbers (-1: none); in transfer
//              the descriptors travel as SCM_RIGHTS and the table is empty
//   ..  body   JSON, an object: unknown fields are ignored
//
// Frozen in every version, so a binary that cannot read the rest can still
// roll back: the magic, the offsets of the header size and the descriptor
// count, and descriptor 0, the previous vmm binary (an open O_PATH/O_RDONLY
// file that fexecve can run).
//
// The body refers to descriptors by their position in the handover's list:
// the table above (exec) or the message's descriptors (transfer).
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/result.h"
#include "base/unique_fd.h"
#include "update/faults.h"
#include "update/record.h"

namespace vmm {

inline constexpr std::array<uint8_t, 8> kHandoverMagic = {'V', 'M', 'M', 'H', 'A', 'N', 'D', 'O'};
inline constexpr uint16_t kHandoverMajor = 1;
inline constexpr uint16_t kHandoverMinor = 0;
inline constexpr uint32_t kHandoverHeaderSize = 32;
// A record is small (a few KiB); anything past this is not one of ours.
inline constexpr uint32_t kMaxHandoverBytes = 16u << 20;
inline constexpr uint32_t kMaxHandoverFds = 64;
// Descriptor 0 is always the previous binary (see the layout above).
inline constexpr size_t kRollbackBinarySlot = 0;

// How the vmm that runs the VM was started (the new process starts the same way).
struct LaunchOptions {
  std::string control_socket_path;  // empty: none
  std::string console = "stdout";
  std::string log_level = "info";
  std::string kvm_device = "/dev/kvm";
  // What SIGTERM does: "stop" the VM with the vmm, or put it into the
  // service's "fd-store" (update/fd_store.h) for the next start to restore.
  std::string on_sigterm = "stop";
};

struct HandoverRecord {
  std::string mode;                       // exec | kexec | transfer | fdstore
  std::string session;                    // the LUO session's name (exec, kexec)
  LaunchOptions launch;
  std::optional<size_t> luo_manifest;     // exec: the manifest's descriptor
  std::optional<size_t> listening_socket; // the control socket's listening descriptor
  std::optional<size_t> connection;       // the connection that asked for the update
  nlohmann::json reply_id;                // its request id (null: none)
  UpdateRecord record;                    // the update so far, with its clock readings
  std::string previous_failure;           // set when a rollback brings the VM back
  Fault fault = Fault::none;              // a test's fault for the new side (faults build only)
  size_t state_bytes = 0;                 // transfer: the state's size in the shared memfd
  // Exec: the descriptors by position (kRollbackBinarySlot first).
  std::vector<int> fds;
};

[[nodiscard]] std::vector<uint8_t> encode(const HandoverRecord& record);
[[nodiscard]] Result<HandoverRecord> decode_handover(std::span<const uint8_t> bytes);

// The frozen part only: descriptor 0 of a record whose body may be unreadable.
[[nodiscard]] std::optional<int> rollback_fd_of(std::span<const uint8_t> bytes);

// The record in a sealed memfd (exec and kexec); read back by the new process.
[[nodiscard]] Result<UniqueFd> write_handover_memfd(const HandoverRecord& record);
[[nodiscard]] Result<std::vector<uint8_t>> read_handover_memfd(FdRef fd);

}  // namespace vmm
