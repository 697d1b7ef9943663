#include "vmm/commands.h"

#include <algorithm>
#include <cerrno>
#include <stop_token>

#include <fmt/format.h>

#include "base/pagemap.h"

namespace vmm {
namespace {

using nlohmann::json;
using control::CommandError;

std::unexpected<CommandError> generic_error(std::string desc) {
  return std::unexpected(CommandError{control::kGenericError, std::move(desc)});
}

json verify_json(const devices::VerifyResult& result) {
  json out = {{"pages_checked", result.pages_checked},
              {"mismatches", result.mismatches},
              {"duration_us", result.duration.count()}};
  if (result.first_mismatch_gpa) out["first_mismatch_gpa"] = *result.first_mismatch_gpa;
  return out;
}

// The guest's RAM sweep (sweep-ms=N): the latest pass durations, oldest first.
json sweep_json(const devices::TestGuestLink& guest, const devices::GuestStatus& status) {
  constexpr uint64_t kRecentPasses = 8;
  const uint64_t tsc_khz = guest.tsc_khz();
  json recent = json::array();
  if (status.sweep_passes > 0) {
    const uint64_t after = status.sweep_passes > kRecentPasses ? status.sweep_passes - kRecentPasses : 0;
    // The guest may have finished more since `status`: report the same passes.
    for (const auto& pass : guest.sweeps_since(after))
      if (pass.number <= status.sweep_passes) recent.push_back(devices::sweep_pass_us(pass, tsc_khz));
  }
  return {{"period_ms", guest.sweep_ms()},
          {"passes", status.sweep_passes},
          {"last_pass_us", status.last_sweep_us},
          {"recent_pass_us", std::move(recent)}};
}

const char* phase_name(uint64_t phase) {
  switch (phase) {
    case VMM_GUEST_PHASE_BOOTING: return "booting";
    case VMM_GUEST_PHASE_STAMPING: return "stamping";
    case VMM_GUEST_PHASE_RUNNING: return "running";
    default: return "unknown";
  }
}

const char* vcpu_state_name(VcpuThread::State state) {
  switch (state) {
    case VcpuThread::State::created: return "created";
    case VcpuThread::State::running: return "running";
    case VcpuThread::State::paused: return "paused";
    case VcpuThread::State::exited: return "exited";
  }
  return "unknown";
}

}  // namespace

MachineCommands::MachineCommands(Machine& machine, LiveUpdate& update) : machine_(machine), update_(update) {
  add("query-status", {}, [this](const json&, const auto&) { return query_status(); });
  add("stop", {}, [this](const json&, const auto&) -> control::CommandResult {
    if (auto paused = machine_.pause(); !paused) return generic_error(paused.error().describe());
    return json::object();
  });
  add("cont", {}, [this](const json&, const auto&) -> control::CommandResult {
    if (auto resumed = machine_.resume(); !resumed) return generic_error(resumed.error().describe());
    return json::object();
  });
  add("quit", {}, [this](const json&, const auto&) -> control::CommandResult {
    if (auto quitting = machine_.quit("quit requested on the control socket"); !quitting)
      return generic_error(quitting.error().describe());
    return json::object();
  });
  add("query-memory", {"sample-frames"}, [this](const json& args, const auto&) { return query_memory(args); });
  add("query-vcpus", {}, [this](const json&, const auto&) { return query_vcpus(); });
  add("query-guest", {}, [this](const json&, const auto&) { return query_guest(); });
  add("guest-verify", {"timeout"},
      [this](const json& args, const control::CommandContext& context) { return guest_verify(args, context.stop); });
  add("query-memory-hash", {}, [this](const json&, const auto&) { return query_memory_hash(); });
  add("query-live-update", {}, [this](const json&, const auto&) -> control::CommandResult {
    json out = update_.query();
    out["kexec"] = update_.kexec_capability();
    return out;
  });
  add("live-update", {}, [this](const json& args, const control::CommandContext& context) {
    return update_.run(args, context);
  });
  commands_["live-update"].checks_arguments = true;
  // A coordinated kexec update's coordinator (vmmctl host-update), from
  // another connection than the one waiting for live-update's reply.
  add("live-update-continue", {}, [this](const json&, const auto&) -> control::CommandResult {
    if (auto proceeded = update_.continue_coordinated(); !proceeded) return generic_error(proceeded.error().message);
    return json::object();
  });
  add("live-update-cancel", {"reason"}, [this](const json& args, const auto&) -> control::CommandResult {
    if (args.contains("reason") && !args["reason"].is_string())
      return generic_error("Parameter 'reason' expects a string");
    if (auto cancelled = update_.cancel_coordinated(args.value("reason", "")); !cancelled)
      return generic_error(cancelled.error().message);
    return json::object();
  });
  // stop, cont, quit and guest-verify are refused during a live update by
  // the Machine itself (Machine::begin_update), atomically with the update's
  // start: a check here, before the command runs, could not be.
}

void MachineCommands::add(std::string name, std::vector<std::string> allowed_arguments, Command command) {
  commands_.emplace(std::move(name), Entry{std::move(allowed_arguments), std::move(command)});
}

std::vector<std::string> MachineCommands::names() const {
  std::vector<std::string> out;
  for (const auto& [name, entry] : commands_) out.push_back(name);
  return out;
}

control::CommandResult MachineCommands::execute(const std::string& command, const json& arguments) {
  return execute(command, arguments, control::CommandContext{});
}

control::CommandResult MachineCommands::execute(const std::string& command, const json& arguments,
                                                const control::CommandContext& context) {
  // After a transfer the VM runs in another process; this one only exits.
  // Nothing may run, stop or update the frozen copy here meanwhile.
  if (update_.handed_over())
    return std::unexpected(CommandError{control::kGenericError,
                                        "this vmm handed its VM over to a new process and is exiting; reconnect "
                                        "to the control socket to reach it"});
  auto it = commands_.find(command);
  if (it == commands_.end())
    return std::unexpected(CommandError{control::kCommandNotFound,
                                        fmt::format("The command {} has not been found", command)});
  const Entry& entry = it->second;
  for (const auto& [key, value] : arguments.items()) {
    if (!entry.checks_arguments &&
        std::ranges::find(entry.allowed_arguments, key) == entry.allowed_arguments.end())
      return generic_error(fmt::format("Parameter '{}' is unexpected for command {}", key, command));
  }
  return entry.run(arguments, context);
}

control::CommandResult MachineCommands::query_status() {
  const RunState state = machine_.run_state();
  return json{{"status", to_string(state)}, {"running", state == RunState::running}, {"name", machine_.config().name}};
}

control::CommandResult MachineCommands::query_memory(const json& arguments) {
  // sample-frames: the physical frames of that many pages per region, to
  // compare before and after an update (a kexec changes the inode, not the
  // pages). Visible to a root vmm only. A hole has no frame: a kexec fills
  // it (LUO allocates every page of a memfd it preserves).
  size_t frames = 0;
  if (arguments.contains("sample-frames")) {
    const json& value = arguments["sample-frames"];
    if (!value.is_number_unsigned() || value.get<uint64_t>() > 64)
      return generic_error("Parameter 'sample-frames' expects a number of pages per region, at most 64");
    frames = value.get<size_t>();
  }
  json regions = json::array();
  const auto infos = machine_.memory_info();
  const auto& live = machine_.memory().regions();
  for (size_t i = 0; i < infos.size(); ++i) {
    const auto& region = infos[i];
    json out = {{"name", region.name},
                {"gpa", region.gpa},
                {"size", region.size},
                {"backing", memory::to_string(region.backing)},
                {"slot", memory::to_string(region.slot_kind)},
                {"inode", region.inode},
                {"device", region.device}};
    if (frames > 0 && i < live.size()) {
      auto sampled = sample_frames(live[i]->bytes(), live[i]->fd(), frames);
      if (!sampled) return generic_error(sampled.error().describe());
      json list = json::array();
      bool visible = false;
      for (const auto& sample : *sampled) {
        if (sample.hole) {
          list.push_back({{"offset", sample.offset}, {"hole", true}});
          continue;
        }
        list.push_back({{"offset", sample.offset}, {"pfn", sample.pfn}});
        visible = visible || sample.pfn != 0;
      }
      out["frames"] = list;
      out["frames_visible"] = visible;
    }
    regions.push_back(out);
  }
  return regions;
}

// A digest of every byte of every region, read through the VMM's own
// mappings: lets a client check that a paused guest's memory is unchanged
// across a live update. Reads all of guest RAM: slow for big guests.
control::CommandResult MachineCommands::query_memory_hash() {
  json regions = json::array();
  for (const auto& region : machine_.memory().regions()) {
    const auto bytes = region->bytes();
    uint64_t hash = 0xcbf29ce484222325ULL;  // FNV-1a over 64-bit words
    const auto* words = reinterpret_cast<const uint64_t*>(bytes.data());
    for (size_t i = 0; i < bytes.size() / sizeof(uint64_t); ++i) {
      hash ^= words[i];
      hash *= 0x100000001b3ULL;
    }
    regions.push_back({{"name", region->spec().name}, {"hash", fmt::format("{:016x}", hash)}});
  }
  return regions;
}

control::CommandResult MachineCommands::query_vcpus() {
  json vcpus = json::array();
  for (const auto& vcpu : machine_.vcpu_info()) {
    vcpus.push_back({{"id", vcpu.id},
                     {"thread_id", vcpu.thread_id},
                     {"state", vcpu_state_name(vcpu.state)},
                     {"exits",
                      {{"io", vcpu.exits.io},
                       {"mmio", vcpu.exits.mmio},
                       {"hlt", vcpu.exits.hlt},
                       {"interrupted", vcpu.exits.interrupted},
                       {"other", vcpu.exits.other}}}});
  }
  return vcpus;
}

control::CommandResult MachineCommands::query_guest() {
  auto& guest = machine_.guest();
  const auto status = guest.status();
  json out = {{"heartbeat", status.heartbeat},
              {"heartbeat_tsc", status.heartbeat_tsc},
              {"phase", phase_name(status.phase)},
              {"vcpus_online", status.vcpus_online},
              {"pages_total", status.pages_total},
              {"pages_stamped", status.pages_stamped},
              {"pages_dirtied", status.pages_dirtied},
              {"tsc_khz", guest.tsc_khz()}};
  json vcpus = json::array();
  for (const auto& vcpu : status.vcpus)
    vcpus.push_back({{"online", vcpu.online}, {"ticks", vcpu.ticks}, {"pass", vcpu.pass},
                     {"pages_dirtied", vcpu.pages_dirtied}});
  out["vcpus"] = std::move(vcpus);
  if (auto last = guest.last_verify()) out["last_verify"] = verify_json(*last);
  else out["last_verify"] = nullptr;
  out["sweep"] = sweep_json(guest, status);
  return out;
}

control::CommandResult MachineCommands::guest_verify(const json& arguments, std::stop_token stop) {
  double timeout_seconds = 60;
  if (arguments.contains("timeout")) {
    const json& value = arguments["timeout"];
    if (!value.is_number() || value.get<double>() <= 0 || value.get<double>() > 3600)
      return generic_error("Parameter 'timeout' expects a number of seconds between 0 and 3600");
    timeout_seconds = value.get<double>();
  }
  // Waits for the guest, but not past the control server's stop (quit,
  // SIGTERM, the old process after a transfer), which waits for this reply.
  auto result = machine_.verify_guest(std::chrono::milliseconds(static_cast<int64_t>(timeout_seconds * 1000)),
                                      std::move(stop));
  if (!result && result.error().code == ECANCELED)
    return generic_error("the vmm is shutting down: " + result.error().message);
  if (!result) return generic_error(result.error().describe());
  return verify_json(*result);
}

}  // namespace vmm
