// The LUO uAPI as this project spells it, and the kernel backend's ioctl
// wrappers and error messages, checked against a fake kernel that applies the
// size rules of luo_ioctl.c (no /dev/liveupdate needed).
#include <gtest/gtest.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstring>
#include <set>
#include <string>
#include <vector>

#include "luo/kernel_backend.h"
#include "luo/uapi.h"

namespace vmm::luo {
namespace {

TEST(LuoUapi, StructLayoutMatchesTheKernel) {
  EXPECT_EQ(sizeof(uapi::CreateSession), 72u);
  EXPECT_EQ(sizeof(uapi::RetrieveSession), 72u);
  EXPECT_EQ(sizeof(uapi::SessionPreserveFd), 16u);
  EXPECT_EQ(sizeof(uapi::SessionRetrieveFd), 16u);
  EXPECT_EQ(sizeof(uapi::SessionFinish), 8u);
  EXPECT_EQ(sizeof(uapi::SessionGetName), 72u);
  EXPECT_EQ(offsetof(uapi::CreateSession, name), 8u);
  EXPECT_EQ(offsetof(uapi::SessionPreserveFd, token), 8u);
  EXPECT_EQ(offsetof(uapi::SessionRetrieveFd, fd), 4u);
  EXPECT_EQ(uapi::kSessionNameLength, 64u) << "mainline: 64 (the v5 series' 56 never shipped)";
  EXPECT_EQ(kMaxSessionNameLength, 63u);
}

TEST(LuoUapi, IoctlNumbersAreBareIoWithType0xBA) {
  EXPECT_EQ(uapi::kIoctlCreateSession, 0xBA00u);
  EXPECT_EQ(uapi::kIoctlRetrieveSession, 0xBA01u);
  EXPECT_EQ(uapi::kIoctlSessionPreserveFd, 0xBA40u);
  EXPECT_EQ(uapi::kIoctlSessionRetrieveFd, 0xBA41u);
  EXPECT_EQ(uapi::kIoctlSessionFinish, 0xBA42u);
  EXPECT_EQ(uapi::kIoctlSessionGetName, 0xBA43u);
  for (unsigned long nr : {uapi::kIoctlCreateSession, uapi::kIoctlSessionPreserveFd, uapi::kIoctlSessionFinish}) {
    EXPECT_EQ(_IOC_TYPE(nr), 0xBAu);
    EXPECT_EQ(_IOC_SIZE(nr), 0u) << "the size lives in the struct's first field";
    EXPECT_EQ(_IOC_DIR(nr), static_cast<unsigned>(_IOC_NONE));
  }
}

// A fake /dev/liveupdate: checks every command like luo_ioctl() does (known
// nr, size >= offsetofend(last field), bytes beyond the known struct must be
// zero: E2BIG) and records what it got.
struct FakeKernel {
  struct Call {
    unsigned long request;
    uint32_t size;
    std::vector<uint8_t> bytes;
  };
  bool device_missing = false;
  bool device_busy = false;
  int fail_next_with = 0;
  std::vector<Call> calls;
  std::set<std::string> sessions;
  std::vector<int> fds;  // real memfds standing in for device and session fds

