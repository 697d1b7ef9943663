#include "vmm/runtime.h"

#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <cstring>

#include <spdlog/spdlog.h>

#include "update/frames.h"
#include "vmm/service_notify.h"

namespace vmm {
namespace {

using nlohmann::json;
using namespace std::chrono;

// Waits until a signal arrives (returns its number) or the machine asks to
// shut down (returns 0).
int wait_for_shutdown(Machine& machine, FdRef signals) {
  pollfd fds[2] = {{signals.get(), POLLIN, 0}, {machine.shutdown_fd().get(), POLLIN, 0}};
  while (true) {
    if (::poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      machine.request_shutdown("poll failed in the main loop", false);
      return 0;
    }
    if (fds[0].revents & POLLIN) {
      signalfd_siginfo info{};
      if (::read(signals.get(), &info, sizeof info) == sizeof info) return static_cast<int>(info.ssi_signo);
      continue;
    }
    if (fds[1].revents & POLLIN) return 0;
  }
}

std::string signal_reason(int signal) {
  const char* name = sigabbrev_np(signal);
  return name ? std::string("received SIG") + name : "received a signal";
}

}  // namespace

Result<UniqueFd> shutdown_signals() {
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  if (pthread_sigmask(SIG_BLOCK, &signals, nullptr) != 0) return fail("cannot block SIGINT/SIGTERM");
  UniqueFd fd(::signalfd(-1, &signals, SFD_CLOEXEC | SFD_NONBLOCK));
  if (!fd) return fail_errno("cannot create a signalfd");
  return fd;
}

Runtime::Runtime(std::unique_ptr<Machine> built, LaunchOptions launch_options, UpdateRecord record)
    : machine(std::move(built)),
      update(std::make_unique<LiveUpdate>(*machine, launch_options, std::move(record))),
      commands(std::make_unique<MachineCommands>(*machine, *update)),
      launch(std::move(launch_options)) {}

Runtime::~Runtime() {
  if (update) update->cancel();
  if (server) server->stop();
  if (machine) {
    machine->stop();
    machine->set_event_sink({});
  }
}

Result<void> Runtime::serve_socket(UniqueFd inherited) {
  const std::string& path = launch.control_socket_path;
  if (path.empty()) return {};
  if (inherited) {
    VMM_TRY_ASSIGN(adopted, control::Server::adopt(std::move(inherited), path, *commands));
    server = std::move(adopted);
  } else {
    VMM_TRY_ASSIGN(listening, control::Server::listen(path, *commands));
    server = std::move(listening);
  }
  update->set_control_server(server.get());
  machine->set_event_sink([this](const std::string& name, const json& data) { server->emit_event(name, data); });
  return {};
}

int Runtime::wait(FdRef signals) {
  // The VM runs and the control socket answers: a Type=notify service is up.
  notify_ready(machine->config().name);
  if (const int signal = wait_for_shutdown(*machine, signals); signal != 0) {
    // A systemd service's stop (a restart, `systemctl kexec`): the VM goes
    // into the service's fd store for its next start, the update's phases
    // and all; only when that fails does it stop with the vmm.
    if (signal == SIGTERM && launch.on_sigterm == "fd-store") {
      spdlog::info("SIGTERM: putting the VM into the service's fd store");
      auto stored = update->run(json{{"mode", "fdstore"}}, control::CommandContext{});
      if (!stored) spdlog::error("SIGTERM: {}; the VM stops with the vmm", stored.error().desc);
    }
    if (machine->shutdown_reason().empty()) machine->request_shutdown(signal_reason(signal), false);
  }
  // After a transfer the service is the new process, before this one exits.
  if (update->handed_over() && update->successor() > 0) notify_main_pid(update->successor());
  else notify_stopping(machine->shutdown_reason());
  // An update in progress stops waiting for its new side and cancels.
  update->cancel();
  if (update->handed_over()) {
    // The teardown that follows (the VM's page tables, its mappings) runs
    // at idle priority: the guest now runs in the new process on the same CPUs.
    sched_param idle{};
    ::sched_setscheduler(0, SCHED_IDLE, &idle);
  }
  machine->stop();
  machine->set_event_sink({});
  if (server) {
    // After a transfer the socket at the path is the new process's: leave it.
    if (update->handed_over() && update->successor() > 0) {
      UniqueFd released = server->detach();
    } else {
      server->stop();
    }
  }
  return machine->shutdown_failed() ? 1 : 0;
}

int complete(Arrival arrival, FdRef signals) {
  HandoverRecord& handover = arrival.handover;
  UpdateRecord record = handover.record;
  const bool rollback = !handover.previous_failure.empty();
  Runtime runtime(std::move(arrival.machine), handover.launch, record);
  // Whatever lives beside the VM (a prefault thread on its memory) goes first.
  struct ReleaseFirst {
    std::shared_ptr<void>& held;
    ~ReleaseFirst() { held.reset(); }
  } release_first{arrival.keep_alive};
  // The point of no return for this side: from here on it owns the VM. No
  // client is served before it (a transfer's old process may still resume).
  if (auto committed = arrival.commit(); !committed) return arrival.give_up(committed.error());
  if (auto served = runtime.serve_socket(std::move(arrival.listening_socket)); !served) {
    // After a transfer's "go" the VM is this process's whatever happens: it
    // runs on without a socket rather than be lost.
    if (handover.mode != "transfer") return arrival.give_up(served.error().with_context("serving the control socket"));
    spdlog::error("live update: the control socket could not be taken over: {}", served.error().describe());
  }
  if (arrival.was_running) {
    if (auto resumed = runtime.machine->resume(); !resumed) {
      spdlog::error("live update: cannot resume the VM: {}", resumed.error().describe());
      return 1;
    }
  }
  // The blackout ends here: the vCPUs run again (or, paused before, are ready to).
  const int64_t resumed_ns = monotonic_ns();
  // (After a kexec the start lies before this kernel's boot: negative on its clock.)
  if (record.blackout_started_ns != 0) record.blackout_us = (resumed_ns - record.blackout_started_ns) / 1000;
  record.add_phase("restore", steady_clock::now() - arrival.restore_started);
  // The guest's heartbeat ring holds a few hundred ms: the watch starts
  // first, before the prefault and the FINISH compete with it for the CPU.
  runtime.update->watch_after_resume(arrival.resume_point);
  // This process's page tables for guest RAM start empty; filling them
  // now, beside the guest, takes the host fault out of KVM's re-faults.
  if (arrival.prefault_after_resume) runtime.machine->prefault_in_background();
  if (arrival.after_resume) arrival.after_resume(record);

  check_guest_frames(*runtime.machine, record);
  record.frames_at_prepare.clear();
  record.tsc_saved_khz.reset();
  record.tsc_host_khz.reset();
  record.tsc_khz.reset();
  record.tsc_note.reset();
  if (auto tsc = runtime.machine->tsc_rate_change()) {
    record.tsc_saved_khz = tsc->saved_khz;
    record.tsc_host_khz = tsc->host_khz;
    record.tsc_khz = tsc->khz;
    record.tsc_note = tsc->khz == tsc->saved_khz
                          ? "this host's TSC rate differs from the saved one; KVM runs the guest at its saved rate, "
                            "so the guest sees no change"
                          : "this host's TSC rate differs from the saved one and KVM cannot run the saved rate: the "
                            "guest's TSC now ticks at this host's rate (kvmclock stays right; raw-TSC timekeeping "
                            "drifts by the difference)";
  }
  json reply;
  if (!rollback) {
    record.status = "completed";
    record.error.reset();
    record.failed_phase.reset();
    record.generation += 1;
    spdlog::info("live update ({}) completed: generation {}, blackout {} us, pid {}", record.mode, record.generation,
                 record.blackout_us.value_or(-1), ::getpid());
  } else {
    // This process is the rollback: the VM is back, the update did not happen.
    record.status = "failed";
    record.error = handover.previous_failure + "; rolled back: the previous vmm restored the VM, which is " +
                   (arrival.was_running ? "running" : "paused") + " with its memory intact";
    spdlog::warn("{}", *record.error);
    reply = {{"error", {{"class", control::kGenericError}, {"desc", *record.error}}}};
  }
  runtime.update->record_completed(record);
  // As the record now stands, with the pid and whatever the watchers found.
  if (!rollback) reply = {{"return", runtime.update->query()}};
  if (arrival.connection && runtime.server) {
    if (!handover.reply_id.is_null()) reply["id"] = handover.reply_id;
    runtime.server->adopt_client(std::move(arrival.connection), reply);
  }
  return runtime.wait(signals);
}

}  // namespace vmm
