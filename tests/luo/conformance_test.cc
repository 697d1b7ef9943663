// One conformance suite, run against both LUO backends: what a VMM may rely on
// whichever backend it uses. The kernel backend skips where there is no
// /dev/liveupdate; tests that retrieve need the handover itself (a kexec for
// the kernel), which the exec backend can do inside the test process.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <unistd.h>

#include <memory>
#include <string>

#include "kvm/system.h"
#include "luo/exec_backend.h"
#include "luo/kernel_backend.h"
#include "luo/session.h"
#include "tests/luo/test_util.h"

namespace vmm::luo {
namespace {

using testing::check_mapped;
using testing::fill_mapped;
using testing::inode_of;
using testing::kGuestMemfdFlags;
using testing::kvm_unavailable;
using testing::link_of;
using testing::make_memfd;
using testing::read_all;

struct KernelTraits {
  static constexpr bool kHandsOverInProcess = false;
  static Result<std::unique_ptr<Backend>> open() {
    auto backend = KernelBackend::open();
    if (!backend) return std::unexpected(backend.error());
    return std::unique_ptr<Backend>(std::move(*backend));
  }
  static Result<std::unique_ptr<Backend>> hand_over(Backend&) {
    return fail("the kernel backend hands over only through a kexec", ENOTSUP);
  }
};

struct ExecTraits {
  static constexpr bool kHandsOverInProcess = true;
  static Result<std::unique_ptr<Backend>> open() { return std::unique_ptr<Backend>(ExecBackend::create()); }
  // What an exec does, inside this process: freeze, let go of the fds, and
  // read them back from the manifest as the new vmm would.
  static Result<std::unique_ptr<Backend>> hand_over(Backend& backend) {
    auto& exec = dynamic_cast<ExecBackend&>(backend);
    VMM_TRY_ASSIGN(handover, exec.prepare_exec());
    exec.release_after_handover();
    VMM_TRY_ASSIGN(next, ExecBackend::from_manifest(handover.manifest_fd));
    return std::unique_ptr<Backend>(std::move(next));
  }
};

template <class Traits>
class LuoConformance : public ::testing::Test {
 protected:
  void SetUp() override {
    auto opened = Traits::open();
    if (!opened) {
      if (opened.error().code == ENOENT) {
        GTEST_SKIP() << "no /dev/liveupdate on this host: " << opened.error().describe();
      }
      if (opened.error().code == EBUSY) {
        GTEST_SKIP() << "/dev/liveupdate is held by another agent: " << opened.error().describe();
      }
      FAIL() << opened.error().describe();
    }
    backend_ = std::move(*opened);
  }

  // The backend on the other side of a handover; skips where that needs a kexec.
  std::unique_ptr<Backend> hand_over() {
    auto next = Traits::hand_over(*backend_);
    EXPECT_TRUE(next.has_value()) << next.error().describe();
    return next ? std::move(*next) : nullptr;
  }

  std::unique_ptr<Session> create(const std::string& name) {
    auto session = backend_->create_session(name);
    EXPECT_TRUE(session.has_value()) << session.error().describe();
    return session ? std::move(*session) : nullptr;
  }

