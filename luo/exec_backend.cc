#include "luo/exec_backend.h"

#include <dirent.h>
#include <fcntl.h>
#include <linux/close_range.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <utility>

#include "kvm/system.h"
#include "luo/file_kind.h"
#include "luo/manifest.h"

extern char** environ;

namespace vmm::luo {

namespace {

constexpr int kResizeSeals = F_SEAL_GROW | F_SEAL_SHRINK;
// A manifest larger than this is not one of ours.
constexpr uint64_t kMaxManifestSize = 16u << 20;

// One preserved file, on either side of the exec.
struct PreservedFile {
  uint64_t token = 0;
  FileKind kind = FileKind::other;
  // Outgoing: the session's own dup. Incoming: the inherited fd (for a KVM VM,
  // the old, now unusable VM, kept open until finish like the kernel keeps
  // the preserved file).
  UniqueFd fd;
  uint64_t size = 0;
  uint64_t dev = 0;
  uint64_t ino = 0;
  uint64_t vm_token = 0;  // guest_memfd: its VM's token (set at freeze)

  // Incoming only, mirroring luo_file->retrieve_status: 0 untried, 1 done,
  // -1 failed (sticky, `retrieve_error` says why).
  int retrieve_status = 0;
  Error retrieve_error;
  UniqueFd new_vm;  // kvm_vm: the brand-new VM every retrieve hands a dup of

  [[nodiscard]] int handout_source() const { return new_vm.valid() ? new_vm.get() : fd.get(); }

  // Incoming: the manifest entry this file arrived with. Passing it on
  // unchanged (the inherited fd, the old VM rather than new_vm) lets the next
  // process check every fd exactly as this one did.
  [[nodiscard]] manifest::Entry inherited_entry() const {
    return manifest::Entry{token, fd.get(), kind, vm_token, size, dev, ino};
  }
};

struct SessionState {
  std::string name;
  bool incoming = false;
  bool retrieved = false;  // incoming: given out by retrieve_session()
  bool finished = false;   // incoming
  bool released = false;   // outgoing: handed over in this process
  std::vector<PreservedFile> files;