  int new_fd(const char* name) {
    const int fd = ::memfd_create(name, MFD_CLOEXEC);
    return fd;
  }
};
FakeKernel* g_kernel = nullptr;

int fake_open(const char*, int) {
  if (g_kernel->device_missing) {
    errno = ENOENT;
    return -1;
  }
  if (g_kernel->device_busy) {
    errno = EBUSY;
    return -1;
  }
  return g_kernel->new_fd("fake-liveupdate");
}

int fake_ioctl(int, unsigned long request, void* arg) {
  if (_IOC_TYPE(request) != uapi::kIoctlType) {
    errno = ENOTTY;
    return -1;
  }
  uint32_t size = 0;
  std::memcpy(&size, arg, sizeof(size));
  size_t known = 0;
  uint32_t min_size = 0;
  switch (request) {
    case uapi::kIoctlCreateSession: known = sizeof(uapi::CreateSession); min_size = uapi::kMinSizeCreateSession; break;
    case uapi::kIoctlRetrieveSession: known = sizeof(uapi::RetrieveSession); min_size = uapi::kMinSizeRetrieveSession; break;
    case uapi::kIoctlSessionPreserveFd: known = sizeof(uapi::SessionPreserveFd); min_size = uapi::kMinSizeSessionPreserveFd; break;
    case uapi::kIoctlSessionRetrieveFd: known = sizeof(uapi::SessionRetrieveFd); min_size = uapi::kMinSizeSessionRetrieveFd; break;
    case uapi::kIoctlSessionFinish: known = sizeof(uapi::SessionFinish); min_size = uapi::kMinSizeSessionFinish; break;
    case uapi::kIoctlSessionGetName: known = sizeof(uapi::SessionGetName); min_size = uapi::kMinSizeSessionGetName; break;
    default: errno = EINVAL; return -1;
  }
  if (size < min_size) {
    errno = EINVAL;
    return -1;
  }
  const auto* bytes = static_cast<const uint8_t*>(arg);
  for (size_t i = known; i < size; ++i) {
    if (bytes[i] != 0) {
      errno = E2BIG;
      return -1;
    }
  }
  g_kernel->calls.push_back({request, size, std::vector<uint8_t>(bytes, bytes + size)});
  if (g_kernel->fail_next_with != 0) {
    errno = std::exchange(g_kernel->fail_next_with, 0);
    return -1;
  }
  switch (request) {
    case uapi::kIoctlCreateSession: {
      auto* cmd = static_cast<uapi::CreateSession*>(arg);
      const auto* name = reinterpret_cast<const char*>(cmd->name);
      if (strnlen(name, sizeof(cmd->name)) == sizeof(cmd->name)) {
        errno = EINVAL;
        return -1;
      }
      if (!g_kernel->sessions.insert(name).second) {
        errno = EEXIST;
        return -1;
      }
      cmd->fd = g_kernel->new_fd("fake-session");
      return 0;
    }
    case uapi::kIoctlRetrieveSession:
      errno = ENOENT;  // nothing came from a previous kernel
      return -1;
    case uapi::kIoctlSessionRetrieveFd:
      errno = ENOENT;
      return -1;
    case uapi::kIoctlSessionGetName: {
      auto* cmd = static_cast<uapi::SessionGetName*>(arg);
      std::memcpy(cmd->name, "fake-name", 10);
      return 0;
    }
    default:
      return 0;
  }
}

class KernelBackendOnFakeKernel : public ::testing::Test {
 protected:
  void SetUp() override { g_kernel = &kernel_; }
  void TearDown() override { g_kernel = nullptr; }
  static KernelSyscalls fake() { return KernelSyscalls{&fake_open, &fake_ioctl}; }
  std::unique_ptr<KernelBackend> open() {
    auto backend = KernelBackend::open("/dev/liveupdate", fake());
    EXPECT_TRUE(backend) << backend.error().describe();
    return backend ? std::move(*backend) : nullptr;
  }
  FakeKernel kernel_;
};

TEST_F(KernelBackendOnFakeKernel, WrappersSendFullSizedStructs) {
  auto backend = open();
  ASSERT_TRUE(backend);
  auto session = backend->create_session("abc");
  ASSERT_TRUE(session) << session.error().describe();
  ASSERT_EQ(kernel_.calls.size(), 1u);
  const auto& create = kernel_.calls[0];
  EXPECT_EQ(create.request, uapi::kIoctlCreateSession);
  EXPECT_EQ(create.size, sizeof(uapi::CreateSession));
  EXPECT_EQ(std::memcmp(create.bytes.data() + offsetof(uapi::CreateSession, name), "abc", 4), 0)
      << "the name is NUL-terminated";
  for (size_t i = offsetof(uapi::CreateSession, name) + 4; i < create.bytes.size(); ++i) {
    EXPECT_EQ(create.bytes[i], 0) << "byte " << i << " of the name field is not zero-filled";
  }

  UniqueFd memfd(::memfd_create("m", MFD_CLOEXEC));
  ASSERT_TRUE((*session)->preserve(memfd.ref(), 0x1122334455667788ULL));
  const auto& preserve = kernel_.calls.back();
  EXPECT_EQ(preserve.request, uapi::kIoctlSessionPreserveFd);
  EXPECT_EQ(preserve.size, 16u);
  uapi::SessionPreserveFd sent{};
  std::memcpy(&sent, preserve.bytes.data(), sizeof(sent));
  EXPECT_EQ(sent.fd, memfd.get());
  EXPECT_EQ(sent.token, 0x1122334455667788ULL);

  ASSERT_TRUE((*session)->finish());
  EXPECT_EQ(kernel_.calls.back().request, uapi::kIoctlSessionFinish);
  EXPECT_EQ(kernel_.calls.back().size, 8u);
  uapi::SessionFinish finish{};
  std::memcpy(&finish, kernel_.calls.back().bytes.data(), sizeof(finish));
  EXPECT_EQ(finish.reserved, 0u);

  auto* kernel_session = dynamic_cast<KernelSession*>(session->get());
  ASSERT_NE(kernel_session, nullptr);
  auto name = kernel_session->kernel_name();
  ASSERT_TRUE(name);
  EXPECT_EQ(*name, "fake-name");
  EXPECT_EQ(kernel_.calls.back().size, 72u);
}

TEST_F(KernelBackendOnFakeKernel, RetrieveFdSendsTokenAndMapsENOENT) {
  auto backend = open();
  auto session = backend->create_session("s");
  ASSERT_TRUE(session);
  auto retrieved = (*session)->retrieve(42);
  ASSERT_FALSE(retrieved);
  EXPECT_EQ(retrieved.error().code, ENOENT);
  EXPECT_NE(retrieved.error().message.find("token 0x2a"), std::string::npos) << retrieved.error().message;
  uapi::SessionRetrieveFd sent{};
  std::memcpy(&sent, kernel_.calls.back().bytes.data(), sizeof(sent));
  EXPECT_EQ(sent.size, 16u);
  EXPECT_EQ(sent.token, 42u);
}

TEST_F(KernelBackendOnFakeKernel, BadNamesNeverReachTheKernel) {
  auto backend = open();
  ASSERT_FALSE(backend->create_session(""));
  ASSERT_FALSE(backend->create_session(std::string(64, 'x')));
  ASSERT_FALSE(backend->retrieve_session(std::string("a\0b", 3)));
  EXPECT_TRUE(kernel_.calls.empty()) << "the kernel would truncate a 64-byte name silently";
}

TEST_F(KernelBackendOnFakeKernel, ErrorsKeepErrnoAndSayWhatToDo) {
  auto backend = open();
  auto first = backend->create_session("dup");
  ASSERT_TRUE(first);
  auto dup = backend->create_session("dup");
  ASSERT_FALSE(dup);
  EXPECT_EQ(dup.error().code, EEXIST);
  EXPECT_NE(dup.error().message.find("already exists"), std::string::npos);

  auto missing = backend->retrieve_session("gone");
  ASSERT_FALSE(missing);
  EXPECT_EQ(missing.error().code, ENOENT);

  UniqueFd memfd(::memfd_create("m", MFD_CLOEXEC));
  kernel_.fail_next_with = ENOSPC;
  auto full = (*first)->preserve(memfd.ref(), 1);
  ASSERT_FALSE(full);
  EXPECT_EQ(full.error().code, ENOSPC);
  EXPECT_NE(full.error().message.find("full"), std::string::npos);

  kernel_.fail_next_with = ENOENT;
  auto no_handler = (*first)->preserve(memfd.ref(), 2);
  ASSERT_FALSE(no_handler);
  EXPECT_EQ(no_handler.error().code, ENOENT);
  EXPECT_NE(no_handler.error().message.find("no LUO handler"), std::string::npos);

  kernel_.fail_next_with = EAGAIN;
  auto early = (*first)->retrieve(3);
  ASSERT_FALSE(early);
  EXPECT_EQ(early.error().code, EAGAIN);
  EXPECT_NE(early.error().message.find("retrieve the VM"), std::string::npos);

  kernel_.fail_next_with = EBUSY;
  auto finish = (*first)->finish();
  ASSERT_FALSE(finish);
  EXPECT_EQ(finish.error().code, EBUSY);
}

TEST_F(KernelBackendOnFakeKernel, MissingDeviceSaysHowToGetIt) {
  kernel_.device_missing = true;
  auto backend = KernelBackend::open("/dev/liveupdate", fake());
  ASSERT_FALSE(backend);
  EXPECT_EQ(backend.error().code, ENOENT);
  EXPECT_EQ(backend.error().message,
            "/dev/liveupdate not found: this kernel lacks CONFIG_LIVEUPDATE or was booted without "
            "'kho=on liveupdate=on'; use --mode exec");
}

TEST_F(KernelBackendOnFakeKernel, BusyDeviceIsEBUSY) {
  kernel_.device_busy = true;
  auto backend = KernelBackend::open("/dev/liveupdate", fake());
  ASSERT_FALSE(backend);
  EXPECT_EQ(backend.error().code, EBUSY);
  EXPECT_NE(backend.error().message.find("exclusive"), std::string::npos);
}

TEST(KernelBackend, RealDeviceAbsenceIsReportedClearly) {
  if (::access(kLiveUpdateDevice, F_OK) == 0) GTEST_SKIP() << "this host has /dev/liveupdate";
  auto backend = KernelBackend::open();
  ASSERT_FALSE(backend);
  EXPECT_EQ(backend.error().code, ENOENT);
  EXPECT_NE(backend.error().message.find("use --mode exec"), std::string::npos);
}

}  // namespace
}  // namespace vmm::luo
