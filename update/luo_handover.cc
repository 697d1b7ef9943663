// The exec, kexec and fdstore handovers: each carries the VM in a session
// (the userspace backend across execve, the kernel's across kexec, systemd's
// fd store across a stop of the service). They share the session's
// preparation; they differ in how the new side starts.
#include <fcntl.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <optional>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "luo/exec_backend.h"
#include "luo/kernel_backend.h"
#include "luo/kexec.h"
#include "update/fd_store.h"
#include "update/handover.h"
#include "update/kexec_support.h"
#include "update/restore.h"
#include "update/session_source.h"
#include "update/state_memfd.h"
#include "update/versions.h"
#include "vmm/control/server.h"

namespace vmm {
namespace {

using namespace std::chrono;

// The session every LUO mode fills before the pause: the VM fd (where the
// backend can carry it), every memory region's file and the pre-sized state
// memfd, each under its token.
struct LuoSession {
  std::unique_ptr<luo::Session> session;
  StateMemfd state;

  Result<PreparedHandover> fill(luo::Backend& backend, HandoverContext& context, bool preserve_vm) {
    Machine& machine = context.machine;
    VMM_TRY_ASSIGN(created, backend.create_session(machine.config().name));
    session = std::move(created);
    if (preserve_vm) VMM_TRY(with_context(session->preserve(machine.vm_fd(), kVmToken), "preserving the VM"));
    const auto& regions = machine.memory().regions();
    for (size_t i = 0; i < regions.size(); ++i)
      VMM_TRY(with_context(session->preserve(regions[i]->fd(), kFirstRegionToken + i),
                           "preserving memory region '" + regions[i]->spec().name + "'"));
    if (context.request.faults.fault == Fault::preserve_refused) {
      // An eventfd: a kind of file no LUO handler takes.
      UniqueFd unsupported(::eventfd(0, EFD_CLOEXEC));
      VMM_TRY(with_context(session->preserve(unsupported.ref(), kRecordToken + 1), "preserving an injected eventfd"));
    }
    const bool too_small = context.request.faults.fault == Fault::state_too_large;
    VMM_TRY(state.create(too_small ? 4096 : state_memfd_size(machine.config().vcpus, machine.memory().regions().size())));
    VMM_TRY(with_context(session->preserve(state.fd.ref(), kStateToken), "preserving the state memfd"));
    return PreparedHandover{state.mapping.bytes(), preserve_vm ? kVmToken : 0};
  }

  // An outgoing session dropped before the handover is cancelled.
  void release() {
    session.reset();
    state = StateMemfd();
  }
};

// What every new side needs to know, whatever the mode.
HandoverRecord base_record(HandoverContext& context) {
  HandoverRecord handover;
  handover.mode = context.request.mode;
  handover.session = context.machine.config().name;
  handover.launch = context.launch;
  handover.record = context.record;
  if (context.command.id) handover.reply_id = *context.command.id;
  if (fault_acts_in_luo_restore(context.request.faults.fault)) handover.fault = context.request.faults.fault;
  return handover;
}

class ExecHandover final : public Handover {
 public:
  Result<PreparedHandover> prepare(HandoverContext& context) override {
    // Before anything is preserved: can the new binary read what we hand it?
    // A binary of other handover versions, or not a vmm at all, is refused
    // here, with the guest still running.
    if (context.request.faults.fault != Fault::skip_version_check) {
      VMM_TRY_ASSIGN(theirs, query_versions(context.request.binary, seconds(10)));
      VMM_TRY(check_compatible(this_binary_versions(), theirs, "exec"));
    }
    backend_ = luo::ExecBackend::create();
    // The exec backend carries every kind of file, the VM fd included.
    return session_.fill(*backend_, context, true);
  }

