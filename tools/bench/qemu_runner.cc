// The peers: Debian's QEMU running the same test guest (-M microvm -kernel
// test-guest.elf), handed over to a new QEMU process in two ways:
//
//   qemu-shared  QEMU's zero-copy path for a VMM upgrade. Guest RAM is a
//                memory-backend-file,share=on on /dev/shm; the new QEMU maps
//                the same file, and with the capability x-ignore-shared on
//                both sides the migration stream (over a Unix socket)
//                carries device state only.
//   qemu-file    QEMU's copy path: the whole guest, RAM included, is
//                migrated to a file; the new QEMU, on a fresh RAM file,
//                loads it.
//
// In both, the new QEMU is started with -incoming defer before the stop, so
// its start-up is never in the blackout (QEMU's best case). The blackout is
// the bench's clock from sending `stop` to the old QEMU until the reply to
// `cont` from the new one. The guest's heartbeat gap and brown-out are read
// from the guest's own status structure in the RAM file (guest_view.h).
#include <sys/statvfs.h>
#include <unistd.h>

#include <algorithm>
#include <filesystem>
#include <optional>
#include <thread>

#include <fmt/format.h>

#include "guest/protocol.h"
#include "tools/bench/common.h"
#include "tools/bench/guest_view.h"
#include "tools/bench/runner.h"

namespace bench {

using vmm::control::Client;

namespace {

class Qemu {
 public:
  static Result<Qemu> start(const RunContext& context, const RamSize& size, uint32_t vcpus,
                            const std::string& ram_path, const std::string& directory, const std::string& log_base,
                            int index, bool incoming) {
    const BlackoutOptions& options = context.options;
    const std::string name = fmt::format("qemu{}", index);
    const std::string socket_path = fmt::format("{}/{}.qmp", directory, name);
    const std::string log_path = log_base + ".log";
    const uint64_t mib = size.bytes / kMiB;
    // -arch-capabilities: the host's KVM refuses QEMU 7.2's write of MSR 0x10a under -cpu host.
    std::vector<std::string> argv{
        options.qemu, "-M", "microvm", "-enable-kvm", "-cpu", "host,-arch-capabilities", "-smp", std::to_string(vcpus),
        "-m", fmt::format("{}M", mib),
        "-object", fmt::format("memory-backend-file,id=mem,size={}M,mem-path={},share=on", mib, ram_path),
        "-machine", "memory-backend=mem",
        "-kernel", options.guest, "-append", fmt::format("sweep-ms={}", options.sweep_ms),
        "-nodefaults", "-no-user-config", "-display", "none",
        // Every QEMU of a configuration appends to one console log.
        "-chardev", fmt::format("file,id=console,path={}.console,append=on", log_base), "-serial", "chardev:console",
        "-qmp", fmt::format("unix:{},server=on,wait=off", socket_path)};
    if (incoming) argv.insert(argv.end(), {"-incoming", "defer"});
    VMM_TRY_ASSIGN(process, ChildProcess::spawn(argv, log_path, /*append=*/true));
    const auto deadline = Clock::now() + 30s;
    while (true) {
      VMM_TRY(check_not_interrupted());
      if (auto exited = process.poll_exit())
        return fail(fmt::format("{} exited at start ({}):\n{}", name, describe(*exited), tail(log_path, 10)));
      if (std::filesystem::exists(socket_path)) {
        if (auto client = Client::connect(socket_path, 10s)) {
          VMM_TRY(client->negotiate());
          return Qemu(std::move(process), std::move(*client), name, log_path);
        }
      }
      if (Clock::now() > deadline)
        return fail(name + " did not open its QMP socket within 30 s:\n" + tail(log_path, 10));
      nap(1ms);
    }
  }

  Result<json> command(const std::string& name, const json& arguments = json::object()) {
    return vmm::with_context(run_command(qmp_, name, arguments), name_);
  }

  Result<void> set_ignore_shared(bool on) {
    VMM_TRY(command("migrate-set-capabilities",
                    {{"capabilities", json::array({{{"capability", "x-ignore-shared"}, {"state", on}}})}}));
    return {};
  }

