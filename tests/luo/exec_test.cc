// What only the exec backend has: the freeze (prepare_exec), the exec itself
// with its fd hygiene, the manifest reader's checks, real handovers to a new
// process (fork + exec of luo_exec_helper), and pass_on, the retry after a
// failed restore (the helper passing its sessions on to itself).
#include <fcntl.h>
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
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

// The manifest in `fd`, decoded.
manifest::Manifest read_manifest(int fd) {
  std::vector<uint8_t> bytes(4096);
  const ssize_t n = ::pread(fd, bytes.data(), bytes.size(), 0);
  EXPECT_GT(n, 0) << "manifest fd " << fd;
  bytes.resize(n > 0 ? static_cast<size_t>(n) : 0);
  auto decoded = manifest::decode(bytes);
  EXPECT_TRUE(decoded) << decoded.error().describe();
  return decoded ? *decoded : manifest::Manifest{};
}

// In-process handover, as the conformance suite does it. `handed`: the
// manifest, as the new backend read it.
std::unique_ptr<ExecBackend> hand_over(ExecBackend& backend, ExecOptions options = {},
                                       manifest::Manifest* handed = nullptr) {
  auto handover = backend.prepare_exec();
  EXPECT_TRUE(handover) << handover.error().describe();
  if (!handover) return nullptr;
  if (handed != nullptr) *handed = read_manifest(handover->manifest_fd);
  backend.release_after_handover();
  auto next = ExecBackend::from_manifest(handover->manifest_fd, std::move(options));
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

std::string fd_list(const std::vector<int>& fds) {
  std::string out;
  for (int fd : fds) out += (out.empty() ? "" : ",") + std::to_string(fd);
  return out;
}

// "DEV:INO" of `fd`, as the helper prints it.
std::string identity(int fd) {
  struct stat st {};
  EXPECT_EQ(::fstat(fd, &st), 0);
  return std::to_string(st.st_dev) + ":" + std::to_string(st.st_ino);
}

// One run of luo_exec_helper, possibly through several execs (stages joined
// by "--then"), all reporting on one pipe whose write end crosses every exec.
class HelperRun {
 public:
  HelperRun() {
    int pipe_fds[2];
    EXPECT_EQ(::pipe2(pipe_fds, O_CLOEXEC), 0);
    read_end_.reset(pipe_fds[0]);
    write_end_.reset(pipe_fds[1]);
  }

  // A stage's arguments: `name`, the fds it may find open (the report pipe is
  // added), then `args`.
  [[nodiscard]] std::vector<std::string> stage(const std::string& name, std::vector<int> allowed,
                                               const std::vector<std::string>& args) const {
    allowed.push_back(write_end_.get());
    std::vector<std::string> out{"--name", name, "--result-fd", std::to_string(write_end_.get()),
                                 "--allowed-fds", fd_list(allowed)};
    out.insert(out.end(), args.begin(), args.end());
    return out;
  }

  // Forks; the child execs luo_exec_helper through `backend` (prepared) with
  // the manifest option and `stages`.
  ChildResult run(ExecBackend& backend, const ExecHandover& handover, const std::vector<std::string>& stages) {
    std::vector<std::string> argv{LUO_EXEC_HELPER};
    for (auto& arg : handover.manifest_args()) argv.push_back(arg);
    argv.insert(argv.end(), stages.begin(), stages.end());

    const pid_t pid = ::fork();
    if (pid == 0) {
      auto failed = backend.exec({LUO_EXEC_HELPER, argv, std::nullopt, {write_end_.get()}});
      const std::string why = "FAIL exec: " + failed.error().describe() + "\n";
      (void)!::write(write_end_.get(), why.data(), why.size());
      ::_exit(127);
    }
    write_end_.reset();
    ChildResult result;
    char buf[1024];
    ssize_t n;
    while ((n = ::read(read_end_.get(), buf, sizeof(buf))) > 0) result.report.append(buf, static_cast<size_t>(n));
    int status = 0;
    ::waitpid(pid, &status, 0);
    result.exit_status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
    return result;
  }

 private:
  UniqueFd read_end_, write_end_;
};

// One helper stage retrieving from `session`: the "new vmm" of an upgrade.
ChildResult run_helper(ExecBackend& backend, const ExecHandover& handover, const std::string& session,
                       std::vector<std::string> args) {
  HelperRun run;
  args.insert(args.begin(), {"--session", session});
  auto stage = run.stage("new", handover.preserved_fds, args);
  return run.run(backend, handover, stage);
}

// `first`, "--then", `second`.
std::vector<std::string> then(std::vector<std::string> first, const std::vector<std::string>& second) {
  first.emplace_back("--then");
  first.insert(first.end(), second.begin(), second.end());
  return first;
}

// The fds the entries of `m` name, except those of session `skip`.
std::vector<int> entry_fds(const manifest::Manifest& m, const std::string& skip = {}) {
  std::vector<int> fds;
  for (const auto& session : m.sessions) {
    if (session.name == skip) continue;
    for (const auto& entry : session.entries) fds.push_back(entry.fd);
  }
  return fds;
}

// Every field of every entry, to compare manifests with readable diffs.
std::string dump(const manifest::Manifest& m) {
  std::string out;
  for (const auto& session : m.sessions) {
    out += "session '" + session.name + "':\n";
    for (const auto& e : session.entries) {
      out += fmt::format("  token {:#x} kind {} fd {} vm_token {:#x} size {} dev {} ino {}\n", e.token,
                         to_string(e.kind), e.fd, e.vm_token, e.size, e.dev, e.ino);
    }
  }
  return out;
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
                          {"--memfd", "0x11:" + identity(memfd.get()) + ":" + contents});
  EXPECT_EQ(child.exit_status, 0) << child.report;
  EXPECT_EQ(child.report.find("FAIL"), std::string::npos) << child.report;
  EXPECT_NE(child.report.find("ok new:only-preserved-fds-inherited"), std::string::npos) << child.report;
  EXPECT_NE(child.report.find("ok new:memfd-contents"), std::string::npos) << child.report;
  EXPECT_NE(child.report.find("ok new:memfd-is-the-original"), std::string::npos) << child.report;
  EXPECT_NE(child.report.find("ok new:finish"), std::string::npos) << child.report;
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
                           "0x300:" + identity(memfd.get()) + ":shared-memory"});
  EXPECT_EQ(child.exit_status, 0) << child.report;
  EXPECT_EQ(child.report.find("FAIL"), std::string::npos) << child.report;
  EXPECT_NE(child.report.find("ok new:new-vm-is-usable"), std::string::npos) << child.report;
  EXPECT_NE(child.report.find("ok new:guest-memfd-contents"), std::string::npos) << child.report;
  backend->cancel_exec();
}