  Result<void> hand_over(HandoverContext& context, size_t) override {
    VMM_TRY_ASSIGN(prepared, backend_->prepare_exec());
    HandoverRecord handover = base_record(context);
    // The rollback target is this very binary, by descriptor: after a package
    // upgrade its path names the new file, but the descriptor still runs the old.
    own_exe_.reset(::open("/proc/self/exe", O_RDONLY | O_CLOEXEC));
    if (!own_exe_) return fail_errno("cannot open this vmm's own binary for a rollback");
    std::vector<int> inherited{own_exe_.get()};
    handover.fds.push_back(own_exe_.get());  // kRollbackBinarySlot
    handover.luo_manifest = handover.fds.size();
    handover.fds.push_back(prepared.manifest_fd);
    if (context.server) {
      handover.listening_socket = handover.fds.size();
      handover.fds.push_back(context.server->listening_fd().get());
      inherited.push_back(context.server->listening_fd().get());
    }
    if (context.command.connection_fd >= 0) {
      handover.connection = handover.fds.size();
      handover.fds.push_back(context.command.connection_fd);
      inherited.push_back(context.command.connection_fd);
    }
    handover.record.handover_started_ns = monotonic_ns();
    VMM_TRY_ASSIGN(record_fd, write_handover_memfd(handover));
    record_fd_ = std::move(record_fd);
    inherited.push_back(record_fd_.get());
    const std::vector<std::string> argv{context.request.binary, "restore", "--handover-fd",
                                        std::to_string(record_fd_.get())};
    spdlog::info("live update: exec {}", context.request.binary);
    // New connections wait in the listen backlog for the new process rather
    // than being accepted here and cut off by the exec.
    if (context.server) {
      context.server->stop_accepting();
      stopped_accepting_ = true;
    }
    auto exec = backend_->exec(luo::ExecRequest{context.request.binary, argv, std::nullopt, inherited});
    // Only a failed exec comes back here.
    return exec ? fail("exec returned") : std::unexpected(exec.error());
  }

  void cancel(HandoverContext& context) override {
    if (context.server && stopped_accepting_) {
      stopped_accepting_ = false;
      if (auto resumed = context.server->resume_accepting(); !resumed)
        spdlog::error("control socket: {}", resumed.error().describe());
    }
    if (backend_ && backend_->prepared()) backend_->cancel_exec();
    session_.release();
    record_fd_.reset();
    own_exe_.reset();
  }

  pid_t successor() const override { return ::getpid(); }

 private:
  std::unique_ptr<luo::ExecBackend> backend_;
  LuoSession session_;
  UniqueFd own_exe_;
  UniqueFd record_fd_;
  bool stopped_accepting_ = false;
};

class KexecHandover final : public Handover {
 public:
  Result<PreparedHandover> prepare(HandoverContext& context) override {
    const UpdateRequest& request = context.request;
    // The new kernel must be at hand before anything is preserved.
    for (const std::string* image : {&request.kernel, &request.initrd}) {
      if (image->empty()) continue;
      UniqueFd file(::open(image->c_str(), O_RDONLY | O_CLOEXEC));
      if (!file) return fail_errno("cannot open the kexec image '" + *image + "'");
    }
    // What this kernel can carry, before anything is loaded or preserved: a
    // VM it cannot carry is refused here, with the guest running.
    VMM_TRY_ASSIGN(support, kexec_support(context.launch.kvm_device, seconds(10), &context.cancelled));
    VMM_TRY(check_kexec_support(support, context.machine));
    // The LUO agent when one answers, else the device (update/session_source.h).
    // With an agent, its registry restores this VM after the kexec as launched.
    SessionSourceOptions source_options = session_source_options();
    source_options.restore_args = restore_arguments(context.launch);
    VMM_TRY_ASSIGN(source, open_session_source(source_options, &context.cancelled));
    spdlog::info("live update: kexec with sessions from the {} ({})", source.kind, source.where);
    std::unique_ptr<luo::Backend> backend = std::move(source.backend);
    // Loaded now, while the guest still runs, so the load stays out of the
    // blackout. Like `kexec --reuse-cmdline`, the running kernel's command
    // line is the default. A coordinated update's coordinator loads the one
    // kernel for every VM instead.
    if (!request.coordinated) {
      std::string cmdline = request.cmdline;
      if (cmdline.empty()) {
        VMM_TRY_ASSIGN(current, luo::Kexec::current_cmdline());
        cmdline = current;
      }
      VMM_TRY(kexec_.load(luo::KexecImage{request.kernel,
                                          request.initrd.empty() ? std::nullopt : std::optional(request.initrd),
                                          cmdline}));
    }
    // A kernel without a KVM LUO handler (mainline 7.x) gets no VM fd: the
    // new kernel's vmm builds a new VM around the memfds, as after an exec.
    VMM_TRY_ASSIGN(prepared, session_.fill(*backend, context, support.vm_fd.preservable));
    // The session lives as long as its own descriptor (and the agent's, with
    // an agent): the device is not needed again, and another vmm may want it
    // (it is single-open).
    backend.reset();
    // Every VM of the host prepares before any of them freezes, so no
    // blackout holds another VM's prepare.
    if (request.coordinated) {
      spdlog::info("live update: prepared for the host's kexec; waiting for the coordinator to let it freeze");
      VMM_TRY(context.gate.wait_at(UpdateGate::Stop::freeze, context.command.connection_fd, context.cancelled));
    }
    return prepared;
  }