  // Polls query-migrate until the migration (either direction) completes;
  // often at first, then less often, so the polling neither blurs a short
  // migration nor takes a core from a long one.
  Result<void> wait_migration(double timeout_s) {
    const auto started = Clock::now();
    while (true) {
      VMM_TRY(check_not_interrupted());
      VMM_TRY_ASSIGN(status, command("query-migrate"));
      const std::string state = status.value("status", "");
      if (state == "completed") return {};
      if (state == "failed" || state == "cancelled")
        return fail(fmt::format("{}: migration {}: {}\n{}", name_, state, status.value("error-desc", ""),
                                tail(log_path_, 5)));
      const auto waited = Clock::now() - started;
      if (waited > seconds(timeout_s))
        return fail(fmt::format("{}: migration did not complete within {:.0f} s", name_, timeout_s));
      std::this_thread::sleep_for(waited < 50ms ? 200us : waited < 1s ? 1ms : 10ms);
    }
  }

  Result<void> quit() {
    (void)qmp_.execute("quit");
    if (!process_.wait_exit(30s)) {
      process_.kill();
      return fail(name_ + " did not exit within 30 s of quit");
    }
    return {};
  }

  [[nodiscard]] pid_t pid() const { return process_.pid(); }

 private:
  Qemu(ChildProcess process, Client qmp, std::string name, std::string log_path)
      : process_(std::move(process)), qmp_(std::move(qmp)), name_(std::move(name)), log_path_(std::move(log_path)) {}
  ChildProcess process_;
  Client qmp_;
  std::string name_;
  std::string log_path_;
};

// The QEMU that runs the guest now, its RAM file and the bench's view of it.
struct Chain {
  std::optional<OwnedFile> ram;
  std::optional<Qemu> qemu;
  std::optional<GuestView> view;
  uint64_t struct_offset = 0;
  int next_index = 0;
};

struct Paths {
  std::string directory;  // sockets and the state file
  std::string log_base;   // logs/qemu-SIZE-Nvcpu
};

uint64_t tsc_khz_of(const RunContext& context, const GuestView& view, Sample& sample) {
  if (const uint64_t khz = view.tsc_khz(); khz != 0) return khz;
  sample.note(fmt::format("guest publishes no tsc_khz: TSC converted at the host's calibrated {} kHz",
                          context.host_tsc_khz));
  return context.host_tsc_khz;
}

int64_t cycles_to_us(uint64_t cycles, uint64_t khz) {
  return khz == 0 ? -1 : static_cast<int64_t>(static_cast<double>(cycles) * 1000.0 / static_cast<double>(khz));
}

// One handover from chain.qemu to a new QEMU process, which then becomes
// chain.qemu. Fills `sample`; an error leaves the chain unusable.
Result<void> handover(RunContext& context, Chain& chain, const Paths& paths, const std::string& path,
                      const RamSize& size, uint32_t vcpus, Sample& sample) {
  const BlackoutOptions& options = context.options;
  const bool shared = path == "qemu-shared";
  const int index = chain.next_index++;
  const double migration_timeout = 600.0 + 60.0 * gib(size.bytes);

  // The new process first, outside the blackout, as -incoming defer allows.
  std::optional<OwnedFile> new_ram;
  std::string ram_path = chain.ram->path();
  if (!shared) {
    new_ram.emplace(fmt::format("{}/vmm-bench-{}-{}.ram", options.shm_dir, ::getpid(), index));
    ram_path = new_ram->path();
  }
  VMM_TRY_ASSIGN(next, Qemu::start(context, size, vcpus, ram_path, paths.directory, paths.log_base, index,
                                   /*incoming=*/true));
  VMM_TRY(next.set_ignore_shared(shared));
  VMM_TRY(chain.qemu->set_ignore_shared(shared));
  // QEMU 7.2 caps a migration at 128 MiB/s unless told otherwise: lift the
  // cap so the copy path runs as fast as this machine copies.
  VMM_TRY(chain.qemu->command("migrate-set-parameters", {{"max-bandwidth", int64_t{1} << 40}}));
  const std::string socket_uri = fmt::format("unix:{}/migrate{}.sock", paths.directory, index);
  // Removed when this handover is over, not before: dropping GiBs of page
  // cache takes a core for a while, which would blur the gap and brown-out.
  OwnedFile state_file(fmt::format("{}/state{}", paths.directory, index));
  if (shared) VMM_TRY(next.command("migrate-incoming", {{"uri", socket_uri}}));

  // --- the blackout ---
  const auto blackout_started = Clock::now();
  auto phase_started = blackout_started;
  auto phase_done = [&](std::string name) {
    sample.phases.push_back({std::move(name), elapsed_us(phase_started)});
    phase_started = Clock::now();
  };
  VMM_TRY(chain.qemu->command("stop"));
  phase_done("stop");
  // The guest is stopped: its last heartbeat and its sweep ring are final.
  const uint64_t last_beat = chain.view->heartbeat();
  const std::vector<SweepPass> passes_before = chain.view->sweep_ring();
  const bool guest_sweeps = chain.view->has_sweep();
  if (shared) {
    VMM_TRY(chain.qemu->command("migrate", {{"uri", socket_uri}}));
    VMM_TRY(next.wait_migration(migration_timeout));
    phase_done("migrate");
  } else {
    VMM_TRY(chain.qemu->command("migrate", {{"uri", "exec:cat > " + state_file.path()}}));
    VMM_TRY(chain.qemu->wait_migration(migration_timeout));
    phase_done("save");
    // The old process goes before the new one loads: two copies of an 8 GiB
    // guest on /dev/shm, beside the state file, would not fit in this
    // host's memory. Its exit is in the blackout, as execve's teardown is in
    // ours.
    chain.view.reset();
    VMM_TRY(chain.qemu->quit());
    chain.qemu.reset();
    chain.ram->remove_now();
    phase_done("exit");
    VMM_TRY(next.command("migrate-incoming", {{"uri", "exec:cat " + state_file.path()}}));
    VMM_TRY(next.wait_migration(migration_timeout));
    phase_done("load");
  }
  // The source was stopped, so the destination stays paused until told.
  VMM_TRY(next.command("cont"));
  const uint64_t cont_tsc = read_tsc();
  phase_done("cont");
  sample.blackout_us = elapsed_us(blackout_started);
  sample.ok = true;
  // --- the guest runs again ---

  if (!shared) {
    VMM_TRY_ASSIGN(view, GuestView::open(ram_path, size.bytes));
    view.use_offset(chain.struct_offset);
    chain.view.emplace(std::move(view));
  }
  GuestView& view = *chain.view;
  const uint64_t khz = tsc_khz_of(context, view, sample);

  // Where `cont` fell on the guest's TSC: the guest's TSC at the first
  // heartbeat the bench sees afterwards, minus the host TSC cycles from
  // cont's reply to seeing it (both TSCs run at one rate). Polling every
  // ~50 us bounds the error.
  const auto resume_deadline = Clock::now() + 10s;
  while (view.heartbeat() <= last_beat) {
    VMM_TRY(check_not_interrupted());
    if (Clock::now() > resume_deadline) return fail("the guest did not beat within 10 s of cont");
    std::this_thread::sleep_for(20us);
  }
  const uint64_t seen_tsc = read_tsc();
  const uint64_t seen_beat = view.heartbeat();
  const uint64_t seen_beat_tsc = view.heartbeat_tsc(seen_beat);
  const uint64_t resumed_tsc = seen_beat_tsc - std::min(seen_beat_tsc, seen_tsc - cont_tsc);

  // The guest's gap, as the vmm defines guest_gap_us: the largest interval
  // between consecutive heartbeats from the last one before the stop through
  // five after the resume.
  constexpr uint64_t kBeatsAfter = 5;
  while (view.heartbeat() < last_beat + kBeatsAfter + 1) {
    VMM_TRY(check_not_interrupted());
    if (Clock::now() > resume_deadline) return fail("the guest did not beat 6 times within 10 s of cont");
    std::this_thread::sleep_for(200us);
  }
  if (view.heartbeat() < last_beat + VMM_GUEST_HEARTBEAT_RING - 8) {
    uint64_t largest = 0;
    for (uint64_t beat = last_beat; beat <= last_beat + kBeatsAfter; ++beat)
      largest = std::max(largest, view.heartbeat_tsc(beat + 1) - view.heartbeat_tsc(beat));
    sample.guest_gap_us = cycles_to_us(largest, khz);
  } else {
    sample.note("guest gap: the heartbeat ring wrapped before the bench read it");
  }

  // The old QEMU has nothing left to do; it goes outside the blackout.
  if (shared) {
    if (auto quit = chain.qemu->quit(); !quit) sample.note(quit.error().describe());
  }
  chain.qemu.reset();
  chain.qemu.emplace(std::move(next));
  if (new_ram) chain.ram.emplace(std::move(*new_ram));
  if (auto memory = read_process_memory(chain.qemu->pid())) sample.rss_anon_kib = memory->rss_anon_kib;

  // The brown-out, as the vmm defines it: from the resume until a sweep pass
  // starts that is at most 1.25 times the median of the last 8 passes
  // before the stop.
  const auto baseline = baseline_cycles(passes_before);
  if (!guest_sweeps || !baseline || *baseline == 0) {
    sample.brownout_status = "unavailable";
    sample.note(guest_sweeps ? "brown-out unavailable: no sweep pass completed before the stop"
                             : "brown-out unavailable: the guest does not sweep its RAM");
    return {};
  }
  const double timeout = brownout_timeout_s(size.bytes);
  const auto deadline = Clock::now() + seconds(timeout);
  while (true) {
    VMM_TRY(check_not_interrupted());
    if (auto pass = first_steady_pass(view.sweep_ring(), resumed_tsc, *baseline)) {
      sample.brownout_status = "measured";
      sample.brownout_us = cycles_to_us(pass->start_tsc - resumed_tsc, khz);
      return {};
    }
    if (Clock::now() > deadline) {
      sample.ok = false;
      sample.brownout_status = "timeout";
      sample.note(fmt::format("the brown-out was not over {:.0f} s after cont", timeout));
      return {};
    }
    nap(20ms);
  }
}

std::string describe_sample(const Sample& sample) {
  std::string text = fmt::format("blackout {}", sample.blackout_us ? human_us(*sample.blackout_us) : "-");
  text += fmt::format(", guest gap {}", sample.guest_gap_us ? human_us(*sample.guest_gap_us) : "-");
  if (sample.brownout_us) text += fmt::format(", brown-out {}", human_us(*sample.brownout_us));
  else text += fmt::format(", brown-out {}", sample.brownout_status.empty() ? "-" : sample.brownout_status);
  if (!sample.ok) text += "; FAILED: " + sample.notes;
  return text;
}

// Checks every page's stamp in the current RAM file.
Verification check_memory(const Chain& chain, const std::string& path, const RamSize& size, uint32_t vcpus,
                          Progress& progress) {
  Verification verification{.system = path, .size = size.label, .size_bytes = size.bytes, .vcpus = vcpus,
                            .method = "host stamp check"};
  progress.say("checking the stamp of every page in the guest's RAM file");
  auto check = chain.view->check_stamps();
  if (!check) {
    verification.notes = check.error().describe();
  } else {
    verification.pages_checked = check->pages_expected;
    verification.mismatches = std::max<int64_t>(0, check->pages_expected - check->pages_intact);
    verification.duration_us = check->duration_us;
    verification.ok = check->pages_expected > 0 && check->pages_intact == check->pages_expected;
    verification.notes = fmt::format("{} of {} stamped pages intact; {}", check->pages_intact,
                                     check->pages_expected, check->layout);
  }
  progress.say("stamp check: {}", verification.ok ? fmt::format("{} pages, 0 mismatches", verification.pages_checked)
                                                  : "FAILED: " + verification.notes);
  return verification;
}

}  // namespace

void run_qemu(RunContext& context, const RamSize& size, uint32_t vcpus) {
  const BlackoutOptions& options = context.options;
  Progress& progress = context.progress;
  RunResults& results = context.results;
  const int updates = options.updates_for(size);
  Units units(context, options.peers, "", "", size, vcpus);
  units.begin(0);
  if (size.bytes % kMiB != 0) return units.give_up("QEMU needs a RAM size in whole MiB");
  if (auto shortfall = memory_shortfall(size)) return units.give_up(*shortfall);
  auto directory = TempDir::create(options.work_dir, "vmm-bench-qemu");
  if (!directory) return units.give_up(directory.error().describe());
  if (std::ranges::find(options.peers, "qemu-file") != options.peers.end()) {
    struct statvfs disk{};
    if (::statvfs(directory->path().c_str(), &disk) == 0 &&
        static_cast<uint64_t>(disk.f_bavail) * disk.f_frsize < size.bytes + kGiB)
      return units.give_up(fmt::format("{} has less free space than the guest's {} plus 1 GiB for qemu-file's state file",
                                 options.work_dir, size.label));
  }
  Paths paths{directory->path(), fmt::format("{}/qemu-{}-{}vcpu", context.logs_dir, size.label, vcpus)};

  Chain chain;
  const int first_index = chain.next_index++;
  chain.ram.emplace(fmt::format("{}/vmm-bench-{}-{}.ram", options.shm_dir, ::getpid(), first_index));
  progress.say("booting {} with {} of RAM on {}", options.qemu, size.label, options.shm_dir);
  auto first = Qemu::start(context, size, vcpus, chain.ram->path(), paths.directory, paths.log_base, first_index,
                           /*incoming=*/false);
  if (!first) return units.give_up(first.error().describe());
  chain.qemu.emplace(std::move(*first));
  auto view = GuestView::open(chain.ram->path(), size.bytes);
  if (!view) return units.give_up(view.error().describe());
  if (auto located = view->locate(30s); !located) return units.give_up(located.error().describe());
  chain.struct_offset = *view->offset();
  chain.view.emplace(std::move(*view));

  // Stamping, then a few sweep passes: the steady state every update starts from.
  const auto started = Clock::now();
  auto next_report = started + 5s;
  while (chain.view->phase() != VMM_GUEST_PHASE_RUNNING) {
    if (interrupted()) return units.give_up("interrupted");
    if (Clock::now() > started + seconds(stamp_timeout_s(size.bytes)))
      return units.give_up(fmt::format("the guest did not stamp its RAM within {:.0f} s", stamp_timeout_s(size.bytes)));
    if (Clock::now() > next_report) {
      const uint64_t total = chain.view->pages_total();
      progress.say("booting: the guest stamped {:.0f}% of its RAM",
                   total ? 100.0 * double(chain.view->pages_stamped()) / double(total) : 0.0);
      next_report = Clock::now() + 5s;
    }
    nap(100ms);
  }
  progress.say("the guest stamped its {} of RAM in {:.1f} s", size.label,
               std::chrono::duration<double>(Clock::now() - started).count());
  if (chain.view->has_sweep()) {
    const uint64_t passes = chain.view->sweep_passes();
    const auto deadline = Clock::now() + seconds(brownout_timeout_s(size.bytes));
    while (chain.view->sweep_passes() < passes + 3) {
      if (interrupted()) return units.give_up("interrupted");
      if (Clock::now() > deadline) return units.give_up("the guest's RAM sweep made no 3 passes in time");
      nap(20ms);
    }
  } else {
    progress.say("the guest does not sweep its RAM (sweep-ms, or a guest/protocol.h without the sweep ring): "
                 "no brown-out can be measured");
  }

  for (; units.next < options.peers.size(); ++units.next) {
    const std::string& path = options.peers[units.next];
    units.begin(units.next);
    for (int update = 1; update <= updates; ++update) {
      if (interrupted()) return units.give_up("interrupted");
      Sample sample{.system = path, .mode = path == "qemu-shared" ? "x-ignore-shared" : "file",
                    .size = size.label, .size_bytes = size.bytes, .vcpus = vcpus, .backing = "shm-file",
                    .update = update};
      auto done = handover(context, chain, paths, path, size, vcpus, sample);
      if (!done) {
        sample.ok = false;
        sample.note(done.error().describe());
        results.samples.push_back(sample);
        const std::string message = fmt::format("handover {} failed: {}", update, done.error().describe());
        progress.say("{}", message);
        results.failures.push_back({path, size.label, vcpus, message});
        ++units.next;
        return units.give_up(interrupted() ? "interrupted" : "not run: an earlier QEMU handover failed");
      }
      results.samples.push_back(sample);
      progress.say("update {}/{}, {}", update, updates, describe_sample(sample));
      // No brown-out measured: nothing says when the guest is steady again.
      if (sample.brownout_status != "measured" && sample.brownout_status != "timeout")
        nap(std::chrono::milliseconds(1000 + 3 * options.sweep_ms));
    }
    results.verifications.push_back(check_memory(chain, path, size, vcpus, progress));
  }
  if (auto quit = chain.qemu->quit(); !quit) progress.say("{}", quit.error().describe());
}

}  // namespace bench