// --- pass_on: the retry after a failed restore -------------------------------

TEST(LuoPassOn, IsRefusedOnAnOutgoingBackend) {
  auto backend = ExecBackend::create();
  auto session = backend->create_session("outgoing");
  auto memfd = make_memfd("m", "x");
  ASSERT_TRUE((*session)->preserve(memfd.ref(), 1));
  auto result = backend->pass_on({"/bin/true", {"true"}, std::nullopt, {}});
  ASSERT_FALSE(result);
  EXPECT_EQ(result.error().code, EINVAL);
  EXPECT_NE(result.error().message.find("create()"), std::string::npos) << result.error().message;
}

// What the fake execve saw of a pass_on: each watched fd's flags, the argv,
// and the manifest the argv names, with its flags.
struct PassOnSeen {
  int calls = 0;
  std::map<int, int> flags;
  std::vector<std::string> argv;
  int manifest_fd = -1;
  int manifest_flags = -1;
  std::string manifest;  // dump()
};
PassOnSeen g_pass_on;

int fake_pass_on_execve(const char*, char* const argv[], char* const[]) {
  g_pass_on = PassOnSeen{g_pass_on.calls + 1, {}, {}, -1, -1, {}};
  for (int fd : g_watched) g_pass_on.flags[fd] = ::fcntl(fd, F_GETFD);
  for (char* const* a = argv; *a != nullptr; ++a) g_pass_on.argv.emplace_back(*a);
  for (size_t i = 0; i + 1 < g_pass_on.argv.size(); ++i) {
    if (g_pass_on.argv[i] == kManifestFdOption) g_pass_on.manifest_fd = std::stoi(g_pass_on.argv[i + 1]);
  }
  if (g_pass_on.manifest_fd >= 0) {
    g_pass_on.manifest_flags = ::fcntl(g_pass_on.manifest_fd, F_GETFD);
    g_pass_on.manifest = dump(read_manifest(g_pass_on.manifest_fd));
  }
  errno = ENOENT;
  return -1;
}