  std::unique_ptr<Backend> backend_;
};

#define SKIP_UNLESS_IN_PROCESS_HANDOVER()                                                          \
  do {                                                                                             \
    if (!TypeParam::kHandsOverInProcess) GTEST_SKIP() << "retrieving needs a kexec into a new kernel"; \
  } while (0)

using Backends = ::testing::Types<KernelTraits, ExecTraits>;
class BackendNames {
 public:
  template <class T>
  static std::string GetName(int) {
    return std::is_same_v<T, KernelTraits> ? "kernel" : "exec";
  }
};
TYPED_TEST_SUITE(LuoConformance, Backends, BackendNames);

TYPED_TEST(LuoConformance, CreatedSessionKeepsItsName) {
  auto session = this->create("vmm-conformance");
  ASSERT_TRUE(session);
  EXPECT_EQ(session->name(), "vmm-conformance");
  EXPECT_FALSE(session->incoming());
}

TYPED_TEST(LuoConformance, DuplicateSessionNameIsEEXIST) {
  auto first = this->create("duplicate-session");
  ASSERT_TRUE(first);
  auto second = this->backend_->create_session("duplicate-session");
  ASSERT_FALSE(second);
  EXPECT_EQ(second.error().code, EEXIST);
  EXPECT_NE(second.error().message.find("already exists"), std::string::npos) << second.error().message;
}

TYPED_TEST(LuoConformance, NameIsFreeAgainOnceTheSessionIsGone) {
  auto first = this->create("reused-name");
  ASSERT_TRUE(first);
  first.reset();
  EXPECT_TRUE(this->create("reused-name"));
}

TYPED_TEST(LuoConformance, BadSessionNamesAreEINVAL) {
  const std::string longest(kMaxSessionNameLength, 'n');
  for (const std::string& bad :
       {std::string(), longest + "x", std::string("nul\0inside", 10), std::string(200, 'z')}) {
    auto created = this->backend_->create_session(bad);
    ASSERT_FALSE(created) << "name of " << bad.size() << " bytes was accepted";
    EXPECT_EQ(created.error().code, EINVAL) << created.error().describe();
    auto retrieved = this->backend_->retrieve_session(bad);
    ASSERT_FALSE(retrieved);
    EXPECT_EQ(retrieved.error().code, EINVAL);
  }
  EXPECT_TRUE(this->create(longest)) << "a 63-byte name fits the 64-byte uAPI field";
}

TYPED_TEST(LuoConformance, RetrievingUnknownSessionIsENOENT) {
  auto session = this->backend_->retrieve_session("never-preserved");
  ASSERT_FALSE(session);
  EXPECT_EQ(session.error().code, ENOENT) << session.error().describe();
}

TYPED_TEST(LuoConformance, OutgoingSessionIsNotRetrievable) {
  auto outgoing = this->create("outgoing-only");
  ASSERT_TRUE(outgoing);
  auto retrieved = this->backend_->retrieve_session("outgoing-only");
  ASSERT_FALSE(retrieved);
  EXPECT_EQ(retrieved.error().code, ENOENT);
}

TYPED_TEST(LuoConformance, PreservesMemfdAndRefusesDuplicateToken) {
  auto session = this->create("tokens");
  ASSERT_TRUE(session);
  auto a = make_memfd("a", "first");
  auto b = make_memfd("b", "second");
  ASSERT_TRUE(a && b);
  ASSERT_TRUE(session->preserve(a.ref(), 0x1234)) << "memfd preserve";
  auto again = session->preserve(b.ref(), 0x1234);
  ASSERT_FALSE(again);
  EXPECT_EQ(again.error().code, EEXIST) << again.error().describe();
  EXPECT_TRUE(session->preserve(b.ref(), 0x1235));
}

TYPED_TEST(LuoConformance, SameTokenInTwoSessionsIsFine) {
  auto one = this->create("session-one");
  auto two = this->create("session-two");
  ASSERT_TRUE(one && two);
  auto a = make_memfd("a", "1");
  auto b = make_memfd("b", "2");
  EXPECT_TRUE(one->preserve(a.ref(), 7));
  EXPECT_TRUE(two->preserve(b.ref(), 7));
}

TYPED_TEST(LuoConformance, PreservingClosedFdIsEBADF) {
  auto session = this->create("ebadf");
  ASSERT_TRUE(session);
  int closed = ::dup(0);
  ASSERT_GE(closed, 0);
  ::close(closed);
  auto preserved = session->preserve(FdRef(closed), 1);
  ASSERT_FALSE(preserved);
  EXPECT_EQ(preserved.error().code, EBADF);
}

TYPED_TEST(LuoConformance, FilesWithoutHandlerAreENOENT) {
  auto session = this->create("no-handler");
  ASSERT_TRUE(session);
  UniqueFd regular(::open("/proc/self/exe", O_RDONLY | O_CLOEXEC));
  int pipe_fds[2];
  ASSERT_EQ(::pipe2(pipe_fds, O_CLOEXEC), 0);
  UniqueFd pipe_read(pipe_fds[0]), pipe_write(pipe_fds[1]);
  int socks[2];
  ASSERT_EQ(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, socks), 0);
  UniqueFd sock_a(socks[0]), sock_b(socks[1]);
  UniqueFd event(::eventfd(0, EFD_CLOEXEC));
  UniqueFd devnull(::open("/dev/null", O_RDWR | O_CLOEXEC));
  uint64_t token = 100;
  for (const UniqueFd* fd : {&regular, &pipe_read, &sock_a, &event, &devnull}) {
    ASSERT_TRUE(fd->valid());
    auto preserved = session->preserve(fd->ref(), token++);
    ASSERT_FALSE(preserved) << link_of(fd->get()) << " was accepted";
    EXPECT_EQ(preserved.error().code, ENOENT) << preserved.error().describe();
    EXPECT_NE(preserved.error().message.find("no LUO handler"), std::string::npos) << preserved.error().message;
  }
  // A hugetlb memfd is not shmem: memfd_luo refuses it.
  UniqueFd huge(::memfd_create("huge", MFD_HUGETLB | MFD_CLOEXEC));
  if (huge.valid()) {
    auto preserved = session->preserve(huge.ref(), token++);
    ASSERT_FALSE(preserved);
    EXPECT_EQ(preserved.error().code, ENOENT);
  }
}

TYPED_TEST(LuoConformance, KvmSystemAndVcpuFdsHaveNoHandler) {
  if (auto why = kvm_unavailable()) GTEST_SKIP() << *why;
  auto session = this->create("kvm-no-handler");
  ASSERT_TRUE(session);
  auto system = kvm::System::open();
  ASSERT_TRUE(system);
  auto preserved = session->preserve(system->fd(), 1);
  ASSERT_FALSE(preserved);
  EXPECT_EQ(preserved.error().code, ENOENT);
  // Later revisions of the KVM series add a vCPU handler, so only the exec
  // backend promises to refuse vCPUs.
  if (!TypeParam::kHandsOverInProcess) return;
  auto vm = system->create_vm();
  ASSERT_TRUE(vm) << vm.error().describe();
  auto vcpu = vm->create_vcpu(0);
  ASSERT_TRUE(vcpu) << vcpu.error().describe();
  preserved = session->preserve(vcpu->fd(), 2);
  ASSERT_FALSE(preserved);
  EXPECT_EQ(preserved.error().code, ENOENT);
}

TYPED_TEST(LuoConformance, PreservedMemfdCannotGrowOrShrink) {
  auto session = this->create("frozen-size");
  ASSERT_TRUE(session);
  const std::string contents(8192, 'q');
  auto memfd = make_memfd("frozen", contents);
  ASSERT_TRUE(memfd);
  ASSERT_TRUE(session->preserve(memfd.ref(), 1));

  errno = 0;
  EXPECT_NE(::ftruncate(memfd.get(), 16384), 0);
  EXPECT_EQ(errno, EPERM) << "grow";
  errno = 0;
  EXPECT_NE(::ftruncate(memfd.get(), 4096), 0);
  EXPECT_EQ(errno, EPERM) << "shrink";
  errno = 0;
  EXPECT_EQ(::pwrite(memfd.get(), "x", 1, 8192), -1);
  EXPECT_EQ(errno, EPERM) << "write past the end grows the file";
  errno = 0;
  EXPECT_NE(::fallocate(memfd.get(), 0, 0, 16384), 0);
  EXPECT_EQ(errno, EPERM) << "fallocate past the end grows the file";

  // Still readable, writable in place and mappable.
  EXPECT_EQ(::pwrite(memfd.get(), "abc", 3, 0), 3);
  EXPECT_TRUE(fill_mapped(memfd.get(), 4096, 'm'));
  EXPECT_EQ(read_all(memfd.get()).size(), contents.size());
}

// --- across the handover ---------------------------------------------------

TYPED_TEST(LuoConformance, RetrievedMemfdKeepsContents) {
  SKIP_UNLESS_IN_PROCESS_HANDOVER();
  auto session = this->create("memfd-roundtrip");
  ASSERT_TRUE(session);
  const std::string data = "guest RAM survives the handover";
  auto memfd = make_memfd("ram", data);
  auto empty = make_memfd("empty", "");
  ASSERT_TRUE(session->preserve(memfd.ref(), 0xAAAA));
  ASSERT_TRUE(session->preserve(empty.ref(), 0xBBBB));
  const ino_t inode = inode_of(memfd.get());

  auto next = this->hand_over();
  ASSERT_TRUE(next);
  auto incoming = next->retrieve_session("memfd-roundtrip");
  ASSERT_TRUE(incoming) << incoming.error().describe();
  EXPECT_TRUE((*incoming)->incoming());
  EXPECT_EQ((*incoming)->name(), "memfd-roundtrip");

  auto ram = (*incoming)->retrieve(0xAAAA);
  ASSERT_TRUE(ram) << ram.error().describe();
  EXPECT_EQ(read_all(ram->get()), data);
  EXPECT_EQ(inode_of(ram->get()), inode) << "the exec backend hands back the same inode";
  EXPECT_NE(::fcntl(ram->get(), F_GETFD) & FD_CLOEXEC, 0) << "retrieved fds are close-on-exec";
  auto none = (*incoming)->retrieve(0xBBBB);
  ASSERT_TRUE(none);
  EXPECT_EQ(read_all(none->get()), "");
  EXPECT_TRUE((*incoming)->finish());
}

TYPED_TEST(LuoConformance, RetrieveUnknownTokenIsENOENT) {
  SKIP_UNLESS_IN_PROCESS_HANDOVER();
  auto session = this->create("unknown-token");
  auto memfd = make_memfd("m", "x");
  ASSERT_TRUE(session->preserve(memfd.ref(), 1));
  auto next = this->hand_over();
  ASSERT_TRUE(next);
  auto incoming = next->retrieve_session("unknown-token");
  ASSERT_TRUE(incoming);
  auto missing = (*incoming)->retrieve(2);
  ASSERT_FALSE(missing);
  EXPECT_EQ(missing.error().code, ENOENT);
}

TYPED_TEST(LuoConformance, RetrievingTwiceGivesTheSameFile) {
  SKIP_UNLESS_IN_PROCESS_HANDOVER();
  auto session = this->create("twice");
  auto memfd = make_memfd("m", "same file");
  ASSERT_TRUE(session->preserve(memfd.ref(), 5));
  auto next = this->hand_over();
  ASSERT_TRUE(next);
  auto incoming = next->retrieve_session("twice");
  ASSERT_TRUE(incoming);
  auto first = (*incoming)->retrieve(5);
  auto second = (*incoming)->retrieve(5);
  ASSERT_TRUE(first && second);
  EXPECT_NE(first->get(), second->get());
  EXPECT_EQ(inode_of(first->get()), inode_of(second->get()));
}

TYPED_TEST(LuoConformance, SessionCanBeRetrievedOnlyOnce) {
  SKIP_UNLESS_IN_PROCESS_HANDOVER();
  auto session = this->create("once");
  auto next = this->hand_over();
  ASSERT_TRUE(next);
  auto first = next->retrieve_session("once");
  ASSERT_TRUE(first) << "an empty session crosses too: " << first.error().describe();
  auto second = next->retrieve_session("once");
  ASSERT_FALSE(second);
  EXPECT_EQ(second.error().code, EINVAL);
}

TYPED_TEST(LuoConformance, FinishDropsWhatWasNotRetrieved) {
  SKIP_UNLESS_IN_PROCESS_HANDOVER();
  auto session = this->create("finish");
  auto kept = make_memfd("kept", "kept");
  auto dropped = make_memfd("dropped", "dropped");
  ASSERT_TRUE(session->preserve(kept.ref(), 1));
  ASSERT_TRUE(session->preserve(dropped.ref(), 2));
  auto next = this->hand_over();
  ASSERT_TRUE(next);
  auto incoming = next->retrieve_session("finish");
  ASSERT_TRUE(incoming);
  auto retrieved = (*incoming)->retrieve(1);
  ASSERT_TRUE(retrieved);
  ASSERT_TRUE((*incoming)->finish());
  EXPECT_TRUE((*incoming)->finish()) << "finish is idempotent";
  EXPECT_EQ(read_all(retrieved->get()), "kept") << "handed-out fds outlive finish";
  auto after = (*incoming)->retrieve(2);
  ASSERT_FALSE(after);
  EXPECT_EQ(after.error().code, ENOENT);
}

TYPED_TEST(LuoConformance, ClosingRetrievedSessionFinishesIt) {
  SKIP_UNLESS_IN_PROCESS_HANDOVER();
  auto session = this->create("closed-incoming");
  auto memfd = make_memfd("m", "x");
  ASSERT_TRUE(session->preserve(memfd.ref(), 1));
  auto next = this->hand_over();
  ASSERT_TRUE(next);
  {
    auto incoming = next->retrieve_session("closed-incoming");
    ASSERT_TRUE(incoming);
  }
  auto again = next->retrieve_session("closed-incoming");
  ASSERT_FALSE(again);
  EXPECT_EQ(again.error().code, ENOENT) << "a finished session is gone";
}

TYPED_TEST(LuoConformance, SessionsCrossIndependently) {
  SKIP_UNLESS_IN_PROCESS_HANDOVER();
  auto one = this->create("multi-1");
  auto two = this->create("multi-2");
  auto a = make_memfd("a", "one");
  auto b = make_memfd("b", "two");
  ASSERT_TRUE(one->preserve(a.ref(), 1));
  ASSERT_TRUE(two->preserve(b.ref(), 1));
  auto next = this->hand_over();
  ASSERT_TRUE(next);
  auto in_two = next->retrieve_session("multi-2");
  auto in_one = next->retrieve_session("multi-1");
  ASSERT_TRUE(in_one && in_two);
  auto fa = (*in_one)->retrieve(1);
  auto fb = (*in_two)->retrieve(1);
  ASSERT_TRUE(fa && fb);
  EXPECT_EQ(read_all(fa->get()), "one");
  EXPECT_EQ(read_all(fb->get()), "two");
}

TYPED_TEST(LuoConformance, GuestMemfdNeedsItsVmRetrievedFirst) {
  SKIP_UNLESS_IN_PROCESS_HANDOVER();
  if (auto why = kvm_unavailable()) GTEST_SKIP() << *why;
  constexpr size_t kSize = 64 * 1024;
  auto system = kvm::System::open();
  ASSERT_TRUE(system);
  auto vm = system->create_vm();
  ASSERT_TRUE(vm) << vm.error().describe();
  auto early = vm->create_guest_memfd(kSize, kGuestMemfdFlags);
  auto gmem = vm->create_guest_memfd(kSize, kGuestMemfdFlags);
  ASSERT_TRUE(early && gmem) << (early ? gmem.error() : early.error()).describe();
  ASSERT_TRUE(early->preallocate());
  ASSERT_TRUE(gmem->preallocate());
  ASSERT_TRUE(fill_mapped(gmem->fd().get(), kSize, 0x5A));
  const ino_t old_vm_inode = inode_of(vm->fd().get());

  auto session = this->create("vm-first");
  ASSERT_TRUE(session);
  ASSERT_TRUE(session->preserve(vm->fd(), 0x10));
  ASSERT_TRUE(session->preserve(early->fd(), 0x20));
  ASSERT_TRUE(session->preserve(gmem->fd(), 0x21));

  auto next = this->hand_over();
  ASSERT_TRUE(next);
  auto incoming = next->retrieve_session("vm-first");
  ASSERT_TRUE(incoming);

  auto too_early = (*incoming)->retrieve(0x20);
  ASSERT_FALSE(too_early);
  EXPECT_EQ(too_early.error().code, EAGAIN) << too_early.error().describe();

  auto new_vm = (*incoming)->retrieve(0x10);
  ASSERT_TRUE(new_vm) << new_vm.error().describe();
  EXPECT_EQ(link_of(new_vm->get()), "anon_inode:kvm-vm");
  auto new_vm_again = (*incoming)->retrieve(0x10);
  ASSERT_TRUE(new_vm_again);
  EXPECT_EQ(link_of(new_vm_again->get()), "anon_inode:kvm-vm");
  (void)old_vm_inode;  // anon inodes share one inode: the new VM is told apart by working, below

  // The new VM is usable: it can create guest memory of its own.
  kvm::Vm usable(std::move(*new_vm), system->vcpu_mmap_size());
  auto fresh = usable.create_guest_memfd(4096, kGuestMemfdFlags);
  EXPECT_TRUE(fresh) << "the retrieved VM must be a live VM: " << fresh.error().describe();

  auto still_failed = (*incoming)->retrieve(0x20);
  ASSERT_FALSE(still_failed) << "a failed retrieve is sticky";
  EXPECT_EQ(still_failed.error().code, EAGAIN);

  auto memory = (*incoming)->retrieve(0x21);
  ASSERT_TRUE(memory) << memory.error().describe();
  // "anon_inode:[kvm-gmem]" up to Linux 6.18; from 7.x guest_memfd has its own
  // pseudo file system and the link reads "/[kvm-gmem] (deleted)".
  EXPECT_NE(link_of(memory->get()).find("[kvm-gmem]"), std::string::npos) << link_of(memory->get());
  EXPECT_TRUE(check_mapped(memory->get(), kSize, 0x5A)) << "guest memory contents survive";
  EXPECT_TRUE((*incoming)->finish());
}

}  // namespace
}  // namespace vmm::luo
