// The transfer handover, old side: a new vmm process builds the VM before
// the pause and takes it over after (protocol in transfer.h).
#include <unistd.h>

#include <optional>
#include <thread>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "update/handover.h"
#include "update/state_memfd.h"
#include "update/transfer.h"
#include "update/versions.h"
#include "vmm/control/server.h"

namespace vmm {
namespace {

using nlohmann::json;
using namespace std::chrono;

constexpr std::string_view kPrefaulted = "prefaulted";

class TransferHandover final : public Handover {
 public:
  Result<PreparedHandover> prepare(HandoverContext& context) override {
    Machine& machine = context.machine;
    const UpdateRequest& request = context.request;
    if (request.faults.fault != Fault::skip_version_check) {
      VMM_TRY_ASSIGN(theirs, query_versions(request.binary, seconds(10)));
      VMM_TRY(check_compatible(this_binary_versions(), theirs, "transfer"));
    }
    const bool too_small = request.faults.fault == Fault::state_too_large;
    VMM_TRY(state_.create(too_small ? 4096 : state_memfd_size(machine.config().vcpus, machine.memory().regions().size())));

    std::vector<std::string> args;
    if (!context.launch.control_socket_path.empty())
      args.insert(args.end(), {"--control-socket", context.launch.control_socket_path});
    args.insert(args.end(), {"--console", context.launch.console, "--log-level", context.launch.log_level,
                             "--kvm-device", context.launch.kvm_device});
    VMM_TRY_ASSIGN(spawned, transfer::Target::spawn(request.binary, args));
    target_.emplace(std::move(spawned));
    spdlog::info("live update: started {} (pid {}) to take the VM over", request.binary, target_->pid());

    std::vector<FdRef> files;
    memory::MemoryLayout layout;
    for (const auto& region : machine.memory().regions()) {
      files.push_back(region->fd());
      layout.regions.push_back(region->spec());
    }
    files.push_back(state_.fd.ref());
    json hello = {{"name", machine.config().name}, {"vcpus", machine.config().vcpus},
                  {"regions", transfer::layout_to_json(layout)}, {"prefault", request.prefault},
                  {"cpuid", transfer::cpuid_to_json(machine.vcpu_cpuid())}};
    if (request.faults.fault == Fault::target_refuses) hello["x-inject"] = to_string(request.faults.fault);
    VMM_TRY(transfer::send(target_->channel(), "hello", hello, files));
    // Building a VM takes a few ms, plus ~1.5 ms per GiB of memslots here; the
    // page-table prefault runs after "ready", in the background.
    const auto build_timeout = seconds(30) + seconds(machine.config().ram_size >> 30);
    VMM_TRY_ASSIGN(ready, with_context(transfer::receive(target_->channel(), "ready", build_timeout, {},
                                                         &context.cancelled),
                                       "the new vmm could not build the VM"));
    const json& built = ready.body;
    spdlog::info("live update: the new vmm built the VM in {} us",
                 built.contains("prebuild_us") && built["prebuild_us"].is_number() ? built["prebuild_us"].get<int64_t>()
                                                                                   : -1);
    if (request.prefault) VMM_TRY(wait_for_prefault(context));
    // Connections made from here on wait in the backlog for the new process
    // (joining the accept thread takes a while: not inside the blackout).
    if (context.server) {
      context.server->stop_accepting();
      stopped_accepting_ = true;
    }
    // No LUO session: the memory files cross in the hello.
    return PreparedHandover{state_.mapping.bytes(), 0};
  }

  Result<void> hand_over(HandoverContext& context, size_t state_bytes) override {
    const UpdateRequest& request = context.request;
    HandoverRecord handover;
    handover.mode = "transfer";
    handover.session = context.machine.config().name;
    handover.launch = context.launch;
    handover.record = context.record;
    handover.record.handover_started_ns = monotonic_ns();
    handover.state_bytes = state_bytes;
    if (context.command.id) handover.reply_id = *context.command.id;
    if (request.faults.fault == Fault::corrupt_state || request.faults.fault == Fault::target_crash ||
        request.faults.fault == Fault::delay_loaded)
      handover.fault = request.faults.fault;
    std::vector<FdRef> handed;
    if (context.server) {
      handover.listening_socket = handed.size();
      handed.push_back(context.server->listening_fd());
    }
    if (context.command.connection_fd >= 0) {
      handover.connection = handed.size();
      handed.push_back(FdRef(context.command.connection_fd));
    }
    VMM_TRY_ASSIGN(record_fd, write_handover_memfd(handover));
    handed.push_back(record_fd.ref());
    VMM_TRY(transfer::send(target_->channel(), "state", json::object(), handed));

    const milliseconds commit_timeout = request.faults.commit_timeout.value_or(milliseconds(30'000));
    const std::string_view skip[] = {kPrefaulted};
    auto loaded = transfer::receive(target_->channel(), "loaded", commit_timeout, skip, &context.cancelled);
    if (!loaded) {
      // This process alone decides. Whatever the new one does from here on,
      // it meets "abort" or a closed channel and never runs the guest.
      [[maybe_unused]] auto told = transfer::send(target_->channel(), "abort", {{"reason", loaded.error().describe()}});
      return std::unexpected(loaded.error().with_context("the new vmm could not restore the VM"));
    }
    if (request.faults.fault == Fault::delay_go) std::this_thread::sleep_for(milliseconds(300));
    // The point of no return: once "go" is sent, the new process owns the VM.
    if (auto go = transfer::send(target_->channel(), "go"); !go)
      return std::unexpected(go.error().with_context("the new vmm went away before it was told to run the VM"));
    target_->committed();
    // Wait until the guest runs there before tearing this VM down: on a small
    // host the teardown would compete with the resume for the CPUs.
    if (auto resumed = transfer::receive(target_->channel(), "resumed", seconds(10), skip); !resumed)
      spdlog::warn("live update: {}", resumed.error().describe());
    return {};
  }

  void cancel(HandoverContext& context) override {
    if (target_) target_->abort();  // never told "go": it never ran the guest
    if (context.server && stopped_accepting_) {
      stopped_accepting_ = false;
      if (auto resumed = context.server->resume_accepting(); !resumed)
        spdlog::error("control socket: {}", resumed.error().describe());
    }
    state_ = StateMemfd();
  }

  pid_t successor() const override { return target_ ? target_->pid() : -1; }

 private:
  // The new process fills its page tables for guest RAM in the background;
  // the pause waits for that within a budget (about 1 s per GiB here, twice
  // that allowed), then goes ahead anyway: a slower brown-out, not a failure.
  Result<void> wait_for_prefault(HandoverContext& context) {
    const auto budget = seconds(10) + seconds(2 * (context.machine.config().ram_size >> 30));
    auto done = transfer::receive(target_->channel(), std::string(kPrefaulted), budget, {}, &context.cancelled);
    if (!done && done.error().code != ETIMEDOUT) return std::unexpected(done.error());
    if (done) {
      spdlog::debug("live update: the new vmm filled its page tables in {} us",
                    done->body.contains("us") && done->body["us"].is_number() ? done->body["us"].get<int64_t>() : -1);
    } else {
      spdlog::warn("live update: going ahead before the new vmm filled its page tables ({}); the brown-out "
                   "after the update will be longer", done.error().describe());
    }
    return {};
  }

  StateMemfd state_;
  std::optional<transfer::Target> target_;
  bool stopped_accepting_ = false;
};

}  // namespace

std::unique_ptr<Handover> make_transfer_handover() { return std::make_unique<TransferHandover>(); }

}  // namespace vmm