ExecOptions fake_pass_on_options() {
  ExecOptions options;
  options.syscalls = ExecSyscalls{&fake_pass_on_execve};
  return options;
}

TEST(LuoPassOn, FailedExecChangesNothing) {
  auto old = ExecBackend::create();
  auto ram = make_memfd("ram", "guest-ram");
  auto blob = make_memfd("state", "state-blob");
  {
    auto session = old->create_session("vmm");
    ASSERT_TRUE((*session)->preserve(ram.ref(), 1));
    ASSERT_TRUE((*session)->preserve(blob.ref(), 2));
    manifest::Manifest handed;
    auto backend = hand_over(*old, fake_pass_on_options(), &handed);
    ASSERT_TRUE(backend);
    const std::vector<int> inherited = entry_fds(handed);
    ASSERT_EQ(inherited.size(), 2u);

    // The failing restore got this far: one good retrieve, one wrong token.
    auto incoming = backend->retrieve_session("vmm");
    ASSERT_TRUE(incoming);
    auto got = (*incoming)->retrieve(1);
    ASSERT_TRUE(got);
    auto wrong = (*incoming)->retrieve(0x99);
    ASSERT_FALSE(wrong);
    EXPECT_EQ(wrong.error().code, ENOENT);

    UniqueFd leaky(::open("/dev/null", O_RDONLY));                // no O_CLOEXEC
    UniqueFd control(::open("/dev/null", O_RDONLY | O_CLOEXEC));  // handed on as an extra fd
    ASSERT_TRUE(leaky && control);
    g_watched = {inherited[0], inherited[1], got->get(), leaky.get(), control.get()};
    std::map<int, int> before;
    for (int fd : g_watched) before[fd] = fd_flags(fd);

    // A rollback reuses this process's argv: its stale manifest fd is replaced.
    const std::vector<std::string> argv{"vmm", "restore", "--luo-manifest-fd", "999", "--session", "vmm"};
    const int calls = g_pass_on.calls;
    auto result = backend->pass_on({"/opt/vmm/vmm-old", argv, std::vector<std::string>{}, {control.get()}});
    ASSERT_FALSE(result);
    EXPECT_EQ(result.error().code, ENOENT);
    EXPECT_NE(result.error().message.find("not found"), std::string::npos) << result.error().message;
    EXPECT_NE(result.error().message.find("'vmm'"), std::string::npos) << "names what it passes on";
    ASSERT_EQ(g_pass_on.calls, calls + 1);

    // At the exec.
    EXPECT_EQ(g_pass_on.flags[inherited[0]] & FD_CLOEXEC, 0) << "inherited fds cross";
    EXPECT_EQ(g_pass_on.flags[inherited[1]] & FD_CLOEXEC, 0) << "even never retrieved";
    EXPECT_NE(g_pass_on.flags[got->get()] & FD_CLOEXEC, 0) << "not the fds retrieve handed out";
    EXPECT_NE(g_pass_on.flags[leaky.get()] & FD_CLOEXEC, 0) << "nothing else crosses";
    EXPECT_EQ(g_pass_on.flags[control.get()] & FD_CLOEXEC, 0) << "extra fds cross";
    ASSERT_GE(g_pass_on.manifest_fd, 3);
    EXPECT_NE(g_pass_on.manifest_fd, 999);
    EXPECT_EQ(g_pass_on.manifest_flags & FD_CLOEXEC, 0) << "the manifest crosses";
    EXPECT_EQ(g_pass_on.argv, (std::vector<std::string>{"vmm", "restore", "--luo-manifest-fd",
                                                        std::to_string(g_pass_on.manifest_fd), "--session",
                                                        "vmm"}));
    EXPECT_EQ(g_pass_on.manifest, dump(handed)) << "the entries as they arrived";

    // After: every flag as it was, the manifest gone, the backend as it was.
    for (const auto& [fd, flags] : before) EXPECT_EQ(fd_flags(fd), flags) << "fd " << fd << " restored";
    EXPECT_LT(fd_flags(g_pass_on.manifest_fd), 0) << "the new manifest is closed";
    auto again = (*incoming)->retrieve(1);
    ASSERT_TRUE(again);
    EXPECT_EQ(inode_of(again->get()), inode_of(ram.get()));
    auto still_wrong = (*incoming)->retrieve(0x99);
    ASSERT_FALSE(still_wrong);
    EXPECT_EQ(still_wrong.error().code, ENOENT);
    auto state = (*incoming)->retrieve(2);
    ASSERT_TRUE(state);
    EXPECT_EQ(testing::read_all(state->get()), "state-blob");
    EXPECT_TRUE((*incoming)->finish());

    auto empty_argv = backend->pass_on({"/opt/vmm/vmm-old", {}, std::nullopt, {}});
    ASSERT_FALSE(empty_argv);
    EXPECT_EQ(empty_argv.error().code, EINVAL);
  }
}

