// Our side: `vmm run` with the test guest, then live updates through the
// control socket, each measured by the vmm itself (blackout, phases, the
// guest's heartbeat gap and the brown-out its sweep shows).
#include <algorithm>
#include <filesystem>
#include <optional>

#include <fmt/format.h>

#include "tools/bench/common.h"
#include "tools/bench/runner.h"

namespace bench {

using vmm::control::Client;

double stamp_timeout_s(uint64_t ram_bytes) { return 60.0 + 60.0 * gib(ram_bytes); }
double brownout_timeout_s(uint64_t ram_bytes) { return 120.0 + 10.0 * gib(ram_bytes); }

Units::Units(RunContext& context, const std::vector<std::string>& names, std::string label_prefix,
             std::string system_prefix, const RamSize& size, uint32_t vcpus)
    : context_(context), names_(names), label_prefix_(std::move(label_prefix)),
      system_prefix_(std::move(system_prefix)), size_(size), vcpus_(vcpus) {}

void Units::begin(size_t index) {
  for (; begun_ <= index && begun_ < names_.size(); ++begun_)
    context_.progress.begin(fmt::format("{}{} {} {}", label_prefix_, names_[begun_], size_.label, vcpus_label(vcpus_)));
}

void Units::give_up(const std::string& message) {
  for (; next < names_.size(); ++next) {
    begin(next);
    context_.progress.say("not measured: {}", message);
    context_.results.failures.push_back({system_prefix_ + names_[next], size_.label, vcpus_, message});
  }
}

std::optional<std::string> memory_shortfall(const RamSize& size) {
  const uint64_t available = memory_available();
  if (available == 0 || available >= size.bytes + kGiB) return std::nullopt;
  return fmt::format("the host has {:.1f} GiB available, less than the guest's {} plus 1 GiB", gib(available),
                     size.label);
}

namespace {

Result<Client> connect_when_ready(const std::string& socket_path, ChildProcess& vmm, const std::string& log_path) {
  const auto deadline = Clock::now() + 30s;
  while (true) {
    VMM_TRY(check_not_interrupted());
    if (auto exited = vmm.poll_exit())
      return fail(fmt::format("the vmm exited at start ({}):\n{}", describe(*exited), tail(log_path, 10)));
    if (std::filesystem::exists(socket_path)) {
      if (auto client = Client::connect(socket_path, 5s)) {
        VMM_TRY(client->negotiate());
        return std::move(*client);
      }
    }
    if (Clock::now() > deadline)
      return fail("the vmm did not open its control socket within 30 s:\n" + tail(log_path, 10));
    nap(5ms);
  }
}

uint64_t sweep_passes_of(const json& guest) {
  if (!guest.contains("sweep") || !guest["sweep"].is_object()) return 0;
  return guest["sweep"].value("passes", uint64_t{0});
}

bool sweeps(const json& guest) {
  return guest.contains("sweep") && guest["sweep"].is_object() && guest["sweep"].value("period_ms", 0) > 0;
}

// Waits until the guest has stamped all of its RAM, with a progress line
// every few seconds (8 GiB take minutes under shadow paging).
Result<void> wait_until_stamped(Client& client, const RamSize& size, Progress& progress) {
  const double timeout = stamp_timeout_s(size.bytes);
  const auto started = Clock::now();
  auto next_report = started + 5s;
  json guest;
  while (true) {
    VMM_TRY(check_not_interrupted());
    VMM_TRY_ASSIGN(reply, run_command(client, "query-guest"));
    guest = std::move(reply);
    if (guest.value("phase", "") == "running") break;
    if (Clock::now() > started + seconds(timeout))
      return fail(fmt::format("the guest did not stamp its RAM within {:.0f} s; last query-guest: {}", timeout,
                              guest.dump()));
    if (Clock::now() > next_report) {
      const auto total = guest.value("pages_total", uint64_t{0});
      const auto stamped = guest.value("pages_stamped", uint64_t{0});
      progress.say("booting: the guest stamped {:.0f}% of its RAM", total ? 100.0 * double(stamped) / double(total) : 0.0);
      next_report = Clock::now() + 5s;
    }
    nap(100ms);
  }
  progress.say("the guest stamped its {} of RAM in {:.1f} s", size.label,
               std::chrono::duration<double>(Clock::now() - started).count());
  return {};
}

// Waits for `count` more sweep passes (steady state before the first update,
// and after guest-verify). Returns false when the guest does not sweep.
Result<bool> wait_sweep_passes(Client& client, uint64_t count, double timeout_s) {
  const auto deadline = Clock::now() + seconds(timeout_s);
  std::optional<uint64_t> start;
  while (true) {
    VMM_TRY(check_not_interrupted());
    VMM_TRY_ASSIGN(guest, run_command(client, "query-guest"));
    if (!sweeps(guest)) return false;
    const uint64_t passes = sweep_passes_of(guest);
    if (!start) start = passes;
    if (passes >= *start + count) return true;
    if (Clock::now() > deadline)
      return fail(fmt::format("the guest completed {} of {} sweep passes within {:.0f} s", passes - *start, count,
                              timeout_s));
    nap(20ms);
  }
}

enum class Outcome { completed, refused, unsupported };

// One live update; fills `sample`. A lost connection is an error (the VM is
// gone); a refused update is an outcome.
// `vmm_pid` is the vmm's pid, updated when a transfer moves the VM to a new
// process.
Result<Outcome> one_update(Client& client, pid_t& vmm_pid, const std::string& mode, uint64_t ram_bytes,
                           bool guest_sweeps, Sample& sample) {
  client.set_timeout(seconds(brownout_timeout_s(ram_bytes)));
  auto reply = client.execute("live-update", {{"mode", mode}});
  client.set_timeout(Client::kDefaultTimeout);
  if (!reply) return std::unexpected(reply.error().with_context("live-update"));
  if (!*reply) {
    const std::string desc = reply->error().desc;
    sample.note("live-update refused: " + desc);
    // A vmm without the transfer mode refuses the argument itself.
    if (mode == "transfer" && desc.find("Parameter 'mode'") != std::string::npos) return Outcome::unsupported;
    return Outcome::refused;
  }
  const json& record = **reply;
  if (record.value("status", "") != "completed" || !record.contains("blackout_us")) {
    sample.note("live-update did not complete: " + record.dump());
    return Outcome::refused;
  }
  sample.ok = true;
  if (record.contains("pid") && record["pid"].is_number_integer()) vmm_pid = record["pid"].get<pid_t>();
  sample.blackout_us = record["blackout_us"].get<int64_t>();
  for (const auto& phase : record.value("phases", json::array()))
    sample.phases.push_back({phase.at("name").get<std::string>(), phase.at("duration_us").get<int64_t>()});

  // guest_gap_us (within 5 s) and the brown-out (once the guest's sweep runs
  // as fast as before) appear later in query-live-update. Waiting for the
  // brown-out also makes the next update start from a steady guest.
  const auto completed = Clock::now();
  const auto deadline = completed + seconds(brownout_timeout_s(ram_bytes));
  const auto gap_deadline = completed + 7s;
  bool brownout_done = false;
  while (true) {
    VMM_TRY(check_not_interrupted());
    VMM_TRY_ASSIGN(status, run_command(client, "query-live-update"));
    if (status.contains("guest_gap_us")) sample.guest_gap_us = status["guest_gap_us"].get<int64_t>();
    if (!brownout_done) {
      const std::string state = status.value("brownout_status", "");
      if (state.empty()) {
        sample.brownout_status = "unavailable";
        sample.note("brown-out: this vmm reports no brownout_status");
        brownout_done = true;
      } else if (state == "measured") {
        sample.brownout_status = "measured";
        sample.brownout_us = status.value("brownout_us", int64_t{-1});
        brownout_done = true;
      } else if (state == "unavailable") {
        sample.brownout_status = "unavailable";
        sample.note("brown-out unavailable: " + status.value("brownout_reason", std::string("no reason given")));
        // The guest sweeps and runs: the vmm gave up waiting for its sweep
        // to get back to speed (or the guest was not steady before), so
        // this sample did not end in a steady state.
        if (guest_sweeps) sample.ok = false;
        brownout_done = true;
      }
    }
    if (brownout_done && (sample.guest_gap_us || Clock::now() > gap_deadline)) break;
    if (Clock::now() > deadline) {
      sample.ok = false;
      sample.brownout_status = "timeout";
      sample.note(fmt::format("the brown-out was still pending {:.0f} s after the update",
                              brownout_timeout_s(ram_bytes)));
      break;
    }
    nap(50ms);
  }
  if (!sample.guest_gap_us) sample.note("no guest_gap_us: the vmm did not measure the guest's heartbeat gap");
  if (auto memory = read_process_memory(vmm_pid)) sample.rss_anon_kib = memory->rss_anon_kib;
  return Outcome::completed;
}

std::string describe_sample(const Sample& sample) {
  std::string text = fmt::format("blackout {}", sample.blackout_us ? human_us(*sample.blackout_us) : "-");
  text += fmt::format(", guest gap {}", sample.guest_gap_us ? human_us(*sample.guest_gap_us) : "-");
  if (sample.brownout_us) text += fmt::format(", brown-out {}", human_us(*sample.brownout_us));
  else text += fmt::format(", brown-out {}", sample.brownout_status.empty() ? "-" : sample.brownout_status);
  if (!sample.ok) text += "; FAILED: " + sample.notes;
  return text;
}

}  // namespace

void run_vmm(RunContext& context, const RamSize& size, uint32_t vcpus) {
  const BlackoutOptions& options = context.options;
  Progress& progress = context.progress;
  RunResults& results = context.results;
  const int updates = options.updates_for(size);
  Units units(context, options.modes, "vmm ", "vmm-", size, vcpus);
  units.begin(0);
  if (auto shortfall = memory_shortfall(size)) {
    units.give_up(*shortfall);
    return;
  }
  auto directory = TempDir::create(options.work_dir, "vmm-bench");
  if (!directory) {
    units.give_up(directory.error().describe());
    return;
  }
  const std::string base = fmt::format("{}/vmm-{}-{}vcpu", context.logs_dir, size.label, vcpus);
  const std::string log_path = base + ".log";
  const std::string socket_path = directory->path() + "/vmm.sock";
  // The vmm logs at warn only: its per-connection info lines are noise here.
  auto vmm = ChildProcess::spawn({options.vmm, "run", "--console", base + ".console", "--control-socket", socket_path,
                                  "--memory", size.label, "--vcpus", std::to_string(vcpus), "--memory-backing",
                                  options.backing, "--cmdline", fmt::format("sweep-ms={}", options.sweep_ms),
                                  "--log-level", "warn"},
                                 log_path);
  if (!vmm) {
    units.give_up(vmm.error().describe());
    return;
  }
  auto client = connect_when_ready(socket_path, *vmm, log_path);
  if (!client) {
    units.give_up(client.error().describe());
    return;
  }
  progress.say("booting {} with {} of RAM ({}), {} updates per mode", options.vmm, size.label, options.backing,
               updates);
  if (auto stamped = wait_until_stamped(*client, size, progress); !stamped) {
    units.give_up(stamped.error().describe() + "\nvmm log:\n" + tail(log_path, 10));
    return;
  }
  // After a transfer update the VM runs in a process the vmm started.
  pid_t vmm_pid = vmm->pid();
  std::optional<AdoptedProcess> successor;
  bool guest_sweeps = false;
  if (auto swept = wait_sweep_passes(*client, 3, brownout_timeout_s(size.bytes)); !swept) {
    units.give_up(swept.error().describe());
    return;
  } else {
    guest_sweeps = *swept;
  }
  if (!guest_sweeps)
    progress.say("the guest reports no RAM sweep (query-guest has no sweep period): no brown-out can be measured");

  for (; units.next < options.modes.size(); ++units.next) {
    const std::string& mode = options.modes[units.next];
    const std::string system = "vmm-" + mode;
    units.begin(units.next);
    int completed = 0;
    int consecutive_failures = 0;
    for (int update = 1; update <= updates; ++update) {
      if (interrupted()) {
        units.give_up("interrupted");
        return;
      }
      Sample sample{.system = system, .mode = mode, .size = size.label, .size_bytes = size.bytes, .vcpus = vcpus,
                    .backing = options.backing, .update = update};
      auto outcome = one_update(*client, vmm_pid, mode, size.bytes, guest_sweeps, sample);
      if (vmm_pid != vmm->pid() && (!successor || successor->pid() != vmm_pid)) {
        // The previous process hands over and exits by itself: let it.
        if (successor) (void)successor->wait_exit(10s);
        successor.emplace(vmm_pid);
      }
      if (!outcome) {
        // The control connection is gone, and with it (most likely) the VM.
        sample.ok = false;
        sample.note(outcome.error().describe());
        results.samples.push_back(sample);
        const std::string lost = fmt::format("the vmm was lost during {} update {}: {}\nvmm log:\n{}", mode,
                                             update, outcome.error().describe(), tail(log_path, 10));
        progress.say("update {}/{} FAILED: {}", update, updates, lost);
        results.failures.push_back({system, size.label, vcpus, lost});
        ++units.next;
        units.give_up("not run: the vmm was lost during an earlier mode");
        return;
      }
      if (*outcome == Outcome::unsupported) {
        progress.say("not measured: this vmm has no '{}' live update ({})", mode, sample.notes);
        results.failures.push_back(
            {system, size.label, vcpus, fmt::format("this vmm has no '{}' live update: {}", mode, sample.notes)});
        break;
      }
      results.samples.push_back(sample);
      if (*outcome == Outcome::refused) {
        progress.say("update {}/{} FAILED: {}", update, updates, sample.notes);
        if (++consecutive_failures == 3) {
          results.failures.push_back({system, size.label, vcpus, "three updates in a row failed; gave up this mode"});
          break;
        }
        nap(1s);
        continue;
      }
      consecutive_failures = 0;
      ++completed;
      progress.say("update {}/{}, {}", update, updates, describe_sample(sample));
      // Without a brown-out from the vmm, nothing says when the guest is
      // steady again: give it a few sweep periods.
      if (sample.brownout_status != "measured" && sample.brownout_status != "timeout")
        nap(std::chrono::milliseconds(1000 + 3 * options.sweep_ms));
    }
    if (completed == 0) continue;

    // The guest checks every page's stamp (and dirty word) itself.
    Verification verification{.system = system, .size = size.label, .size_bytes = size.bytes, .vcpus = vcpus,
                              .method = "guest-verify"};
    progress.say("guest-verify after {} {} update(s)", completed, mode);
    const double timeout = stamp_timeout_s(size.bytes);
    client->set_timeout(seconds(timeout + 30));
    auto verified = run_command(*client, "guest-verify", {{"timeout", timeout}});
    client->set_timeout(Client::kDefaultTimeout);
    if (!verified) {
      verification.notes = verified.error().describe();
    } else {
      verification.pages_checked = verified->value("pages_checked", int64_t{-1});
      verification.mismatches = verified->value("mismatches", int64_t{-1});
      verification.duration_us = verified->value("duration_us", int64_t{-1});
      verification.ok = verification.mismatches == 0 && verification.pages_checked > 0;
      if (verification.mismatches > 0)
        verification.notes = fmt::format("first mismatch at guest address {:#x}",
                                         verified->value("first_mismatch_gpa", uint64_t{0}));
    }
    progress.say("guest-verify: {}", verification.ok ? fmt::format("{} pages, 0 mismatches", verification.pages_checked)
                                                    : fmt::format("FAILED: {} mismatches {}", verification.mismatches,
                                                                  verification.notes));
    results.verifications.push_back(verification);
    if (!verified) {
      ++units.next;
      units.give_up("not run: guest-verify failed after an earlier mode: " + verified.error().describe());
      return;
    }
    // The verify read all of RAM on every vCPU: let the sweep settle again.
    if (guest_sweeps && units.next + 1 < options.modes.size())
      (void)wait_sweep_passes(*client, 2, brownout_timeout_s(size.bytes));
  }

  // quit may close the connection before its reply: either way, then wait.
  (void)client->execute("quit");
  if (successor ? !successor->wait_exit(30s) : !vmm->wait_exit(30s))
    progress.say("the vmm did not exit within 30 s of quit; killing it");
}

}  // namespace bench
