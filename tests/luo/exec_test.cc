// What only the exec backend has: the freeze (prepare_exec), the exec itself
// with its fd hygiene, the manifest reader's checks, and real handovers to a
// new process (fork + exec of luo_exec_helper).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <map>
#include <string>
#include <vector>

#include "kvm/system.h"
#include "luo/exec_backend.h"
#include "luo/manifest.h"
#include "tests/luo/test_util.h"

#ifndef LUO_EXEC_HELPER
#error "LUO_EXEC_HELPER must name the helper binary"
#endif

namespace vmm::luo {
namespace {

using testing::fill_mapped;
using testing::inode_of;
using testing::kGuestMemfdFlags;
using testing::kvm_unavailable;
using testing::make_memfd;
using testing::open_fds;

int fd_flags(int fd) { return ::fcntl(fd, F_GETFD); }

TEST(LuoExecBackend, SessionHoldsAtMost128Files) {
  auto backend = ExecBackend::create();
  auto session = backend->create_session("full");
  ASSERT_TRUE(session);
  auto memfd = make_memfd("shared", "x");
  for (uint64_t token = 0; token < kMaxFilesPerSession; ++token) {
    ASSERT_TRUE((*session)->preserve(memfd.ref(), token)) << token;
  }
  auto one_more = (*session)->preserve(memfd.ref(), kMaxFilesPerSession);
  ASSERT_FALSE(one_more);
  EXPECT_EQ(one_more.error().code, ENOSPC);
}

TEST(LuoExecBackend, MemfdWithoutSealingIsRefused) {
  auto backend = ExecBackend::create();
  auto session = backend->create_session("unsealable");
  auto memfd = make_memfd("no-sealing", "x", /*allow_sealing=*/false);
  auto preserved = (*session)->preserve(memfd.ref(), 1);
  ASSERT_FALSE(preserved);
  EXPECT_EQ(preserved.error().code, EPERM);
  EXPECT_NE(preserved.error().message.find("MFD_ALLOW_SEALING"), std::string::npos);
}

TEST(LuoExecBackend, DestroyingOutgoingSessionClosesItsCopies) {
  auto backend = ExecBackend::create();
  auto memfd = make_memfd("m", "x");
  const auto before = open_fds();
  {
    auto session = backend->create_session("cancelled");
    ASSERT_TRUE((*session)->preserve(memfd.ref(), 1));
    ASSERT_TRUE((*session)->preserve(memfd.ref(), 2));
    EXPECT_EQ(open_fds().size(), before.size() + 2) << "the session owns a dup per preserved file";
  }
  EXPECT_EQ(open_fds(), before);
}

TEST(LuoExecBackend, PreparedBackendIsFrozenUntilCancelled) {
  auto backend = ExecBackend::create();
  auto session = backend->create_session("frozen");
  auto memfd = make_memfd("m", "x");
  ASSERT_TRUE((*session)->preserve(memfd.ref(), 1));
  auto handover = backend->prepare_exec();
  ASSERT_TRUE(handover) << handover.error().describe();
  EXPECT_TRUE(backend->prepared());
  EXPECT_EQ(handover->preserved_fds.size(), 2u) << "one file and the manifest";
  EXPECT_TRUE(std::ranges::binary_search(handover->preserved_fds, handover->manifest_fd));
  EXPECT_EQ(handover->manifest_args(),
            (std::vector<std::string>{"--luo-manifest-fd", std::to_string(handover->manifest_fd)}));
  EXPECT_EQ(testing::link_of(handover->manifest_fd), "/memfd:vmm-luo-manifest (deleted)");

  auto other = make_memfd("o", "y");
  auto late = (*session)->preserve(other.ref(), 2);
  ASSERT_FALSE(late);
  EXPECT_EQ(late.error().code, EBUSY);
  auto new_session = backend->create_session("late");
  ASSERT_FALSE(new_session);
  EXPECT_EQ(new_session.error().code, EBUSY);
  auto twice = backend->prepare_exec();
  ASSERT_FALSE(twice);
  EXPECT_EQ(twice.error().code, EBUSY);

  const int manifest_fd = handover->manifest_fd;
  backend->cancel_exec();
  EXPECT_FALSE(backend->prepared());
  EXPECT_LT(fd_flags(manifest_fd), 0) << "cancel drops the manifest";
  EXPECT_TRUE((*session)->preserve(other.ref(), 2)) << "the session is usable again";
  EXPECT_TRUE(backend->prepare_exec());
}

TEST(LuoExecBackend, DestroyingASessionWhilePreparedCancelsTheExec) {
  auto backend = ExecBackend::create();
  auto session = backend->create_session("dropped-while-prepared");
  auto memfd = make_memfd("m", "x");
  ASSERT_TRUE((*session)->preserve(memfd.ref(), 1));
  ASSERT_TRUE(backend->prepare_exec());
  session->reset();
  EXPECT_FALSE(backend->prepared()) << "the manifest would name fds that are gone";
}

// In-process handover, as the conformance suite does it.
std::unique_ptr<ExecBackend> hand_over(ExecBackend& backend) {
  auto handover = backend.prepare_exec();
  EXPECT_TRUE(handover) << handover.error().describe();
  if (!handover) return nullptr;
  backend.release_after_handover();
  auto next = ExecBackend::from_manifest(handover->manifest_fd);
  EXPECT_TRUE(next) << next.error().describe();
  return next ? std::move(*next) : nullptr;
}

TEST(LuoExecBackend, EveryGenerationCanUpgradeAgainUnderTheSameName) {
  auto first = ExecBackend::create();
  auto memfd = make_memfd("ram", "generation-0");
  const ino_t inode = inode_of(memfd.get());
  {
    auto session = first->create_session("vmm");
    ASSERT_TRUE((*session)->preserve(memfd.ref(), 1));
  }
  // Destroyed before the handover: cancelled, nothing crosses.
  auto empty = hand_over(*first);
  ASSERT_TRUE(empty);
  EXPECT_FALSE(empty->retrieve_session("vmm"));

  auto session = first->create_session("vmm");
  ASSERT_TRUE(session) << "the cancelled name is free again";
  ASSERT_TRUE((*session)->preserve(memfd.ref(), 1));
  std::unique_ptr<ExecBackend> current = hand_over(*first);
  ASSERT_TRUE(current);
  for (int generation = 1; generation <= 3; ++generation) {
    auto incoming = current->retrieve_session("vmm");
    ASSERT_TRUE(incoming) << "generation " << generation;
    auto ram = (*incoming)->retrieve(1);
    ASSERT_TRUE(ram);
    EXPECT_EQ(inode_of(ram->get()), inode);
    // The new vmm preserves again, under the same name, before finishing.
    auto outgoing = current->create_session("vmm");
    ASSERT_TRUE(outgoing) << "incoming and outgoing names don't collide: " << outgoing.error().describe();
    ASSERT_TRUE((*outgoing)->preserve(ram->ref(), 1)) << "already sealed is fine";
    ASSERT_TRUE((*incoming)->finish());
    current = hand_over(*current);
    ASSERT_TRUE(current);
  }
}

TEST(LuoExecBackend, RetrieveAndFinishBelongToTheIncomingSide) {
  auto backend = ExecBackend::create();
  auto session = backend->create_session("outgoing");
  auto memfd = make_memfd("m", "x");
  ASSERT_TRUE((*session)->preserve(memfd.ref(), 1));
  auto retrieved = (*session)->retrieve(1);
  ASSERT_FALSE(retrieved);
  EXPECT_EQ(retrieved.error().code, EINVAL);
  auto finished = (*session)->finish();
  ASSERT_FALSE(finished);
  EXPECT_EQ(finished.error().code, EINVAL);

  auto next = hand_over(*backend);
  ASSERT_TRUE(next);
  auto incoming = next->retrieve_session("outgoing");
  ASSERT_TRUE(incoming);
  auto other = make_memfd("o", "y");
  auto preserved = (*incoming)->preserve(other.ref(), 2);
  ASSERT_FALSE(preserved);
  EXPECT_EQ(preserved.error().code, EINVAL);
}

TEST(LuoExecBackend, ExecWithoutPrepareIsRefused) {
  auto backend = ExecBackend::create();
  auto result = backend->exec({"/bin/true", {"true"}, std::nullopt, {}});
  ASSERT_FALSE(result);
  EXPECT_EQ(result.error().code, EINVAL);
}

// What the fake execve saw: each watched fd's flags at the moment of the exec.
std::vector<int> g_watched;
std::map<int, int> g_flags_at_exec;
std::vector<std::string> g_exec_argv;

int fake_execve(const char*, char* const argv[], char* const[]) {
  for (int fd : g_watched) g_flags_at_exec[fd] = ::fcntl(fd, F_GETFD);
  g_exec_argv.clear();
  for (char* const* a = argv; *a != nullptr; ++a) g_exec_argv.emplace_back(*a);
  errno = ENOENT;
  return -1;
}

TEST(LuoExecBackend, ExecKeepsOnlyHandedOverFdsAndRestoresFlagsOnFailure) {
  ExecOptions options;
  options.syscalls = ExecSyscalls{&fake_execve};
  auto backend = ExecBackend::create(options);
  auto session = backend->create_session("exec-flags");
  auto memfd = make_memfd("m", "x");
  ASSERT_TRUE((*session)->preserve(memfd.ref(), 1));
  auto handover = backend->prepare_exec();
  ASSERT_TRUE(handover);
  const int preserved = handover->preserved_fds.front() == handover->manifest_fd ? handover->preserved_fds.back()
                                                                                  : handover->preserved_fds.front();
  UniqueFd leaky(::open("/dev/null", O_RDONLY));  // no O_CLOEXEC: would leak into the new vmm
  UniqueFd control(::open("/dev/null", O_RDONLY | O_CLOEXEC));  // e.g. the listening socket
  ASSERT_TRUE(leaky && control);
  g_watched = {leaky.get(), control.get(), preserved, handover->manifest_fd};
  const std::map<int, int> before = {{leaky.get(), fd_flags(leaky.get())},
                                     {control.get(), fd_flags(control.get())},
                                     {preserved, fd_flags(preserved)},
                                     {handover->manifest_fd, fd_flags(handover->manifest_fd)}};

  std::vector<std::string> argv{"vmm", "--restore"};
  for (auto& arg : handover->manifest_args()) argv.push_back(arg);
  auto result = backend->exec({"/opt/vmm/vmm-new", argv, std::vector<std::string>{}, {control.get()}});
  ASSERT_FALSE(result);
  EXPECT_EQ(result.error().code, ENOENT);
  EXPECT_NE(result.error().message.find("not found"), std::string::npos) << result.error().message;

  EXPECT_NE(g_flags_at_exec[leaky.get()] & FD_CLOEXEC, 0) << "unpreserved fds must not cross";
  EXPECT_EQ(g_flags_at_exec[control.get()] & FD_CLOEXEC, 0) << "extra fds cross";
  EXPECT_EQ(g_flags_at_exec[preserved] & FD_CLOEXEC, 0) << "preserved fds cross";
  EXPECT_EQ(g_flags_at_exec[handover->manifest_fd] & FD_CLOEXEC, 0) << "the manifest crosses";
  EXPECT_EQ(g_exec_argv, argv);
  for (const auto& [fd, flags] : before) EXPECT_EQ(fd_flags(fd), flags) << "fd " << fd << " restored";

  EXPECT_TRUE(backend->prepared()) << "still prepared: retry or cancel";
  backend->cancel_exec();
  auto more = make_memfd("more", "y");
  EXPECT_TRUE((*session)->preserve(more.ref(), 2)) << "usable after a failed exec";
}

TEST(LuoExecBackend, ExecOfMissingBinaryIsENOENT) {
  // The real execve: it fails before replacing anything.
  auto backend = ExecBackend::create();
  auto session = backend->create_session("missing-binary");
  auto memfd = make_memfd("m", "x");
  ASSERT_TRUE((*session)->preserve(memfd.ref(), 1));
  ASSERT_TRUE(backend->prepare_exec());
  const int flags = fd_flags(memfd.get());
  auto result = backend->exec({"/nonexistent/luo-test/vmm-new", {"vmm-new"}, std::nullopt, {}});
  ASSERT_FALSE(result);
  EXPECT_EQ(result.error().code, ENOENT);
  EXPECT_NE(result.error().message.find("/nonexistent/luo-test/vmm-new"), std::string::npos);
  EXPECT_EQ(fd_flags(memfd.get()), flags);
}

TEST(LuoExecBackend, FreezeNeedsExactlyOneVmForGuestMemfds) {
  if (auto why = kvm_unavailable()) GTEST_SKIP() << *why;
  auto system = kvm::System::open();
  auto vm = system->create_vm();
  auto other_vm = system->create_vm();
  ASSERT_TRUE(vm && other_vm);
  auto gmem = vm->create_guest_memfd(4096, kGuestMemfdFlags);
  ASSERT_TRUE(gmem) << gmem.error().describe();

  auto backend = ExecBackend::create();
  auto session = backend->create_session("vm-resolution");
  ASSERT_TRUE((*session)->preserve(gmem->fd(), 2));
  auto no_vm = backend->prepare_exec();
  ASSERT_FALSE(no_vm);
  EXPECT_EQ(no_vm.error().code, ENOENT) << "like the kernel's guest_memfd freeze";
  EXPECT_NE(no_vm.error().message.find("no KVM VM"), std::string::npos) << no_vm.error().message;
  EXPECT_FALSE(backend->prepared());

  ASSERT_TRUE((*session)->preserve(vm->fd(), 1));
  ASSERT_TRUE((*session)->preserve(other_vm->fd(), 3));
  auto two_vms = backend->prepare_exec();
  ASSERT_FALSE(two_vms);
  EXPECT_EQ(two_vms.error().code, EINVAL);
  EXPECT_NE(two_vms.error().message.find("one session per VM"), std::string::npos);

  auto alone = backend->create_session("vm-alone");
  ASSERT_TRUE((*alone)->preserve(other_vm->fd(), 1)) << "a VM without guest_memfd needs no resolution";
}

TEST(LuoExecBackend, GuestMemfdAndVmAreRecognised) {
  if (auto why = kvm_unavailable()) GTEST_SKIP() << *why;
  auto system = kvm::System::open();
  auto vm = system->create_vm();
  auto gmem = vm->create_guest_memfd(8192, kGuestMemfdFlags);
  ASSERT_TRUE(gmem);
  auto vm_info = inspect_fd(vm->fd());
  auto gmem_info = inspect_fd(gmem->fd());
  ASSERT_TRUE(vm_info && gmem_info);
  EXPECT_EQ(vm_info->kind, FileKind::kvm_vm) << vm_info->link;
  EXPECT_EQ(gmem_info->kind, FileKind::guest_memfd) << gmem_info->link;
  EXPECT_EQ(gmem_info->size, 8192u);
}

// --- the manifest reader ---------------------------------------------------

UniqueFd manifest_memfd(const std::vector<uint8_t>& bytes) {
  UniqueFd fd(::memfd_create("vmm-luo-manifest", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  EXPECT_EQ(::write(fd.get(), bytes.data(), bytes.size()), static_cast<ssize_t>(bytes.size()));
  return fd;
}

TEST(LuoExecManifestReader, RefusesMissingOrForeignManifestFd) {
  auto stdio = ExecBackend::from_manifest(1);
  ASSERT_FALSE(stdio);
  EXPECT_EQ(stdio.error().code, EBADF);

  int closed = ::dup(0);
  ::close(closed);
  auto missing = ExecBackend::from_manifest(closed);
  ASSERT_FALSE(missing);
  EXPECT_EQ(missing.error().code, EBADF);
  EXPECT_NE(missing.error().message.find("--luo-manifest-fd"), std::string::npos);

  UniqueFd devnull(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  auto foreign = ExecBackend::from_manifest(devnull.get());
  ASSERT_FALSE(foreign);
  EXPECT_EQ(foreign.error().code, EINVAL);
  EXPECT_NE(::fcntl(devnull.get(), F_GETFD), -1) << "a foreign fd is left alone";

  auto garbage = manifest_memfd({1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21,
                                 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40});
  auto corrupt = ExecBackend::from_manifest(garbage.get());
  ASSERT_FALSE(corrupt);
  EXPECT_EQ(corrupt.error().code, EINVAL);
  EXPECT_NE(corrupt.error().message.find("corrupt"), std::string::npos);
}

TEST(LuoExecManifestReader, ChecksEveryFdIsTheFileThatWasPreserved) {
  auto memfd = make_memfd("real", "contents");
  auto impostor = make_memfd("impostor", "contents");
  struct stat st {};
  ASSERT_EQ(::fstat(memfd.get(), &st), 0);
  const int flags = fd_flags(impostor.get());

  manifest::Manifest m;
  m.sessions.push_back({"s", {{1, impostor.get(), FileKind::memfd, 0, 8, st.st_dev, st.st_ino}}});
  auto wrong_file = manifest_memfd(manifest::encode(m));
  auto result = ExecBackend::from_manifest(wrong_file.get());
  ASSERT_FALSE(result);
  EXPECT_EQ(result.error().code, EINVAL);
  EXPECT_NE(result.error().message.find("not the file"), std::string::npos) << result.error().message;
  EXPECT_EQ(fd_flags(impostor.get()), flags) << "nothing is adopted when a check fails";

  // Far above anything open here (a just-closed number would be reused by
  // the manifest memfd itself).
  constexpr int kNotOpen = 1000;
  ASSERT_LT(fd_flags(kNotOpen), 0);
  m.sessions[0].entries[0].fd = kNotOpen;
  auto not_open = manifest_memfd(manifest::encode(m));
  result = ExecBackend::from_manifest(not_open.get());
  ASSERT_FALSE(result);
  EXPECT_EQ(result.error().code, EBADF);
  EXPECT_NE(result.error().message.find("not open"), std::string::npos);

  m.sessions[0].entries[0] = {1, memfd.get(), FileKind::memfd, 0, 4096, st.st_dev, st.st_ino};
  auto wrong_size = manifest_memfd(manifest::encode(m));
  result = ExecBackend::from_manifest(wrong_size.get());
  ASSERT_FALSE(result);
  EXPECT_NE(result.error().message.find("bytes at the handover"), std::string::npos);
}

// --- a real exec into a new process -----------------------------------------

struct ChildResult {
  int exit_status = -1;
  std::string report;
};

// Forks; the child execs luo_exec_helper through `backend` (prepared) with
// `args`, handing over the write end of a pipe the helper reports on.
ChildResult run_helper(ExecBackend& backend, const ExecHandover& handover, const std::string& session,
                       std::vector<std::string> args) {
  int pipe_fds[2];
  EXPECT_EQ(::pipe2(pipe_fds, O_CLOEXEC), 0);
  UniqueFd read_end(pipe_fds[0]), write_end(pipe_fds[1]);

  std::string allowed;
  for (int fd : handover.preserved_fds) allowed += std::to_string(fd) + ",";
  allowed += std::to_string(write_end.get());
  std::vector<std::string> argv{LUO_EXEC_HELPER, "--session", session, "--result-fd",
                                std::to_string(write_end.get()), "--allowed-fds", allowed};
  for (auto& arg : handover.manifest_args()) argv.push_back(arg);
  for (auto& arg : args) argv.push_back(std::move(arg));

  const pid_t pid = ::fork();
  if (pid == 0) {
    auto failed = backend.exec({LUO_EXEC_HELPER, argv, std::nullopt, {write_end.get()}});
    const std::string why = "FAIL exec: " + failed.error().describe() + "\n";
    (void)!::write(write_end.get(), why.data(), why.size());
    ::_exit(127);
  }
  write_end.reset();
  ChildResult result;
  char buf[1024];
  ssize_t n;
  while ((n = ::read(read_end.get(), buf, sizeof(buf))) > 0) result.report.append(buf, static_cast<size_t>(n));
  int status = 0;
  ::waitpid(pid, &status, 0);
  result.exit_status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return result;
}

TEST(LuoCrossExec, NewProcessRetrievesMemfdAndInheritsNothingElse) {
  auto backend = ExecBackend::create();
  auto session = backend->create_session("cross-exec");
  const std::string contents = "hello-from-the-old-vmm";
  auto memfd = make_memfd("guest-ram", contents);
  ASSERT_TRUE((*session)->preserve(memfd.ref(), 0x11));
  // Fds the child must not see: one without O_CLOEXEC, one with.
  UniqueFd leaky(::open("/dev/null", O_RDONLY));
  UniqueFd sealed_in(::open("/dev/null", O_RDONLY | O_CLOEXEC));
  auto handover = backend->prepare_exec();
  ASSERT_TRUE(handover) << handover.error().describe();

  auto child = run_helper(*backend, *handover, "cross-exec",
                          {"--memfd", "0x11:" + std::to_string(inode_of(memfd.get())) + ":" + contents});
  EXPECT_EQ(child.exit_status, 0) << child.report;
  EXPECT_EQ(child.report.find("FAIL"), std::string::npos) << child.report;
  EXPECT_NE(child.report.find("ok only-preserved-fds-inherited"), std::string::npos) << child.report;
  EXPECT_NE(child.report.find("ok memfd-contents"), std::string::npos) << child.report;
  EXPECT_NE(child.report.find("ok memfd-inode"), std::string::npos) << child.report;
  EXPECT_NE(child.report.find("ok finish"), std::string::npos) << child.report;
  backend->cancel_exec();
}

TEST(LuoCrossExec, NewProcessGetsNewVmAndGuestMemory) {
  if (auto why = kvm_unavailable()) GTEST_SKIP() << *why;
  constexpr size_t kSize = 256 * 1024;
  auto system = kvm::System::open();
  auto vm = system->create_vm();
  ASSERT_TRUE(vm);
  auto gmem = vm->create_guest_memfd(kSize, kGuestMemfdFlags);
  ASSERT_TRUE(gmem) << gmem.error().describe();
  ASSERT_TRUE(gmem->preallocate());
  ASSERT_TRUE(fill_mapped(gmem->fd().get(), kSize, 0xC3));
  auto memfd = make_memfd("shared", "shared-memory");

  auto backend = ExecBackend::create();
  auto session = backend->create_session("cross-exec-vm");
  ASSERT_TRUE((*session)->preserve(vm->fd(), 0x100));
  ASSERT_TRUE((*session)->preserve(gmem->fd(), 0x200));
  ASSERT_TRUE((*session)->preserve(memfd.ref(), 0x300));
  auto handover = backend->prepare_exec();
  ASSERT_TRUE(handover) << handover.error().describe();

  auto child = run_helper(*backend, *handover, "cross-exec-vm",
                          {"--vm", "0x100", "--gmem", "0x200:" + std::to_string(kSize) + ":0xC3", "--memfd",
                           "0x300:" + std::to_string(inode_of(memfd.get())) + ":shared-memory"});
  EXPECT_EQ(child.exit_status, 0) << child.report;
  EXPECT_EQ(child.report.find("FAIL"), std::string::npos) << child.report;
  EXPECT_NE(child.report.find("ok new-vm-is-usable"), std::string::npos) << child.report;
  EXPECT_NE(child.report.find("ok guest-memfd-contents"), std::string::npos) << child.report;
  backend->cancel_exec();
}

}  // namespace
}  // namespace vmm::luo