TEST(LuoPassOn, MissingExtraFdIsEBADFAndChangesNothing) {
  auto old = ExecBackend::create();
  auto ram = make_memfd("ram", "x");
  auto session = old->create_session("vmm");
  ASSERT_TRUE((*session)->preserve(ram.ref(), 1));
  manifest::Manifest handed;
  auto backend = hand_over(*old, fake_pass_on_options(), &handed);
  ASSERT_TRUE(backend);
  const int inherited = entry_fds(handed).at(0);
  const int flags = fd_flags(inherited);
  constexpr int kNotOpen = 1000;
  ASSERT_LT(fd_flags(kNotOpen), 0);
  const int calls = g_pass_on.calls;
  auto result = backend->pass_on({"/opt/vmm/vmm-old", {"vmm"}, std::nullopt, {kNotOpen}});
  ASSERT_FALSE(result);
  EXPECT_EQ(result.error().code, EBADF);
  EXPECT_EQ(g_pass_on.calls, calls) << "no exec";
  EXPECT_EQ(fd_flags(inherited), flags);
  auto incoming = backend->retrieve_session("vmm");
  ASSERT_TRUE(incoming);
  EXPECT_TRUE((*incoming)->retrieve(1));
  EXPECT_TRUE((*incoming)->finish());
}

TEST(LuoPassOn, NothingLeftIsENOENT) {
  auto old = ExecBackend::create();
  auto ram = make_memfd("ram", "x");
  auto session = old->create_session("vmm");
  ASSERT_TRUE((*session)->preserve(ram.ref(), 1));
  auto backend = hand_over(*old, fake_pass_on_options());
  ASSERT_TRUE(backend);
  const int calls = g_pass_on.calls;
  {
    auto incoming = backend->retrieve_session("vmm");
    ASSERT_TRUE(incoming);
    ASSERT_TRUE((*incoming)->finish());
    auto finished = backend->pass_on({"/opt/vmm/vmm-old", {"vmm"}, std::nullopt, {}});
    ASSERT_FALSE(finished);
    EXPECT_EQ(finished.error().code, ENOENT);
    EXPECT_NE(finished.error().message.find("finished"), std::string::npos) << finished.error().message;
  }
  // The session object is gone too: still nothing.
  auto gone = backend->pass_on({"/opt/vmm/vmm-old", {"vmm"}, std::nullopt, {}});
  ASSERT_FALSE(gone);
  EXPECT_EQ(gone.error().code, ENOENT);
  EXPECT_EQ(g_pass_on.calls, calls) << "no exec";
}