  PreservedFile* find(uint64_t token) {
    auto it = std::ranges::find(files, token, &PreservedFile::token);
    return it == files.end() ? nullptr : &*it;
  }
};

Result<UniqueFd> dup_cloexec(int fd) {
  const int copy = ::fcntl(fd, F_DUPFD_CLOEXEC, 3);
  if (copy < 0) return fail_errno(fmt::format("dup of fd {}", fd));
  return UniqueFd(copy);
}

Result<void> seal_against_resize(int fd, int original_fd) {
  const int seals = ::fcntl(fd, F_GET_SEALS);
  if (seals >= 0 && (seals & kResizeSeals) == kResizeSeals) return {};
  // The kernel freezes a preserved memfd's size until unpreserve; the nearest
  // userspace equivalent is sealing it. Unlike the kernel's freeze these seals
  // are permanent: cancelling the live update can't lift them.
  if (::fcntl(fd, F_ADD_SEALS, kResizeSeals) != 0) {
    const int code = errno;
    if (code == EPERM) {
      return fail(fmt::format("cannot seal memfd fd {} against grow/shrink: it was created without "
                              "MFD_ALLOW_SEALING (or sealed with F_SEAL_SEAL); the exec backend enforces "
                              "LUO's no-resize rule with seals, so create guest RAM memfds with "
                              "MFD_ALLOW_SEALING",
                              original_fd),
                  EPERM);
    }
    return std::unexpected(Error{code, fmt::format("F_ADD_SEALS on memfd fd {}", original_fd)});
  }
  return {};
}

Result<void> set_cloexec(int fd, bool on) {
  const int flags = ::fcntl(fd, F_GETFD);
  if (flags < 0) return fail_errno(fmt::format("F_GETFD on fd {}", fd));
  const int wanted = on ? (flags | FD_CLOEXEC) : (flags & ~FD_CLOEXEC);
  if (wanted != flags && ::fcntl(fd, F_SETFD, wanted) != 0) {
    return fail_errno(fmt::format("F_SETFD on fd {}", fd));
  }
  return {};
}

struct FdFlags {
  int fd;
  int flags;
};

// Every open fd >= 3 with its descriptor flags.
Result<std::vector<FdFlags>> snapshot_fd_flags() {
  DIR* dir = ::opendir("/proc/self/fd");
  if (dir == nullptr) return fail_errno("opendir /proc/self/fd (is /proc mounted?)");
  const int dir_fd = ::dirfd(dir);
  std::vector<FdFlags> out;
  while (const dirent* entry = ::readdir(dir)) {
    char* end = nullptr;
    const long fd = std::strtol(entry->d_name, &end, 10);
    if (end == entry->d_name || *end != '\0' || fd < 3 || fd == dir_fd) continue;
    const int flags = ::fcntl(static_cast<int>(fd), F_GETFD);
    if (flags >= 0) out.push_back({static_cast<int>(fd), flags});
  }
  ::closedir(dir);
  return out;
}

void restore_fd_flags(const std::vector<FdFlags>& snapshot) {
  for (const auto& [fd, flags] : snapshot) {
    if (::fcntl(fd, F_SETFD, flags) != 0) {
      spdlog::warn("luo: could not restore the flags of fd {} after a failed exec: {}", fd,
                   std::strerror(errno));
    }
  }
}

// `what_now`: what the caller can still do, since the exec changed nothing.
Error exec_error(int code, const std::string& path, std::string_view what_now) {
  switch (code) {
    case ENOENT:
      return Error{code, fmt::format("vmm binary '{}' not found: check the path given for the exec; {}", path,
                                     what_now)};
    case EACCES:
      return Error{code,
                   fmt::format("'{}' is not executable (permissions or a noexec mount); {}", path, what_now)};
    case ENOEXEC:
      return Error{code, fmt::format("'{}' is not an executable for this machine; {}", path, what_now)};
    case ETXTBSY:
      return Error{code, fmt::format("'{}' is still open for writing (being copied?); retry when it is "
                                     "complete",
                                     path)};
    default:
      return Error{code, fmt::format("execve '{}'; {}", path, what_now)};
  }
}

// Writes `record` into a new sealed memfd (close-on-exec until an exec keeps it).
Result<UniqueFd> write_manifest(const manifest::Manifest& record) {
  const std::vector<uint8_t> bytes = manifest::encode(record);
  UniqueFd fd(::memfd_create("vmm-luo-manifest", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (!fd.valid()) return fail_errno("memfd_create for the LUO exec manifest");
  size_t written = 0;
  while (written < bytes.size()) {
    const ssize_t n = ::write(fd.get(), bytes.data() + written, bytes.size() - written);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return fail_errno("writing the LUO exec manifest");
    written += static_cast<size_t>(n);
  }
  // The manifest is read, never written, on the other side: seal it so neither
  // process can change it by accident.
  if (::fcntl(fd.get(), F_ADD_SEALS, F_SEAL_WRITE | F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL) != 0) {
    return fail_errno("sealing the LUO exec manifest");
  }
  return fd;
}

// Whether fd `entry.fd` is the file `entry` describes. `not_open_hint` says
// who should have kept it open.
Result<void> check_entry_fd(const manifest::Entry& entry, const std::string& session,
                            std::string_view not_open_hint) {
  const std::string what = fmt::format("{} token {:#x} of session '{}'", to_string(entry.kind), entry.token, session);
  auto info = inspect_fd(FdRef(entry.fd));
  if (!info) {
    return fail(fmt::format("the manifest puts {} at fd {}, which is not open: {}", what, entry.fd, not_open_hint),
                EBADF);
  }
  if (info->kind != entry.kind || info->dev != entry.dev || info->ino != entry.ino) {
    return fail(fmt::format("the manifest puts {} at fd {}, but fd {} is {} ({}): not the file that was "
                            "preserved",
                            what, entry.fd, entry.fd, to_string(info->kind), info->link),
                EINVAL);
  }
  if (entry.kind != FileKind::kvm_vm && info->size != entry.size) {
    return fail(fmt::format("{} was {} bytes at the handover but is {} now", what, entry.size, info->size), EINVAL);
  }
  return {};
}

// `argv` with `--luo-manifest-fd` set to `manifest_fd`: the value replaced
// where the option is already there (a rollback typically reuses this
// process's own argv, whose manifest fd is closed by now), appended otherwise.
std::vector<std::string> with_manifest_fd(std::vector<std::string> argv, int manifest_fd) {
  const std::string value = std::to_string(manifest_fd);
  const std::string joined_prefix = std::string(kManifestFdOption) + "=";
  bool found = false;
  for (size_t i = 1; i < argv.size(); ++i) {
    if (argv[i] == kManifestFdOption) {
      if (i + 1 == argv.size()) argv.emplace_back();  // the option without its value
      argv[++i] = value;
      found = true;
    } else if (argv[i].starts_with(joined_prefix)) {
      argv[i] = joined_prefix + value;
      found = true;
    }
  }
  if (!found) {
    argv.emplace_back(kManifestFdOption);
    argv.push_back(value);
  }
  return argv;
}

// Execs `request` with exactly `kept` and `request.extra_fds` (and stdio)
// inherited: every other fd >= 3 is marked FD_CLOEXEC first. Returns only on
// failure, with every fd's FD_CLOEXEC flag as it was. `what` names the
// handover in the log; `what_now` says, in errors, what the caller can do.
Result<void> exec_inheriting(const ExecSyscalls& syscalls, const ExecRequest& request, std::vector<int> kept,
                             std::string_view what, std::string_view what_now) {
  if (request.argv.empty()) return fail("exec needs argv[0]", EINVAL);

  // Everything that allocates happens before the fd flags change.
  std::vector<char*> argv;
  for (const auto& arg : request.argv) argv.push_back(const_cast<char*>(arg.c_str()));
  argv.push_back(nullptr);
  std::vector<char*> envp;
  if (request.envp) {
    for (const auto& var : *request.envp) envp.push_back(const_cast<char*>(var.c_str()));
    envp.push_back(nullptr);
  }
  char* const* env = request.envp ? envp.data() : environ;

  for (int fd : request.extra_fds) {
    if (fd < 3) continue;  // stdio is always inherited
    if (::fcntl(fd, F_GETFD) < 0) {
      return fail(fmt::format("extra fd {} to hand to the new vmm is not open", fd), EBADF);
    }
    kept.push_back(fd);
  }
  VMM_TRY_ASSIGN(snapshot, snapshot_fd_flags());

  // Only the handed-over fds may cross: a leaked fd would keep, say, an old
  // vCPU or a client connection alive in the new vmm.
  if (::close_range(3, ~0U, CLOSE_RANGE_CLOEXEC) != 0) {
    for (const auto& [fd, flags] : snapshot) (void)::fcntl(fd, F_SETFD, flags | FD_CLOEXEC);
  }
  for (int fd : kept) {
    if (auto cleared = set_cloexec(fd, false); !cleared) {
      restore_fd_flags(snapshot);
      return std::unexpected(cleared.error());
    }
  }

  spdlog::info("luo: {}: exec {} with {} inherited fd(s)", what, request.path, kept.size());
  syscalls.execve(request.path.c_str(), argv.data(), env);
  const int code = errno;
  restore_fd_flags(snapshot);
  return std::unexpected(exec_error(code, request.path, what_now));
}

}  // namespace

struct ExecBackend::Registry {
  ExecOptions options;
  std::vector<std::shared_ptr<SessionState>> outgoing;
  std::vector<std::shared_ptr<SessionState>> incoming;
  UniqueFd manifest;  // valid while prepared for exec
  // Made by from_manifest(): `incoming` came from a previous process (and what
  // is left of it can be passed on).
  bool adopted = false;

  [[nodiscard]] bool prepared() const { return manifest.valid(); }

  void forget(std::vector<std::shared_ptr<SessionState>>& list, const SessionState* state) {
    std::erase_if(list, [&](const auto& s) { return s.get() == state; });
  }
};

namespace {

class ExecSession final : public Session {
 public:
  ExecSession(std::shared_ptr<ExecBackend::Registry> registry, std::shared_ptr<SessionState> state)
      : registry_(std::move(registry)), state_(std::move(state)) {}

  ~ExecSession() override {
    if (state_->incoming) {
      // Like closing a retrieved session fd: finish it; if it can't finish,
      // the backend keeps holding its files (until the next exec discards them).
      if (auto done = finish(); !done) {
        spdlog::warn("luo: session '{}' dropped without finishing: {}", state_->name, done.error().describe());
        return;
      }
      registry_->forget(registry_->incoming, state_.get());
      return;
    }
    if (!state_->released) {
      if (registry_->prepared()) {
        spdlog::warn("luo: session '{}' destroyed while prepared for exec: cancelling the exec", state_->name);
        registry_->manifest.reset();
      }
      if (!state_->files.empty()) {
        spdlog::info("luo: session '{}' cancelled: unpreserving {} file(s)", state_->name, state_->files.size());
      }
      state_->files.clear();  // closes the session's dups
    }
    registry_->forget(registry_->outgoing, state_.get());
  }

  [[nodiscard]] const std::string& name() const override { return state_->name; }
  [[nodiscard]] bool incoming() const override { return state_->incoming; }

  [[nodiscard]] Result<void> preserve(FdRef fd, uint64_t token) override {
    if (state_->incoming) {
      return fail(fmt::format("session '{}' came from the previous process: preserve into a session made "
                              "with create_session()",
                              state_->name),
                  EINVAL);
    }
    if (state_->released) {
      return fail(fmt::format("session '{}' was already handed over", state_->name), EINVAL);
    }
    if (registry_->prepared()) {
      return fail(fmt::format("cannot preserve into session '{}': it is frozen for exec; cancel_exec() "
                              "first",
                              state_->name),
                  EBUSY);
    }
    // Same order of checks as luo_preserve_file().
    if (state_->find(token) != nullptr) {
      return fail(fmt::format("token {:#x} is already used in LUO session '{}': tokens must be unique "
                              "within a session",
                              token, state_->name),
                  EEXIST);
    }
    if (state_->files.size() >= kMaxFilesPerSession) {
      return fail(fmt::format("LUO session '{}' is full ({} files): spread the files over more sessions",
                              state_->name, kMaxFilesPerSession),
                  ENOSPC);
    }
    VMM_TRY_ASSIGN(info, inspect_fd(fd));
    if (info.kind == FileKind::other) return std::unexpected(no_handler_error(fd.get(), info));
    if (info.kind == FileKind::guest_memfd && info.size == 0) {
      // kvm_gmem_luo_preserve() refuses an empty guest_memfd.
      return fail(fmt::format("guest_memfd fd {} has size 0: nothing to preserve", fd.get()), EINVAL);
    }

    VMM_TRY_ASSIGN(copy, dup_cloexec(fd.get()));
    if (info.kind == FileKind::memfd) VMM_TRY(seal_against_resize(copy.get(), fd.get()));

    PreservedFile file;
    file.token = token;
    file.kind = info.kind;
    file.fd = std::move(copy);
    file.size = info.size;
    file.dev = info.dev;
    file.ino = info.ino;
    spdlog::debug("luo: session '{}' preserved fd {} ({}, {}) as token {:#x} (fd {} kept)", state_->name,
                  fd.get(), to_string(info.kind), info.link, token, file.fd.get());
    state_->files.push_back(std::move(file));
    return {};
  }

  [[nodiscard]] Result<UniqueFd> retrieve(uint64_t token) override {
    if (!state_->incoming) {
      return fail(fmt::format("session '{}' is outgoing: files are retrieved from a session given by "
                              "retrieve_session() in the new process",
                              state_->name),
                  EINVAL);
    }
    PreservedFile* file = state_->find(token);
    if (file == nullptr) {
      return fail(fmt::format("no file with token {:#x} in LUO session '{}'{}", token, state_->name,
                              state_->finished ? " (the session is finished)" : ""),
                  ENOENT);
    }
    if (file->retrieve_status < 0) {
      // luo_retrieve_file(): a failed retrieve returns its error forever.
      return std::unexpected(file->retrieve_error.with_context("an earlier retrieve failed and retrieve "
                                                               "failures are sticky"));
    }
    if (file->retrieve_status == 0) {
      if (auto first = retrieve_first_time(*file); !first) {
        file->retrieve_status = -1;
        file->retrieve_error = first.error();
        return std::unexpected(first.error());
      }
      file->retrieve_status = 1;
    }
    // Every retrieve hands out a new descriptor for the same file.
    return dup_cloexec(file->handout_source());
  }

  [[nodiscard]] Result<void> finish() override {
    if (!state_->incoming) {
      return fail(fmt::format("session '{}' is outgoing: only a retrieved session can be finished",
                              state_->name),
                  EINVAL);
    }
    if (state_->finished) return {};
    for (const auto& file : state_->files) {
      if (file.kind != FileKind::guest_memfd || file.retrieve_status <= 0) continue;
      const PreservedFile* vm = state_->find(file.vm_token);
      if (vm == nullptr || vm->retrieve_status <= 0) {
        return fail(fmt::format("LUO session '{}' can't finish: guest_memfd token {:#x} was retrieved but "
                                "its VM (token {:#x}) was not; retrieve the VM first",
                                state_->name, file.token, file.vm_token),
                    EBUSY);
      }
    }
    size_t dropped = 0;
    for (const auto& file : state_->files) dropped += file.retrieve_status > 0 ? 0 : 1;
    if (dropped > 0) {
      spdlog::info("luo: session '{}' finished with {} file(s) never retrieved: dropped", state_->name, dropped);
    }
    state_->files.clear();  // closes the inherited fds, the old VM and our new-VM reference
    state_->finished = true;
    return {};
  }

 private:
  Result<void> retrieve_first_time(PreservedFile& file) {
    switch (file.kind) {
      case FileKind::kvm_vm: {
        // The inherited VM fd is unusable after exec (every ioctl fails with
        // EIO), exactly like the kernel gives the new kernel a brand-new empty
        // VM: create one. The old VM stays open until finish.
        auto vm = registry_->options.vm_factory();
        if (!vm) {
          return std::unexpected(vm.error().with_context(
              fmt::format("retrieving VM token {:#x} of session '{}' needs a new KVM VM", file.token,
                          state_->name)));
        }
        file.new_vm = std::move(*vm);
        spdlog::debug("luo: session '{}' token {:#x}: new VM fd {} replaces inherited VM fd {}", state_->name,
                      file.token, file.new_vm.get(), file.fd.get());
        return {};
      }
      case FileKind::guest_memfd: {
        // The guest_memfd series: "VM FD must be retrieved first" -> EAGAIN.
        const PreservedFile* vm = state_->find(file.vm_token);
        if (vm == nullptr || vm->retrieve_status <= 0) {
          return fail(fmt::format("guest_memfd token {:#x} in LUO session '{}': its VM (token {:#x}) must "
                                  "be retrieved first",
                                  file.token, state_->name, file.vm_token),
                      EAGAIN);
        }
        return {};
      }
      case FileKind::memfd:
        return {};
      case FileKind::other:
        break;
    }
    return fail(fmt::format("token {:#x}: no LUO handler for its kind", file.token), ENOENT);
  }

  std::shared_ptr<ExecBackend::Registry> registry_;
  std::shared_ptr<SessionState> state_;
};

}  // namespace

VmFactory kvm_vm_factory(const std::string& kvm_device) {
  return [kvm_device]() -> Result<UniqueFd> {
    VMM_TRY_ASSIGN(system, kvm::System::open(kvm_device));
    VMM_TRY_ASSIGN(vm, system.create_vm());
    return std::move(vm).take_fd();
  };
}

ExecSyscalls real_exec_syscalls() { return ExecSyscalls{&::execve}; }

std::vector<std::string> ExecHandover::manifest_args() const {
  return {kManifestFdOption, std::to_string(manifest_fd)};
}

std::unique_ptr<ExecBackend> ExecBackend::create(ExecOptions options) {
  auto registry = std::make_shared<Registry>();
  registry->options = std::move(options);
  return std::unique_ptr<ExecBackend>(new ExecBackend(std::move(registry)));
}

ExecBackend::~ExecBackend() = default;

bool ExecBackend::prepared() const { return registry_->prepared(); }

Result<std::unique_ptr<Session>> ExecBackend::create_session(std::string_view name) {
  VMM_TRY(validate_session_name(name));
  if (registry_->prepared()) {
    return fail(fmt::format("cannot create LUO session '{}' while prepared for exec: cancel_exec() first", name),
                EBUSY);
  }
  const bool taken = std::ranges::any_of(registry_->outgoing, [&](const auto& s) { return s->name == name; });
  if (taken) {
    return fail(fmt::format("LUO session '{}' already exists: pick another name, or destroy the old "
                            "session first",
                            name),
                EEXIST);
  }
  auto state = std::make_shared<SessionState>();
  state->name = std::string(name);
  registry_->outgoing.push_back(state);
  return std::make_unique<ExecSession>(registry_, std::move(state));
}

Result<std::unique_ptr<Session>> ExecBackend::retrieve_session(std::string_view name) {
  VMM_TRY(validate_session_name(name));
  auto it = std::ranges::find_if(registry_->incoming, [&](const auto& s) { return s->name == name; });
  if (it == registry_->incoming.end()) {
    return fail(fmt::format("no LUO session '{}' was handed over by the previous vmm", name), ENOENT);
  }
  if ((*it)->retrieved) {
    return fail(fmt::format("LUO session '{}' was already retrieved: use the session you got the first time",
                            name),
                EINVAL);
  }
  (*it)->retrieved = true;
  return std::make_unique<ExecSession>(registry_, *it);
}

Result<ExecHandover> ExecBackend::prepare_exec() {
  if (registry_->prepared()) return fail("already prepared for exec: exec() or cancel_exec()", EBUSY);

  manifest::Manifest record;
  ExecHandover handover;
  // vm_tokens are only committed once the whole freeze succeeded.
  std::vector<std::pair<PreservedFile*, uint64_t>> vm_tokens;
  for (const auto& session : registry_->outgoing) {
    if (session->released) continue;
    const PreservedFile* vm = nullptr;
    size_t vm_count = 0;
    for (const auto& file : session->files) {
      if (file.kind == FileKind::kvm_vm) {
        vm = &file;
        ++vm_count;
      }
    }
    manifest::SessionEntries entries{session->name, {}};
    for (auto& file : session->files) {
      uint64_t vm_token = 0;
      if (file.kind == FileKind::guest_memfd) {
        // The kernel asks the guest_memfd for its VM and looks that VM up in
        // the session (liveupdate_get_token_outgoing). Userspace can't ask a
        // guest_memfd which VM it belongs to, so the session's only VM is it.
        if (vm_count == 0) {
          return fail(fmt::format("freeze failed: guest_memfd token {:#x} in LUO session '{}' has no KVM VM "
                                  "in that session; preserve the VM that owns it in the same session",
                                  file.token, session->name),
                      ENOENT);
        }
        if (vm_count > 1) {
          return fail(fmt::format("freeze failed: LUO session '{}' holds {} KVM VMs and a guest_memfd (token "
                                  "{:#x}); the exec backend can't tell which VM owns it: use one session "
                                  "per VM",
                                  session->name, vm_count, file.token),
                      EINVAL);
        }
        vm_token = vm->token;
        vm_tokens.emplace_back(&file, vm_token);
      }
      auto info = inspect_fd(file.fd.ref());
      if (!info) return std::unexpected(info.error().with_context("freeze failed"));
      entries.entries.push_back(manifest::Entry{file.token, file.fd.get(), file.kind, vm_token, info->size,
                                                static_cast<uint64_t>(info->dev),
                                                static_cast<uint64_t>(info->ino)});
      handover.preserved_fds.push_back(file.fd.get());
    }
    record.sessions.push_back(std::move(entries));
  }

  VMM_TRY_ASSIGN(fd, write_manifest(record));

  for (auto& [file, vm_token] : vm_tokens) file->vm_token = vm_token;
  handover.manifest_fd = fd.get();
  handover.preserved_fds.push_back(fd.get());
  std::ranges::sort(handover.preserved_fds);
  registry_->manifest = std::move(fd);
  spdlog::info("luo: prepared for exec: {} session(s), {} file(s), manifest fd {}", record.sessions.size(),
               handover.preserved_fds.size() - 1, handover.manifest_fd);
  return handover;
}

void ExecBackend::cancel_exec() {
  if (!registry_->prepared()) return;
  registry_->manifest.reset();
  spdlog::info("luo: exec cancelled: sessions unfrozen");
}

Result<void> ExecBackend::exec(const ExecRequest& request) {
  if (!registry_->prepared()) return fail("not prepared for exec: call prepare_exec() first", EINVAL);
  std::vector<int> kept{registry_->manifest.get()};
  for (const auto& session : registry_->outgoing) {
    for (const auto& file : session->files) kept.push_back(file.fd.get());
  }
  return exec_inheriting(registry_->options.syscalls, request, std::move(kept), "handover",
                         "the VM can resume on this binary (cancel_exec())");
}

Result<void> ExecBackend::pass_on(const ExecRequest& request) {
  if (!registry_->adopted) {
    return fail("pass_on hands on the sessions a previous vmm handed over, and this backend has none: it was "
                "made by create(); use from_manifest() in the new process",
                EINVAL);
  }
  // Checked before argv gets the manifest option, which would make it look non-empty.
  if (request.argv.empty()) return fail("exec needs argv[0]", EINVAL);

  // Exactly what arrived, minus what this process finished: the inherited fds
  // and their original entries, whatever retrieve did here. The next process
  // makes its own new VM and its own (non-sticky) retrieves.
  manifest::Manifest record;
  std::vector<int> kept;
  std::string names;
  for (const auto& session : registry_->incoming) {
    if (session->finished) continue;  // the kernel drops finished sessions too
    manifest::SessionEntries entries{session->name, {}};
    for (const auto& file : session->files) {
      const manifest::Entry entry = file.inherited_entry();
      // The next process's from_manifest() would refuse the whole manifest,
      // leaving nothing to retry with; refuse here, where the sessions still are.
      VMM_TRY(with_context(check_entry_fd(entry, session->name, "this process closed an inherited fd"),
                           "cannot pass on LUO sessions"));
      entries.entries.push_back(entry);
      kept.push_back(entry.fd);
    }
    names += fmt::format("{}'{}' ({} file(s))", names.empty() ? "" : ", ", session->name, entries.entries.size());
    record.sessions.push_back(std::move(entries));
  }
  if (record.sessions.empty()) {
    return fail("nothing to pass on: every LUO session the previous vmm handed over is finished here", ENOENT);
  }

  VMM_TRY_ASSIGN(manifest_fd, write_manifest(record));
  kept.push_back(manifest_fd.get());
  ExecRequest next = request;
  next.argv = with_manifest_fd(request.argv, manifest_fd.get());
  auto done = exec_inheriting(registry_->options.syscalls, next, std::move(kept),
                              fmt::format("passing on unfinished session(s) {} with manifest fd {}", names,
                                          manifest_fd.get()),
                              "the sessions are still here, unfinished: pass them on again (another binary?)");
  // Only on failure: the manifest closes with `manifest_fd`; the sessions are untouched.
  return with_context(std::move(done), fmt::format("passing on LUO session(s) {}", names));
}

void ExecBackend::release_after_handover() {
  for (const auto& session : registry_->outgoing) {
    for (auto& file : session->files) (void)file.fd.release();
    session->files.clear();
    session->released = true;
  }
  registry_->outgoing.clear();
  (void)registry_->manifest.release();
}

Result<std::unique_ptr<ExecBackend>> ExecBackend::from_manifest(int manifest_fd, ExecOptions options) {
  const std::string option = fmt::format("{} {}", kManifestFdOption, manifest_fd);
  if (manifest_fd < 3) return fail(fmt::format("{}: not a manifest fd (stdio)", option), EBADF);
  auto manifest_info = inspect_fd(FdRef(manifest_fd));
  if (!manifest_info) {
    return fail(fmt::format("{}: fd {} is not open in this process; the old vmm did not hand a manifest over",
                            option, manifest_fd),
                EBADF);
  }
  if (manifest_info->kind != FileKind::memfd) {
    return fail(fmt::format("{}: fd {} ({}) is not a LUO exec manifest (not a memfd)", option, manifest_fd,
                            manifest_info->link),
                EINVAL);
  }
  if (manifest_info->size > kMaxManifestSize) {
    return fail(fmt::format("{}: fd {} holds {} bytes, too large for a LUO exec manifest", option, manifest_fd,
                            manifest_info->size),
                EINVAL);
  }
  std::vector<uint8_t> bytes(manifest_info->size);
  size_t got = 0;
  while (got < bytes.size()) {
    const ssize_t n = ::pread(manifest_fd, bytes.data() + got, bytes.size() - got, static_cast<off_t>(got));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) return fail_errno(fmt::format("{}: reading the manifest", option));
    if (n == 0) break;
    got += static_cast<size_t>(n);
  }
  bytes.resize(got);
  auto decoded = manifest::decode(bytes);
  if (!decoded) return std::unexpected(decoded.error().with_context(option));

  // Check every fd before adopting any of them.
  for (const auto& session : decoded->sessions) {
    for (const auto& entry : session.entries) {
      VMM_TRY(with_context(check_entry_fd(entry, session.name, "the old vmm did not hand it over"), option));
    }
  }

  auto registry = std::make_shared<Registry>();
  registry->options = std::move(options);
  registry->adopted = true;
  size_t files = 0;
  for (auto& session : decoded->sessions) {
    auto state = std::make_shared<SessionState>();
    state->name = session.name;
    state->incoming = true;
    for (const auto& entry : session.entries) {
      // Like the kernel's retrieved files, inherited fds are close-on-exec.
      VMM_TRY(set_cloexec(entry.fd, true));
      PreservedFile file;
      file.token = entry.token;
      file.kind = entry.kind;
      file.fd = UniqueFd(entry.fd);
      file.size = entry.size;
      file.dev = entry.dev;
      file.ino = entry.ino;
      file.vm_token = entry.vm_token;
      state->files.push_back(std::move(file));
      ++files;
    }
    registry->incoming.push_back(std::move(state));
  }
  ::close(manifest_fd);
  spdlog::info("luo: adopted {} session(s), {} file(s) from the exec manifest", registry->incoming.size(), files);
  return std::unique_ptr<ExecBackend>(new ExecBackend(std::move(registry)));
}

}  // namespace vmm::luo
