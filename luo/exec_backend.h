// LUO session semantics in userspace, across an execve() of a new vmm binary.
// Same API and errors as the kernel backend; the fds cross the exec simply by
// staying open, and a manifest (luo/manifest.h) in a sealed memfd says which
// fd is which.
//
// Old process:
//   auto luo = ExecBackend::create();
//   auto s = luo->create_session("vmm");  s->preserve(fd, token)...
//   auto h = luo->prepare_exec();         // freeze: resolves vm_tokens, writes the manifest
//   argv += h->manifest_args();           // {"--luo-manifest-fd", "N"}
//   luo->exec({path, argv, {}, {control_socket_fd}});   // returns only on failure
//   // failure: luo->cancel_exec(), resume the VM (or just resume: destroying
//   // the sessions cancels everything)
// New process:
//   auto luo = ExecBackend::from_manifest(N);
//   auto s = luo->retrieve_session("vmm");
//   s->retrieve(vm_token);   // a NEW empty VM: an inherited VM fd is dead after exec (EIO)
//   s->retrieve(gmem_token); s->retrieve(memfd_token)...; s->finish();
//   // restore failed: hand the unfinished sessions, unchanged, to another exec
//   // (typically the previous binary: a rollback); returns only on failure
//   luo->pass_on({old_path, argv, {}, {control_socket_fd}});
//
// Where userspace can't match the kernel (all documented at the spot):
//  - A memfd's no-grow/no-shrink rule is enforced with F_SEAL_GROW|F_SEAL_SHRINK,
//    which can never be removed: cancelling doesn't lift them (the kernel's
//    unpreserve does) and the retrieved memfd stays sealed (the kernel's is a
//    fresh, unsealed file). Punching holes is not prevented. The memfd needs
//    MFD_ALLOW_SEALING.
//  - A guest_memfd is not frozen: nothing stops fallocate or new faults after
//    preserve, and every page crosses (the kernel keeps only page-cache folios).
//  - A guest_memfd's VM is resolved at freeze as "the one KVM VM fd in the
//    session" (userspace can't ask a guest_memfd for its VM): a session with
//    guest_memfds needs exactly one VM.
//  - The retrieved guest_memfd is the same file, still bound to the old (dead)
//    VM: KVM refuses it as a guest_memfd memslot of the new VM (EINVAL), so it
//    is attached through its mapping (memory::SlotKind::userspace).
//  - Retrieved memfds are the same open file description (shared file offset).
//
// Not thread-safe: one thread drives the live update, as with the kernel's
// single /dev/liveupdate agent.
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "base/result.h"
#include "base/unique_fd.h"
#include "luo/session.h"

namespace vmm::luo {

// The command-line option that tells the new vmm its manifest fd.
inline constexpr const char* kManifestFdOption = "--luo-manifest-fd";

// Creates the brand-new empty VM a retrieved KVM VM token turns into.
using VmFactory = std::function<Result<UniqueFd>()>;
// kvm::System::open() + create_vm().
[[nodiscard]] VmFactory kvm_vm_factory(const std::string& kvm_device = "/dev/kvm");

// execve(2), injectable so tests can look at the fd table at the moment of
// the exec without replacing the test process.
struct ExecSyscalls {
  int (*execve)(const char* path, char* const argv[], char* const envp[]);
};
[[nodiscard]] ExecSyscalls real_exec_syscalls();

// What prepare_exec() gives back.
struct ExecHandover {
  int manifest_fd = -1;
  std::vector<int> preserved_fds;  // every fd that must survive the exec, manifest included; sorted