TEST(LuoPassOn, HandsOnTheInheritedVmNotTheNewOne) {
  if (auto why = kvm_unavailable()) GTEST_SKIP() << *why;
  auto system = kvm::System::open();
  auto vm = system->create_vm();
  ASSERT_TRUE(vm);
  auto gmem = vm->create_guest_memfd(8192, kGuestMemfdFlags);
  ASSERT_TRUE(gmem) << gmem.error().describe();

  auto old = ExecBackend::create();
  auto session = old->create_session("vmm");
  ASSERT_TRUE((*session)->preserve(vm->fd(), 0x100));
  ASSERT_TRUE((*session)->preserve(gmem->fd(), 0x200));
  manifest::Manifest handed;
  auto backend = hand_over(*old, fake_pass_on_options(), &handed);
  ASSERT_TRUE(backend);
  auto incoming = backend->retrieve_session("vmm");
  ASSERT_TRUE(incoming);
  auto new_vm = (*incoming)->retrieve(0x100);
  ASSERT_TRUE(new_vm) << new_vm.error().describe();
  auto memory = (*incoming)->retrieve(0x200);
  ASSERT_TRUE(memory) << memory.error().describe();

  g_watched = entry_fds(handed);
  g_watched.push_back(new_vm->get());
  auto result = backend->pass_on({"/opt/vmm/vmm-old", {"vmm"}, std::nullopt, {}});
  ASSERT_FALSE(result);
  EXPECT_EQ(g_pass_on.manifest, dump(handed)) << "the original VM fd and guest_memfd, as they arrived";
  for (int fd : entry_fds(handed)) EXPECT_EQ(g_pass_on.flags[fd] & FD_CLOEXEC, 0) << "fd " << fd;
  EXPECT_NE(g_pass_on.flags[new_vm->get()] & FD_CLOEXEC, 0) << "the new VM stays here";
  EXPECT_TRUE((*incoming)->finish()) << "still finishable";
}

// Old process: a memfd of known contents, a guest_memfd and its VM in session
// "vmm". The helper's stage A restores and "fails"; it passes the session on
// to stage B, which must get everything as if A had never been there.
class LuoPassOnCrossExec : public ::testing::Test {
 protected:
  static constexpr size_t kSize = 256 * 1024;
  static constexpr const char* kContents = "ram-before-the-failed-restore";

  void SetUp() override {
    if (auto why = kvm_unavailable()) GTEST_SKIP() << *why;
    auto system = kvm::System::open();
    ASSERT_TRUE(system);
    auto vm = system->create_vm();
    ASSERT_TRUE(vm);
    vm_ = std::make_unique<kvm::Vm>(std::move(*vm));
    auto gmem = vm_->create_guest_memfd(kSize, kGuestMemfdFlags);
    ASSERT_TRUE(gmem) << gmem.error().describe();
    gmem_ = std::make_unique<kvm::GuestMemfd>(std::move(*gmem));
    ASSERT_TRUE(gmem_->preallocate());
    ASSERT_TRUE(fill_mapped(gmem_->fd().get(), kSize, 0x5A));
    memfd_ = make_memfd("guest-ram", kContents);

    backend_ = ExecBackend::create();
    auto session = backend_->create_session("vmm");
    ASSERT_TRUE(session);
    session_ = std::move(*session);
    ASSERT_TRUE(session_->preserve(vm_->fd(), 0x100));
    ASSERT_TRUE(session_->preserve(gmem_->fd(), 0x200));
    ASSERT_TRUE(session_->preserve(memfd_.ref(), 0x300));
    auto handover = backend_->prepare_exec();
    ASSERT_TRUE(handover) << handover.error().describe();
    handover_ = *handover;
    handed_ = read_manifest(handover_.manifest_fd);
  }