  Result<void> hand_over(HandoverContext& context, size_t) override {
    // The record rides in the session too: the new kernel's vmm reads it back.
    HandoverRecord handover = base_record(context);
    handover.record.handover_started_ns = monotonic_ns();
    VMM_TRY_ASSIGN(record_fd, write_handover_memfd(handover));
    record_fd_ = std::move(record_fd);
    VMM_TRY(with_context(session_.session->preserve(record_fd_.ref(), kRecordToken), "preserving the handover record"));
    // Session fds stay open until the reboot: closing them would unpreserve.
    if (context.request.coordinated) {
      // Frozen and saved: the coordinator kexecs the host once every VM is.
      // Only a cancel (or the coordinator's death) comes back here.
      spdlog::info("live update: frozen for the host's kexec; waiting for the coordinator");
      VMM_TRY(context.gate.wait_at(UpdateGate::Stop::kexec, context.command.connection_fd, context.cancelled));
      return fail("the host kexec did not happen", ECANCELED);
    }
    auto rebooted = kexec_.reboot();
    return rebooted ? fail("reboot returned") : std::unexpected(rebooted.error());
  }

  void cancel(HandoverContext&) override {
    session_.release();
    record_fd_.reset();
    // Nothing may stay staged for the next reboot (kexec_loaded reads 0).
    // (A coordinated update loaded nothing here: a no-op then.)
    if (auto unloaded = kexec_.unload(); !unloaded) spdlog::error("live update: {}", unloaded.error().describe());
  }

  pid_t successor() const override { return ::getpid(); }

 private:
  luo::Kexec kexec_;
  LuoSession session_;
  UniqueFd record_fd_;
};

// The VM goes into systemd's fd store (update/fd_store.h) and this vmm
// exits: the service's next start, after a restart or a `systemctl kexec`,
// restores it. Like kexec without the kexec: the host's shutdown does that.
class FdStoreHandover final : public Handover {
 public:
  Result<PreparedHandover> prepare(HandoverContext& context) override {
    FdStoreBackend backend(fd_store_environment(), real_fd_store_calls());
    // No VM fd: the next start builds a new VM around the memfds.
    return session_.fill(backend, context, false);
  }

  Result<void> hand_over(HandoverContext& context, size_t) override {
    HandoverRecord handover = base_record(context);
    handover.record.handover_started_ns = monotonic_ns();
    VMM_TRY_ASSIGN(record_fd, write_handover_memfd(handover));
    record_fd_ = std::move(record_fd);
    VMM_TRY(with_context(session_.session->preserve(record_fd_.ref(), kRecordToken), "preserving the handover record"));
    auto* stored = dynamic_cast<FdStoreSession*>(session_.session.get());
    if (!stored) return fail("the fd store handover's session is not an fd store session", EINVAL);
    return stored->store(5'000'000);
  }

  void cancel(HandoverContext&) override {
    session_.release();
    record_fd_.reset();
  }

  // Nobody runs the VM until the service starts again.
  pid_t successor() const override { return 0; }

 private:
  LuoSession session_;
  UniqueFd record_fd_;
};

}  // namespace

std::unique_ptr<Handover> make_fd_store_handover() { return std::make_unique<FdStoreHandover>(); }
std::unique_ptr<Handover> make_exec_handover() { return std::make_unique<ExecHandover>(); }
std::unique_ptr<Handover> make_kexec_handover() { return std::make_unique<KexecHandover>(); }

}  // namespace vmm
