// The Live Update Orchestrator uAPI (include/uapi/linux/liveupdate.h) as
// merged in Linux 6.19, plus GET_NAME from 7.2 (REFERENCE.md section 1).
// Debian's headers predate it, so the definitions live here, in their own
// namespace, checked with static_asserts on sizes, offsets and ioctl numbers.
//
// Every ioctl is _IO(0xBA, nr): no size or direction bits. The size travels in
// each struct's leading `size` field instead; the kernel requires at least
// offsetofend(struct, last field), zero-fills what an older caller omits and
// rejects non-zero bytes beyond what it knows with E2BIG (copy_struct_from_user).
#pragma once

#include <linux/ioctl.h>
#include <sys/ioctl.h>

#include <cstddef>
#include <cstdint>

namespace vmm::luo::uapi {

inline constexpr unsigned kIoctlType = 0xBA;

// Including the terminating NUL (the v5 series said 56; 56 never shipped).
inline constexpr size_t kSessionNameLength = 64;

// Commands on /dev/liveupdate.
inline constexpr unsigned kCmdCreateSession = 0x00;
inline constexpr unsigned kCmdRetrieveSession = 0x01;
// Commands on a session fd.
inline constexpr unsigned kCmdSessionPreserveFd = 0x40;
inline constexpr unsigned kCmdSessionRetrieveFd = 0x41;
inline constexpr unsigned kCmdSessionFinish = 0x42;
inline constexpr unsigned kCmdSessionGetName = 0x43;  // Linux 7.2

// struct liveupdate_ioctl_create_session
struct CreateSession {
  uint32_t size;                     // in: sizeof(CreateSession)
  int32_t fd;                        // out: the new session fd (O_CLOEXEC)
  uint8_t name[kSessionNameLength];  // in: NUL-terminated
};

// struct liveupdate_ioctl_retrieve_session
struct RetrieveSession {
  uint32_t size;
  int32_t fd;  // out
  uint8_t name[kSessionNameLength];
};

// struct liveupdate_session_preserve_fd
struct SessionPreserveFd {
  uint32_t size;
  int32_t fd;                   // in: the file to preserve
  alignas(8) uint64_t token;    // in: __aligned_u64
};

// struct liveupdate_session_retrieve_fd
struct SessionRetrieveFd {
  uint32_t size;
  int32_t fd;                   // out: the retrieved file (O_CLOEXEC)
  alignas(8) uint64_t token;    // in
};

// struct liveupdate_session_finish
struct SessionFinish {
  uint32_t size;
  uint32_t reserved;  // must be 0
};

// struct liveupdate_session_get_name (Linux 7.2)
struct SessionGetName {
  uint32_t size;
  uint32_t reserved;                 // must be 0
  uint8_t name[kSessionNameLength];  // out
};

inline constexpr unsigned long kIoctlCreateSession = _IO(kIoctlType, kCmdCreateSession);
inline constexpr unsigned long kIoctlRetrieveSession = _IO(kIoctlType, kCmdRetrieveSession);
inline constexpr unsigned long kIoctlSessionPreserveFd = _IO(kIoctlType, kCmdSessionPreserveFd);
inline constexpr unsigned long kIoctlSessionRetrieveFd = _IO(kIoctlType, kCmdSessionRetrieveFd);
inline constexpr unsigned long kIoctlSessionFinish = _IO(kIoctlType, kCmdSessionFinish);
inline constexpr unsigned long kIoctlSessionGetName = _IO(kIoctlType, kCmdSessionGetName);

// The smallest `size` the kernel accepts for each command: offsetofend of the
// last field (luo_ioctl.c's IOCTL_OP min_size).
inline constexpr uint32_t kMinSizeCreateSession = offsetof(CreateSession, name) + kSessionNameLength;
inline constexpr uint32_t kMinSizeRetrieveSession =
    offsetof(RetrieveSession, name) + kSessionNameLength;
inline constexpr uint32_t kMinSizeSessionPreserveFd =
    offsetof(SessionPreserveFd, token) + sizeof(uint64_t);
inline constexpr uint32_t kMinSizeSessionRetrieveFd =
    offsetof(SessionRetrieveFd, token) + sizeof(uint64_t);
inline constexpr uint32_t kMinSizeSessionFinish = offsetof(SessionFinish, reserved) + sizeof(uint32_t);
inline constexpr uint32_t kMinSizeSessionGetName = offsetof(SessionGetName, name) + kSessionNameLength;

static_assert(sizeof(CreateSession) == 72);
static_assert(offsetof(CreateSession, size) == 0);
static_assert(offsetof(CreateSession, fd) == 4);
static_assert(offsetof(CreateSession, name) == 8);
static_assert(sizeof(RetrieveSession) == 72);
static_assert(offsetof(RetrieveSession, fd) == 4);
static_assert(offsetof(RetrieveSession, name) == 8);
static_assert(sizeof(SessionPreserveFd) == 16);
static_assert(offsetof(SessionPreserveFd, fd) == 4);
static_assert(offsetof(SessionPreserveFd, token) == 8);
static_assert(alignof(SessionPreserveFd) == 8);
static_assert(sizeof(SessionRetrieveFd) == 16);
static_assert(offsetof(SessionRetrieveFd, fd) == 4);
static_assert(offsetof(SessionRetrieveFd, token) == 8);
static_assert(sizeof(SessionFinish) == 8);
static_assert(offsetof(SessionFinish, reserved) == 4);
static_assert(sizeof(SessionGetName) == 72);
static_assert(offsetof(SessionGetName, name) == 8);

static_assert(kMinSizeCreateSession == 72 && kMinSizeRetrieveSession == 72);
static_assert(kMinSizeSessionPreserveFd == 16 && kMinSizeSessionRetrieveFd == 16);
static_assert(kMinSizeSessionFinish == 8 && kMinSizeSessionGetName == 72);

static_assert(kIoctlCreateSession == 0xBA00);
static_assert(kIoctlRetrieveSession == 0xBA01);
static_assert(kIoctlSessionPreserveFd == 0xBA40);
static_assert(kIoctlSessionRetrieveFd == 0xBA41);
static_assert(kIoctlSessionFinish == 0xBA42);
static_assert(kIoctlSessionGetName == 0xBA43);
static_assert(_IOC_SIZE(kIoctlSessionPreserveFd) == 0 && _IOC_DIR(kIoctlSessionPreserveFd) == _IOC_NONE,
              "LUO ioctls carry their size in the struct, not in the ioctl number");

}  // namespace vmm::luo::uapi