  void TearDown() override {
    if (backend_) backend_->cancel_exec();
  }

  // Retrieving everything, VM first, checking it is the original memory.
  [[nodiscard]] std::vector<std::string> retrieve_all() const {
    return {"--session", "vmm", "--vm", "0x100", "--gmem",
            fmt::format("0x200:{}:0x5A:{}", kSize, identity(gmem_->fd().get())), "--memfd",
            fmt::format("0x300:{}:{}", identity(memfd_.get()), kContents)};
  }

  // Stage A doing `a_args` then passing on; stage B retrieving everything.
  ChildResult run(const std::vector<std::string>& a_args) {
    HelperRun helper;
    auto b_args = retrieve_all();
    auto stages = then(helper.stage("A", handover_.preserved_fds, a_args),
                       helper.stage("B", entry_fds(handed_), b_args));
    return helper.run(*backend_, handover_, stages);
  }

  static void expect_b_got_everything(const ChildResult& child) {
    EXPECT_EQ(child.exit_status, 0) << child.report;
    EXPECT_EQ(child.report.find("FAIL"), std::string::npos) << child.report;
    for (const char* check : {"ok A:passing-on", "ok B:only-preserved-fds-inherited", "ok B:from-manifest",
                              "ok B:retrieve-vm", "ok B:new-vm-is-usable", "ok B:guest-memfd-contents",
                              "ok B:guest-memfd-is-the-original", "ok B:memfd-contents",
                              "ok B:memfd-is-the-original", "ok B:finish"}) {
      EXPECT_NE(child.report.find(check), std::string::npos) << check << " in\n" << child.report;
    }
  }

  void expect_memory_untouched() const {
    EXPECT_TRUE(testing::check_mapped(gmem_->fd().get(), kSize, 0x5A)) << "no process wrote guest memory";
    EXPECT_EQ(testing::read_all(memfd_.get()), kContents);
  }

  std::unique_ptr<kvm::Vm> vm_;
  std::unique_ptr<kvm::GuestMemfd> gmem_;
  UniqueFd memfd_;
  std::unique_ptr<ExecBackend> backend_;
  std::unique_ptr<Session> session_;
  ExecHandover handover_;
  manifest::Manifest handed_;
};

TEST_F(LuoPassOnCrossExec, AfterAWrongTokenTheNextProcessGetsEverything) {
  auto child = run({"--session", "vmm", "--wrong-token", "0x301"});
  EXPECT_NE(child.report.find("ok A:wrong-token-is-ENOENT"), std::string::npos) << child.report;
  expect_b_got_everything(child);
  expect_memory_untouched();
}

TEST_F(LuoPassOnCrossExec, AfterRetrievingEverythingTheNextProcessGetsEverythingAgain) {
  // A also leaves its retrieved fds (the new VM among them) and a stray file
  // without close-on-exec: B must see none of them.
  auto a_args = retrieve_all();
  a_args.insert(a_args.end(), {"--leak", "yes"});
  auto child = run(a_args);
  for (const char* check : {"ok A:retrieve-vm", "ok A:guest-memfd-contents", "ok A:memfd-contents",
                            "ok A:opened-leaky-fd"}) {
    EXPECT_NE(child.report.find(check), std::string::npos) << check << " in\n" << child.report;
  }
  expect_b_got_everything(child);
  expect_memory_untouched();
}