  // {"--luo-manifest-fd", "N"}: append to the new vmm's argv.
  [[nodiscard]] std::vector<std::string> manifest_args() const;
};

struct ExecRequest {
  std::string path;                                  // the new vmm binary
  std::vector<std::string> argv;                     // argv[0] included
  std::optional<std::vector<std::string>> envp;      // default: this process's environment
  std::vector<int> extra_fds;                        // also inherited (e.g. the control socket)
};

struct ExecOptions {
  VmFactory vm_factory = kvm_vm_factory();
  ExecSyscalls syscalls = real_exec_syscalls();
};

class ExecBackend final : public Backend {
 public:
  // A backend with no incoming sessions (a fresh start).
  [[nodiscard]] static std::unique_ptr<ExecBackend> create(ExecOptions options = {});

  // In the new process: reads and checks the manifest the old vmm left at
  // `manifest_fd`, checks every fd it names is open and is the file it says,
  // marks them FD_CLOEXEC again and closes the manifest. Nothing is touched
  // when a check fails.
  [[nodiscard]] static Result<std::unique_ptr<ExecBackend>> from_manifest(int manifest_fd,
                                                                         ExecOptions options = {});

  ~ExecBackend() override;

  [[nodiscard]] std::string_view kind() const override { return "exec"; }
  [[nodiscard]] Result<std::unique_ptr<Session>> create_session(std::string_view name) override;
  [[nodiscard]] Result<std::unique_ptr<Session>> retrieve_session(std::string_view name) override;

  // The freeze (what reboot() does for kernel LUO): resolves each guest_memfd's
  // vm_token, writes and seals the manifest. Until cancel_exec(), sessions
  // can't be created or changed (EBUSY). Fails, changing nothing, when a
  // session with guest_memfds has no KVM VM (ENOENT, as the kernel's freeze)
  // or more than one (EINVAL, a userspace limitation).
  [[nodiscard]] Result<ExecHandover> prepare_exec();
  // Unfreezes: drops the manifest; the sessions stay as they were.
  void cancel_exec();
  [[nodiscard]] bool prepared() const;

  // Leaves exactly the preserved fds, the manifest and `request.extra_fds`
  // open across the exec (everything else >= 3 is marked FD_CLOEXEC) and
  // execs. Returns only on failure, with every fd's FD_CLOEXEC flag as it was,
  // still prepared: cancel_exec() and resume, or retry.
  [[nodiscard]] Result<void> exec(const ExecRequest& request);

  // Incoming side (a backend made by from_manifest()): the retry after a failed
  // restore. Hands every incoming session not yet finished, with all its
  // original entries and inherited fds, unchanged, to a new exec of
  // `request.path`, as if this process had never touched them: retrieves
  // (successful or failed; failures are sticky only within this process)
  // don't matter, and a KVM VM crosses as the original inherited VM fd, never
  // the new VM retrieve() made. Writes a fresh manifest in the same format and
  // sets `--luo-manifest-fd N` in `request.argv` to it (replacing the option
  // where argv already has it, e.g. this process's own argv, appending it
  // otherwise). Exactly the sessions' fds, the manifest and
  // `request.extra_fds` cross; every other fd >= 3 is marked FD_CLOEXEC.
  // Finished sessions are not passed on (the kernel drops them too).
  // Returns only on failure, with every fd's FD_CLOEXEC flag as it was and the
  // backend unchanged (sessions still retrievable and finishable):
  //   EINVAL  a backend made by create() (it has no incoming sessions), or no argv[0]
  //   ENOENT  nothing left to pass on: every incoming session is finished
  //   EBADF   an extra fd is not open
  //   EINVAL  an inherited fd is no longer the file that was handed over
  //   and the execve's own errors (ENOENT: no such binary...).
  [[nodiscard]] Result<void> pass_on(const ExecRequest& request);

  // After a handover inside this same process (tests, or a restart without
  // exec): forgets the preserved fds and the manifest without closing them:
  // they belong to whoever read the manifest now. Outgoing sessions become
  // inert. After a real exec there is nothing left to release.
  void release_after_handover();

  struct Registry;  // shared by the backend and its sessions

 private:
  explicit ExecBackend(std::shared_ptr<Registry> registry) : registry_(std::move(registry)) {}
  std::shared_ptr<Registry> registry_;
};

}  // namespace vmm::luo