TEST_F(LuoPassOnCrossExec, AFailedGuestMemfdRetrieveIsNotStickyInTheNextProcess) {
  auto child = run({"--session", "vmm", "--gmem-first", "0x200"});
  EXPECT_NE(child.report.find("ok A:gmem-before-vm-is-EAGAIN"), std::string::npos) << child.report;
  expect_b_got_everything(child);
  expect_memory_untouched();
}

TEST(LuoPassOnCrossExecMemfd, FinishedSessionIsNotPassedOn) {
  auto backend = ExecBackend::create();
  auto keep_ram = make_memfd("keep", "kept");
  auto done_ram = make_memfd("done", "done");
  auto keep = backend->create_session("keep");
  auto done = backend->create_session("done");
  ASSERT_TRUE(keep && done);
  ASSERT_TRUE((*keep)->preserve(keep_ram.ref(), 1));
  ASSERT_TRUE((*done)->preserve(done_ram.ref(), 1));
  auto handover = backend->prepare_exec();
  ASSERT_TRUE(handover) << handover.error().describe();
  const auto handed = read_manifest(handover->manifest_fd);

  HelperRun helper;
  auto stages = then(helper.stage("A", handover->preserved_fds, {"--finish-session", "done", "--session", "keep"}),
                     // B may hold only what "keep" preserved: "done"'s memfd is gone.
                     helper.stage("B", entry_fds(handed, "done"),
                                  {"--absent-session", "done", "--session", "keep", "--memfd",
                                   "1:" + identity(keep_ram.get()) + ":kept"}));
  auto child = helper.run(*backend, *handover, stages);
  EXPECT_EQ(child.exit_status, 0) << child.report;
  EXPECT_EQ(child.report.find("FAIL"), std::string::npos) << child.report;
  for (const char* check : {"ok A:finish-other-session", "ok A:passing-on", "ok B:only-preserved-fds-inherited",
                            "ok B:session-absent", "ok B:memfd-contents", "ok B:finish"}) {
    EXPECT_NE(child.report.find(check), std::string::npos) << check << " in\n" << child.report;
  }
  backend->cancel_exec();
}

TEST(LuoPassOnCrossExecMemfd, EveryFdNotPassedOnIsClosed) {
  auto backend = ExecBackend::create();
  auto ram = make_memfd("ram", "guest-ram");
  auto blob = make_memfd("state", "state-blob");
  auto session = backend->create_session("vmm");
  ASSERT_TRUE(session);
  ASSERT_TRUE((*session)->preserve(ram.ref(), 1));
  ASSERT_TRUE((*session)->preserve(blob.ref(), 2));
  UniqueFd leaky(::open("/dev/null", O_RDONLY));  // in the old process: must reach neither A nor B
  auto handover = backend->prepare_exec();
  ASSERT_TRUE(handover) << handover.error().describe();
  const auto handed = read_manifest(handover->manifest_fd);

  HelperRun helper;
  // A retrieves token 1 and leaks that fd and another file; B may hold only
  // the inherited fds, its manifest and the report pipe.
  auto stages = then(helper.stage("A", handover->preserved_fds,
                                  {"--session", "vmm", "--memfd", "1:" + identity(ram.get()) + ":guest-ram",
                                   "--leak", "yes"}),
                     helper.stage("B", entry_fds(handed),
                                  {"--session", "vmm", "--memfd", "2:" + identity(blob.get()) + ":state-blob"}));
  auto child = helper.run(*backend, *handover, stages);
  EXPECT_EQ(child.exit_status, 0) << child.report;
  EXPECT_EQ(child.report.find("FAIL"), std::string::npos) << child.report;
  for (const char* check : {"ok A:only-preserved-fds-inherited", "ok A:memfd-contents", "ok A:opened-leaky-fd",
                            "ok B:only-preserved-fds-inherited", "ok B:manifest-closed", "ok B:memfd-contents",
                            "ok B:finish"}) {
    EXPECT_NE(child.report.find(check), std::string::npos) << check << " in\n" << child.report;
  }
  backend->cancel_exec();
}

}  // namespace
}  // namespace vmm::luo
