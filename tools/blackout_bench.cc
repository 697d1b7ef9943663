// vmm-blackout-bench: measures the blackout of exec live updates.
//
// For each configuration of a matrix (RAM size x vCPUs x RAM backing) it
// launches `vmm run`, waits until the test guest has stamped all its pages,
// runs N exec live updates in a row, asks the guest to verify every page
// stamp (which makes it touch all of RAM again), runs one more update and
// verifies again. Per update it keeps what the vmm reports (blackout,
// phases, the guest's own largest heartbeat gap) and the vmm's RssAnon,
// which stays small because guest RAM is never copied into the process.
//
// With --peer qemu it measures instead the closest thing QEMU 7.2 has to an
// exec update (see "The QEMU peer" below).
//
// A measuring tool, not a test: it prints numbers (table or --json on
// stdout, progress on stderr) and fails only when it cannot measure.
#include <signal.h>
#include <sys/prctl.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <span>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <nlohmann/json.hpp>
#include <spdlog/sinks/stdout_color_sinks.h>
#include <spdlog/spdlog.h>

#include "kvm/result.h"
#include "vmm/control/client.h"
#include "vmm/size.h"

namespace {

using nlohmann::json;
using vmm::Error;
using vmm::Result;
using vmm::fail;
using vmm::fail_errno;
using vmm::control::Client;
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

// The children the bench is running (a vmm, or two QEMUs during a QEMU
// handover), for the signal handler: an interrupted bench must not leave a VM
// behind (the destructors then remove the rest).
std::array<std::atomic<pid_t>, 4> g_running_children{-1, -1, -1, -1};
std::atomic<bool> g_interrupted{false};
static_assert(std::atomic<pid_t>::is_always_lock_free, "the signal handler reads it");

void on_interrupt(int) {
  g_interrupted = true;
  for (auto& child : g_running_children)
    if (pid_t pid = child.load(); pid > 0) ::kill(pid, SIGKILL);
}

void remember_child(pid_t pid) {
  for (auto& child : g_running_children) {
    pid_t free_slot = -1;
    if (child.compare_exchange_strong(free_slot, pid)) return;
  }
}

void forget_child(pid_t pid) {
  for (auto& child : g_running_children) {
    pid_t expected = pid;
    child.compare_exchange_strong(expected, -1);
  }
}

Result<void> check_not_interrupted() {
  if (g_interrupted) return fail("interrupted");
  return {};
}

// ---------------------------------------------------------------------------
// Owned resources: a temporary directory and a child process.

class TempDir {
 public:
  static Result<TempDir> create(const std::string& prefix) {
    std::string pattern = (std::filesystem::temp_directory_path() / (prefix + "-XXXXXX")).string();
    if (!::mkdtemp(pattern.data())) return fail_errno("cannot create a temporary directory");
    return TempDir(std::move(pattern));
  }
  TempDir(TempDir&& other) noexcept : path_(std::exchange(other.path_, {})) {}
  TempDir& operator=(TempDir&&) = delete;
  ~TempDir() {
    if (path_.empty()) return;
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  [[nodiscard]] const std::string& path() const { return path_; }

 private:
  explicit TempDir(std::string path) : path_(std::move(path)) {}
  std::string path_;
};

struct ExitStatus {
  bool exited = false;  // false: killed by a signal
  int code = 0;         // exit code or signal number
};

// A child process that is killed and reaped when the object goes, whatever
// happened meanwhile. It also dies with the bench (PR_SET_PDEATHSIG survives
// the vmm's own exec live updates, which keep its pid).
class ChildProcess {
 public:
  static Result<ChildProcess> spawn(const std::vector<std::string>& argv, const std::string& output_path) {
    std::vector<char*> args;
    for (const auto& arg : argv) args.push_back(const_cast<char*>(arg.c_str()));
    args.push_back(nullptr);
    const pid_t parent = ::getpid();
    const pid_t pid = ::fork();
    if (pid < 0) return fail_errno("fork");
    if (pid == 0) {
      // Only async-signal-safe calls between fork and exec.
      if (::prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || ::getppid() != parent) ::_exit(127);
      const int output = ::open(output_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
      const int null = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
      if (output < 0 || null < 0) ::_exit(127);
      ::dup2(null, STDIN_FILENO);
      ::dup2(output, STDOUT_FILENO);
      ::dup2(output, STDERR_FILENO);
      ::execv(args[0], args.data());
      ::_exit(127);
    }
    remember_child(pid);
    return ChildProcess(pid);
  }

  ChildProcess(ChildProcess&& other) noexcept
      : pid_(std::exchange(other.pid_, -1)), status_(other.status_) {}
  ChildProcess& operator=(ChildProcess&&) = delete;
  ~ChildProcess() {
    if (pid_ <= 0) return;
    if (!status_) {
      ::kill(pid_, SIGKILL);
      (void)wait_exit(10s);
    }
    forget_child(pid_);
  }

  [[nodiscard]] pid_t pid() const { return pid_; }

  // The exit status once the child has exited (reaping it), else nullopt.
  std::optional<ExitStatus> poll_exit() {
    if (status_) return status_;
    int raw = 0;
    const pid_t done = ::waitpid(pid_, &raw, WNOHANG);
    if (done == pid_) {
      status_ = WIFEXITED(raw) ? ExitStatus{true, WEXITSTATUS(raw)} : ExitStatus{false, WTERMSIG(raw)};
    } else if (done < 0) {
      status_ = ExitStatus{false, -1};
    }
    // Reaped: the pid may be reused, so the signal handler must not kill it.
    if (status_) forget_child(pid_);
    return status_;
  }
  std::optional<ExitStatus> wait_exit(std::chrono::milliseconds timeout) {
    const auto deadline = Clock::now() + timeout;
    while (!poll_exit() && Clock::now() < deadline) std::this_thread::sleep_for(5ms);
    return status_;
  }

 private:
  explicit ChildProcess(pid_t pid) : pid_(pid) {}
  pid_t pid_ = -1;
  std::optional<ExitStatus> status_;
};

std::string describe(const ExitStatus& status) {
  return status.exited ? fmt::format("exit code {}", status.code) : fmt::format("signal {}", status.code);
}

std::string read_text(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// The last `lines` lines of a file, for error messages.
std::string tail(const std::string& path, size_t lines) {
  const std::string text = read_text(path);
  size_t start = text.size();
  for (size_t seen = 0; start > 0 && seen <= lines; --start)
    if (text[start - 1] == '\n') ++seen;
  return text.substr(start);
}

// ---------------------------------------------------------------------------
// What is measured.

struct Configuration {
  std::string memory;  // as given, e.g. "1G"
  uint64_t memory_bytes = 0;
  uint32_t vcpus = 1;
  std::string backing;
  int updates = 0;

  [[nodiscard]] std::string label() const {
    return fmt::format("{} RAM, {} vCPU{}, {}", memory, vcpus, vcpus == 1 ? "" : "s", backing);
  }
};

// From /proc/PID/status, in KiB.
struct ProcessMemory {
  int64_t rss_anon_kib = -1;
  int64_t rss_file_kib = -1;
  int64_t rss_shmem_kib = -1;
};

Result<ProcessMemory> read_process_memory(pid_t pid) {
  std::ifstream status(fmt::format("/proc/{}/status", pid));
  if (!status) return fail_errno(fmt::format("cannot read /proc/{}/status", pid));
  ProcessMemory memory;
  const std::map<std::string, int64_t*> fields{{"RssAnon:", &memory.rss_anon_kib},
                                               {"RssFile:", &memory.rss_file_kib},
                                               {"RssShmem:", &memory.rss_shmem_kib}};
  std::string line;
  while (std::getline(status, line)) {
    std::istringstream words(line);
    std::string key;
    int64_t value = 0;
    if (words >> key >> value)
      if (auto field = fields.find(key); field != fields.end()) *field->second = value;
  }
  if (memory.rss_anon_kib < 0) return fail(fmt::format("/proc/{}/status has no RssAnon", pid));
  return memory;
}

json to_json(const ProcessMemory& memory) {
  return {{"rss_anon_kib", memory.rss_anon_kib},
          {"rss_file_kib", memory.rss_file_kib},
          {"rss_shmem_kib", memory.rss_shmem_kib}};
}

struct Phase {
  std::string name;
  int64_t duration_us = 0;
};

struct UpdateSample {
  int64_t blackout_us = 0;
  std::vector<Phase> phases;
  std::optional<int64_t> guest_gap_us;
  // The client's view: live-update sent until the new process's reply read.
  int64_t round_trip_us = 0;
  ProcessMemory memory_after;
};

struct VerifyOutcome {
  int64_t pages_checked = 0;
  int64_t mismatches = 0;
  int64_t duration_us = 0;
};

struct ConfigurationResult {
  Configuration config;
  double boot_seconds = 0;  // launch until every page is stamped
  std::optional<ProcessMemory> memory_before;
  std::vector<UpdateSample> samples;
  std::optional<VerifyOutcome> verify;  // after the N updates
  // One more update once guest-verify has made the guest touch all of its
  // RAM again, this time in a VM that an update built; then a last verify.
  std::optional<ProcessMemory> memory_before_touched;
  std::optional<UpdateSample> touched_update;
  std::optional<VerifyOutcome> final_verify;
  std::optional<std::string> error;
};

// ---------------------------------------------------------------------------
// Driving one vmm.

struct BenchOptions {
  std::string vmm_binary;
  std::vector<std::string> memory_sizes{"256M", "1G", "4G"};
  std::vector<uint32_t> vcpu_counts{1, 2};
  std::vector<std::string> backings{"guest_memfd", "memfd"};
  int updates = 10;
  std::optional<int> large_updates;
  std::string large_threshold = "4G";
  int settle_ms = 200;
  double boot_timeout_s = 0;   // 0: scaled with RAM
  double verify_timeout_s = 0; // 0: scaled with RAM
  bool skip_verify = false;
  bool skip_touched_update = false;
  bool json_output = false;
  std::string json_file;  // also write the JSON here, whatever stdout shows
  std::string log_level = "info";
};

// Shadow paging costs ~10-15 us per first touch of a page, and the guest
// stamps (and after an update verifies) within 60% of each 1 ms tick: about a
// minute per GiB on one vCPU is plenty, more on a loaded machine.
double scaled_timeout_s(double given, uint64_t memory_bytes) {
  if (given > 0) return given;
  const double gib = static_cast<double>(memory_bytes) / double(1ull << 30);
  return 60.0 + 60.0 * gib;
}

Result<json> run_command(Client& client, const std::string& command, const json& arguments = json::object()) {
  VMM_TRY_ASSIGN(reply, client.execute(command, arguments));
  if (!reply) return fail(fmt::format("{}: {} ({})", command, reply.error().desc, reply.error().error_class));
  return *reply;
}

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
    std::this_thread::sleep_for(5ms);
  }
}

Result<void> wait_until_stamped(Client& client, double timeout_s) {
  const auto deadline = Clock::now() + std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000));
  json last;
  while (Clock::now() < deadline) {
    VMM_TRY(check_not_interrupted());
    VMM_TRY_ASSIGN(guest, run_command(client, "query-guest"));
    if (guest.value("phase", "") == "running") return {};
    last = std::move(guest);
    std::this_thread::sleep_for(50ms);
  }
  return fail(fmt::format("the guest did not finish stamping within {:.0f} s; last query-guest: {}", timeout_s,
                          last.dump()));
}

Result<UpdateSample> run_one_update(Client& client, pid_t vmm_pid) {
  UpdateSample sample;
  const auto sent = Clock::now();
  VMM_TRY_ASSIGN(reply, run_command(client, "live-update", {{"mode", "exec"}}));
  sample.round_trip_us = std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - sent).count();
  if (reply.value("status", "") != "completed" || !reply.contains("blackout_us"))
    return fail("live-update did not complete: " + reply.dump());
  sample.blackout_us = reply["blackout_us"].get<int64_t>();
  for (const auto& phase : reply.value("phases", json::array()))
    sample.phases.push_back({phase.at("name").get<std::string>(), phase.at("duration_us").get<int64_t>()});

  // The vmm measures the guest's gap once the guest has beaten 5 more times
  // (and gives up after 5 s); until then query-live-update has no guest_gap_us.
  const auto deadline = Clock::now() + 6s;
  while (Clock::now() < deadline) {
    VMM_TRY(check_not_interrupted());
    VMM_TRY_ASSIGN(status, run_command(client, "query-live-update"));
    if (status.contains("guest_gap_us")) {
      sample.guest_gap_us = status["guest_gap_us"].get<int64_t>();
      break;
    }
    std::this_thread::sleep_for(5ms);
  }
  VMM_TRY_ASSIGN(memory, read_process_memory(vmm_pid));
  sample.memory_after = memory;
  return sample;
}

Result<VerifyOutcome> verify_guest(Client& client, double timeout_s) {
  client.set_timeout(std::chrono::milliseconds(static_cast<int64_t>((timeout_s + 30) * 1000)));
  VMM_TRY_ASSIGN(reply, run_command(client, "guest-verify", {{"timeout", timeout_s}}));
  client.set_timeout(Client::kDefaultTimeout);
  return VerifyOutcome{reply.value("pages_checked", int64_t{-1}), reply.value("mismatches", int64_t{-1}),
                       reply.value("duration_us", int64_t{-1})};
}

// Runs one configuration into `result` (which keeps whatever was measured
// before a failure). The vmm and its directory are gone when this returns.
Result<void> measure(const BenchOptions& options, ConfigurationResult& result) {
  const Configuration& config = result.config;
  VMM_TRY_ASSIGN(directory, TempDir::create("vmm-blackout-bench"));
  const std::string socket_path = directory.path() + "/vmm.sock";
  const std::string log_path = directory.path() + "/vmm.log";
  // The vmm's own logs only at warn and above: its info lines per client
  // connection are noise here, and the bench logs its progress itself.
  VMM_TRY_ASSIGN(vmm, ChildProcess::spawn({options.vmm_binary, "run", "--console", "none", "--control-socket",
                                           socket_path, "--memory", config.memory, "--vcpus",
                                           std::to_string(config.vcpus), "--memory-backing", config.backing,
                                           "--log-level", "warn"},
                                          log_path));
  auto with_log = [&](const Error& error) {
    return fail(fmt::format("{}\nvmm log (last lines):\n{}", error.describe(), tail(log_path, 10)));
  };

  const auto launched = Clock::now();
  VMM_TRY_ASSIGN(client, connect_when_ready(socket_path, vmm, log_path));
  if (auto stamped = wait_until_stamped(client, scaled_timeout_s(options.boot_timeout_s, config.memory_bytes));
      !stamped)
    return with_log(stamped.error());
  result.boot_seconds = std::chrono::duration<double>(Clock::now() - launched).count();
  VMM_TRY_ASSIGN(memory_before, read_process_memory(vmm.pid()));
  result.memory_before = memory_before;
  spdlog::info("{}: guest stamped after {:.1f} s; RssAnon {} KiB", config.label(), result.boot_seconds,
               memory_before.rss_anon_kib);

  for (int update = 1; update <= config.updates; ++update) {
    // Let the guest settle (re-fault its working set) so each update starts
    // from a steadily running guest, as the first one does.
    std::this_thread::sleep_for(std::chrono::milliseconds(options.settle_ms));
    auto sample = run_one_update(client, vmm.pid());
    if (!sample) return with_log(sample.error().with_context(fmt::format("update {}", update)));
    spdlog::info("{}: update {}/{}: blackout {} us, guest gap {} us, RssAnon {} KiB", config.label(), update,
                 config.updates, sample->blackout_us,
                 sample->guest_gap_us ? std::to_string(*sample->guest_gap_us) : "?",
                 sample->memory_after.rss_anon_kib);
    result.samples.push_back(std::move(*sample));
  }

  auto verify = [&]() -> Result<VerifyOutcome> {
    auto verified = verify_guest(client, scaled_timeout_s(options.verify_timeout_s, config.memory_bytes));
    if (!verified) return with_log(verified.error().with_context("guest-verify"));
    spdlog::info("{}: guest-verify: {} mismatches in {} pages ({:.1f} s)", config.label(), verified->mismatches,
                 verified->pages_checked, static_cast<double>(verified->duration_us) / 1e6);
    return *verified;
  };
  if (!options.skip_verify) {
    VMM_TRY_ASSIGN(verified, verify());
    result.verify = verified;
  }
  // The verify read every page, so the VM built by the last update now maps
  // all of RAM: the case of a guest that has run long enough to touch it all.
  if (!options.skip_verify && !options.skip_touched_update) {
    VMM_TRY_ASSIGN(memory, read_process_memory(vmm.pid()));
    result.memory_before_touched = memory;
    auto sample = run_one_update(client, vmm.pid());
    if (!sample) return with_log(sample.error().with_context("the update after guest-verify"));
    spdlog::info("{}: update after guest-verify: blackout {} us, guest gap {} us", config.label(),
                 sample->blackout_us, sample->guest_gap_us ? std::to_string(*sample->guest_gap_us) : "?");
    result.touched_update = std::move(*sample);
    VMM_TRY_ASSIGN(verified, verify());
    result.final_verify = verified;
  }

  // quit may close the connection before its reply: either way, then wait.
  (void)client.execute("quit");
  if (auto exited = vmm.wait_exit(10s); !exited)
    spdlog::warn("{}: the vmm did not exit within 10 s of quit; killing it", config.label());
  else if (!exited->exited || exited->code != 0)
    spdlog::warn("{}: the vmm ended with {} after quit", config.label(), describe(*exited));
  return {};
}

// ---------------------------------------------------------------------------
// Statistics and output.

struct Summary {
  int64_t min = 0, median = 0, p90 = 0, max = 0;
  size_t count = 0;
};

// Nearest-rank percentiles: every number shown is one that was measured.
std::optional<Summary> summarize(std::vector<int64_t> values) {
  if (values.empty()) return std::nullopt;
  std::ranges::sort(values);
  auto rank = [&](double percent) {
    const auto index = static_cast<size_t>(std::ceil(percent / 100.0 * static_cast<double>(values.size())));
    return values[std::clamp<size_t>(index, 1, values.size()) - 1];
  };
  return Summary{values.front(), rank(50), rank(90), values.back(), values.size()};
}

json to_json(const std::optional<Summary>& summary) {
  if (!summary) return nullptr;
  return {{"min", summary->min}, {"median", summary->median}, {"p90", summary->p90}, {"max", summary->max},
          {"count", summary->count}};
}

// Each sample's duration of phase `name` (UpdateSample or QemuSample).
template <class Sample>
std::vector<int64_t> phase_values(std::span<const Sample> samples, std::string_view name) {
  std::vector<int64_t> values;
  for (const auto& sample : samples)
    for (const auto& phase : sample.phases)
      if (phase.name == name) values.push_back(phase.duration_us);
  return values;
}

std::string cell(const std::optional<Summary>& summary, int64_t Summary::*field) {
  return summary ? std::to_string((*summary).*field) : "-";
}

// The guest's gap spans the blackout, give or take a tick: its last beat may
// fall after the blackout's start (the vCPU runs until the pause lands) and
// its first after the resume comes at once. A gap much shorter than that
// means the vmm looked too late, after the heartbeat ring (256 beats) had
// wrapped (see docs/measurements.md), and it is left out.
constexpr int64_t kGapToleranceUs = 2000;
bool gap_plausible(const UpdateSample& sample) {
  return sample.guest_gap_us && *sample.guest_gap_us + kGapToleranceUs >= sample.blackout_us;
}

// Summaries over some of the updates of one configuration.
struct SampleStats {
  size_t count = 0;
  std::optional<Summary> blackout, guest_gap, round_trip, rss_anon;
  std::vector<std::pair<std::string, std::optional<Summary>>> phases;  // in the order the vmm reports them
  size_t implausible_gaps = 0;
};

SampleStats stats_of(std::span<const UpdateSample> samples) {
  SampleStats stats;
  stats.count = samples.size();
  std::vector<int64_t> blackouts, gaps, round_trips, rss_anon;
  for (const auto& sample : samples) {
    blackouts.push_back(sample.blackout_us);
    round_trips.push_back(sample.round_trip_us);
    rss_anon.push_back(sample.memory_after.rss_anon_kib);
    if (gap_plausible(sample)) gaps.push_back(*sample.guest_gap_us);
    else ++stats.implausible_gaps;
  }
  stats.blackout = summarize(blackouts);
  stats.guest_gap = summarize(gaps);
  stats.round_trip = summarize(round_trips);
  stats.rss_anon = summarize(rss_anon);
  std::vector<std::string> names;
  for (const auto& sample : samples)
    for (const auto& phase : sample.phases)
      if (std::ranges::find(names, phase.name) == names.end()) names.push_back(phase.name);
  for (const auto& name : names) stats.phases.emplace_back(name, summarize(phase_values(samples, name)));
  return stats;
}

std::optional<Summary> phase_summary(const SampleStats& stats, std::string_view name) {
  for (const auto& [phase, summary] : stats.phases)
    if (phase == name) return summary;
  return std::nullopt;
}

// The first update is apart: it tears down a VM that has touched all of RAM
// since it was built (the guest stamped every page), while each later one
// follows a previous update by a moment, so the guest has re-touched only
// its working set.
std::span<const UpdateSample> first_update(const ConfigurationResult& result) {
  return std::span(result.samples).first(std::min<size_t>(1, result.samples.size()));
}
std::span<const UpdateSample> later_updates(const ConfigurationResult& result) {
  return std::span(result.samples).subspan(std::min<size_t>(1, result.samples.size()));
}

json to_json(const SampleStats& stats) {
  json phases = json::object();
  for (const auto& [name, summary] : stats.phases) phases[name] = to_json(summary);
  return {{"count", stats.count},
          {"blackout_us", to_json(stats.blackout)},
          {"phases_us", phases},
          {"guest_gap_us", to_json(stats.guest_gap)},
          {"implausible_guest_gaps", stats.implausible_gaps},
          {"round_trip_us", to_json(stats.round_trip)},
          {"rss_anon_kib", to_json(stats.rss_anon)}};
}

struct HostInfo {
  std::string kernel;
  unsigned cpus = 0;
  std::string load_at_start;
  std::string load_at_end;
};

std::string load_average() {
  std::string text = read_text("/proc/loadavg");
  std::istringstream words(text);
  std::string one, five, fifteen;
  words >> one >> five >> fifteen;
  return fmt::format("{} {} {}", one, five, fifteen);
}

HostInfo host_info() {
  HostInfo host;
  utsname name{};
  if (::uname(&name) == 0) host.kernel = fmt::format("{} {}", name.sysname, name.release);
  host.cpus = std::thread::hardware_concurrency();
  host.load_at_start = load_average();
  return host;
}

json to_json(const HostInfo& host) {
  return {{"kernel", host.kernel},
          {"cpus", host.cpus},
          {"load_average_at_start", host.load_at_start},
          {"load_average_at_end", host.load_at_end}};
}

std::span<const UpdateSample> touched_update(const ConfigurationResult& result) {
  return result.touched_update ? std::span(&*result.touched_update, 1) : std::span<const UpdateSample>();
}

std::string describe(const ProcessMemory& memory) {
  return fmt::format("RssAnon {} KiB, RssFile {} KiB, RssShmem {} KiB", memory.rss_anon_kib, memory.rss_file_kib,
                     memory.rss_shmem_kib);
}

std::string describe(const std::optional<VerifyOutcome>& verify) {
  if (!verify) return "not run";
  return fmt::format("{} mismatches in {} pages ({:.1f} s, re-faulting all RAM)", verify->mismatches,
                     verify->pages_checked, static_cast<double>(verify->duration_us) / 1e6);
}

void print_table(const HostInfo& host, const BenchOptions& options, const std::vector<ConfigurationResult>& results) {
  fmt::print("vmm exec live update blackout: {} ({} CPUs), load average {} at start, {} at end\n", host.kernel,
             host.cpus, host.load_at_start, host.load_at_end);
  fmt::print("vmm: {}\n", options.vmm_binary);
  fmt::print("Times in us. Columns:\n"
             "  first    update 1: the VM `vmm run` built, all RAM touched (stamped) since\n"
             "  touched  the update after guest-verify: a VM an update built, all RAM touched (verified) since\n"
             "  min..max nearest-rank percentiles over updates 2..N: only the working set touched since the previous\n");

  for (const auto& result : results) {
    const auto& config = result.config;
    fmt::print("\n== {}: guest stamped {:.1f} s after launch; {} + {} update(s) ==\n", config.label(),
               result.boot_seconds, result.samples.size(), result.touched_update ? 1 : 0);
    if (result.error) fmt::print("   FAILED: {}\n", *result.error);
    if (result.samples.empty()) continue;
    const SampleStats first = stats_of(first_update(result));
    const SampleStats touched = stats_of(touched_update(result));
    const SampleStats later = stats_of(later_updates(result));
    fmt::print("   {:<22} {:>9} {:>9} | {:>9} {:>9} {:>9} {:>9}\n", "", "first", "touched", "min", "median", "p90",
               "max");
    auto row = [](const std::string& name, const std::optional<Summary>& once, const std::optional<Summary>& again,
                  const std::optional<Summary>& many) {
      fmt::print("   {:<22} {:>9} {:>9} | {:>9} {:>9} {:>9} {:>9}\n", name, cell(once, &Summary::max),
                 cell(again, &Summary::max), cell(many, &Summary::min), cell(many, &Summary::median),
                 cell(many, &Summary::p90), cell(many, &Summary::max));
    };
    row("blackout", first.blackout, touched.blackout, later.blackout);
    for (const auto& [name, summary] : first.phases) {
      // prepare runs before the vCPUs pause and finish after they resume.
      const bool outside = name == "prepare" || name == "finish";
      row(fmt::format("  {}{}", name, outside ? " (not paused)" : ""), summary, phase_summary(touched, name),
          phase_summary(later, name));
    }
    row("guest gap", first.guest_gap, touched.guest_gap, later.guest_gap);
    row("client round trip", first.round_trip, touched.round_trip, later.round_trip);
    row("RssAnon KiB after", first.rss_anon, touched.rss_anon, later.rss_anon);
    const size_t implausible = first.implausible_gaps + touched.implausible_gaps + later.implausible_gaps;
    if (implausible > 0)
      fmt::print("   guest gap: {} update(s) left out, the vmm's value missing or far below the blackout\n",
                 implausible);
    if (result.memory_before) fmt::print("   before update 1:         {}\n", describe(*result.memory_before));
    if (result.memory_before_touched)
      fmt::print("   before the touched one:  {}\n", describe(*result.memory_before_touched));
    const auto& last = result.touched_update ? result.touched_update->memory_after : result.samples.back().memory_after;
    fmt::print("   after the last update:   {}\n", describe(last));
    fmt::print("   guest-verify after update {}: {}\n", result.samples.size(), describe(result.verify));
    if (result.touched_update)
      fmt::print("   guest-verify after the touched update: {}\n", describe(result.final_verify));
  }

  fmt::print("\nSummary (us; for updates 2..N the median unless noted):\n");
  const auto line = "{:<5} {:>5} {:<11} | {:>8} {:>8} | {:>8} {:>8} | {:>3} {:>8} {:>8} {:>8} {:>6} {:>8} {:>7} {:>7} "
                    "| {:>7} | {}\n";
  fmt::print(fmt::runtime(line), "", "", "", "first", "", "touched", "", "", "updates", "2..N", "", "", "", "", "",
             "RssAnon", "");
  fmt::print(fmt::runtime(line), "RAM", "vCPUs", "backing", "blackout", "handover", "blackout", "handover", "n",
             "blackout", "p90", "max", "freeze", "handover", "restore", "gap", "max KiB", "verify");
  for (const auto& result : results) {
    const auto& config = result.config;
    const SampleStats first = stats_of(first_update(result));
    const SampleStats touched = stats_of(touched_update(result));
    const SampleStats later = stats_of(later_updates(result));
    auto median = [](const std::optional<Summary>& summary) { return cell(summary, &Summary::median); };
    std::optional<Summary> rss_max;
    for (const auto* stats : {&first, &touched, &later})
      if (stats->rss_anon && (!rss_max || stats->rss_anon->max > rss_max->max)) rss_max = stats->rss_anon;
    std::string verify = "skipped";
    if (result.error) {
      verify = "FAILED";
    } else if (result.verify) {
      verify = fmt::format("{} bad", result.verify->mismatches + (result.final_verify ? result.final_verify->mismatches : 0));
    }
    fmt::print(fmt::runtime(line), config.memory, config.vcpus, config.backing, median(first.blackout),
               median(phase_summary(first, "handover")), median(touched.blackout),
               median(phase_summary(touched, "handover")), later.count, median(later.blackout),
               cell(later.blackout, &Summary::p90), cell(later.blackout, &Summary::max),
               median(phase_summary(later, "freeze")), median(phase_summary(later, "handover")),
               median(phase_summary(later, "restore")), median(later.guest_gap), cell(rss_max, &Summary::max),
               verify);
  }
}

json to_json(const UpdateSample& sample) {
  json phases = json::object();
  for (const auto& phase : sample.phases) phases[phase.name] = phase.duration_us;
  return {{"blackout_us", sample.blackout_us},
          {"phases_us", phases},
          {"guest_gap_us", sample.guest_gap_us ? json(*sample.guest_gap_us) : json(nullptr)},
          {"guest_gap_plausible", gap_plausible(sample)},
          {"round_trip_us", sample.round_trip_us},
          {"memory_after", to_json(sample.memory_after)}};
}

json to_json(const std::optional<VerifyOutcome>& verify) {
  if (!verify) return nullptr;
  return {{"pages_checked", verify->pages_checked},
          {"mismatches", verify->mismatches},
          {"duration_us", verify->duration_us}};
}

json results_json(const HostInfo& host, const BenchOptions& options, const std::vector<ConfigurationResult>& results) {
  json configurations = json::array();
  for (const auto& result : results) {
    const auto& config = result.config;
    json updates = json::array();
    for (const auto& sample : result.samples) updates.push_back(to_json(sample));
    json entry = {{"memory", config.memory},
                  {"memory_bytes", config.memory_bytes},
                  {"vcpus", config.vcpus},
                  {"backing", config.backing},
                  {"boot_seconds", result.boot_seconds},
                  {"memory_before", result.memory_before ? to_json(*result.memory_before) : json(nullptr)},
                  {"updates", updates},
                  {"first_update", to_json(stats_of(first_update(result)))},
                  {"later_updates", to_json(stats_of(later_updates(result)))},
                  {"verify", to_json(result.verify)},
                  {"memory_before_touched_update",
                   result.memory_before_touched ? to_json(*result.memory_before_touched) : json(nullptr)},
                  {"touched_update", result.touched_update ? to_json(*result.touched_update) : json(nullptr)},
                  {"final_verify", to_json(result.final_verify)},
                  {"error", result.error ? json(*result.error) : json(nullptr)}};
    configurations.push_back(std::move(entry));
  }
  return {{"host", to_json(host)}, {"vmm", options.vmm_binary}, {"configurations", configurations}};
}

// ---------------------------------------------------------------------------
// The QEMU peer (--peer qemu): the closest QEMU 7.2 comes to an exec update.
//
// QEMU 7.2 cannot hand its memfd to a new process itself (cpr-exec arrived in
// 10.2), so the new QEMU opens the old one's guest RAM memfd through
// /proc/OLD_PID/fd/N as a shared memory-backend-file, and with x-ignore-shared
// on both sides the migration stream ("exec:cat > FILE", then
// "exec:cat FILE") carries device state only. Each handover:
//   stop (old) -> migrate to FILE, until completed (old)
//   -> [start the new QEMU with -incoming defer, when started in the blackout]
//   -> migrate-incoming from FILE, until completed (new) -> cont (new);
// the blackout is the time from sending stop to cont's reply, on the
// bench's clock. For comparison, a full-RAM handover: x-ignore-shared off
// and the new QEMU on a fresh memfd, so all RAM goes through FILE.

enum class QemuMethod { ignore_shared_started_in_blackout, ignore_shared_prestarted, full_ram_prestarted };

std::string_view to_string(QemuMethod method) {
  switch (method) {
    case QemuMethod::ignore_shared_started_in_blackout: return "x-ignore-shared, new QEMU started in the blackout";
    case QemuMethod::ignore_shared_prestarted: return "x-ignore-shared, new QEMU started beforehand";
    case QemuMethod::full_ram_prestarted: return "full RAM through the file, new QEMU started beforehand";
  }
  return "?";
}

std::string_view short_name(QemuMethod method) {
  switch (method) {
    case QemuMethod::ignore_shared_started_in_blackout: return "shared-exec";
    case QemuMethod::ignore_shared_prestarted: return "shared-pre";
    case QemuMethod::full_ram_prestarted: return "full-ram";
  }
  return "?";
}

struct QemuOptions {
  std::string qemu_binary = "qemu-system-x86_64";
  std::string guest;
  int full_ram_updates = 2;
};

struct QemuSample {
  int64_t blackout_us = 0;
  std::vector<Phase> phases;  // stop, save, [start], load, cont
  std::optional<int64_t> guest_gap_us;
  int64_t state_bytes = 0;
};

struct QemuMethodResult {
  QemuMethod method;
  std::vector<QemuSample> samples;
};

struct QemuConfigurationResult {
  Configuration config;
  double boot_seconds = 0;
  std::optional<int64_t> steady_gap_us;  // the guest's max gap in its last log second before the first handover
  std::vector<QemuMethodResult> methods;
  std::optional<std::string> error;
};

// Where a new QEMU's guest RAM comes from.
struct RamSource {
  std::optional<std::string> shared_path;  // /proc/PID/fd/N of the old QEMU's memfd; none: a fresh memfd
};

class QemuInstance {
 public:
  static Result<QemuInstance> start(const QemuOptions& options, const Configuration& config,
                                    const std::string& directory, int index, const RamSource& ram, bool incoming) {
    const std::string name = fmt::format("qemu{}", index);
    const std::string socket_path = fmt::format("{}/{}.qmp", directory, name);
    const std::string console_path = fmt::format("{}/{}.console", directory, name);
    const std::string log_path = fmt::format("{}/{}.log", directory, name);
    const uint64_t mib = config.memory_bytes >> 20;
    const std::string memory_object =
        ram.shared_path ? fmt::format("memory-backend-file,id=mem,size={}M,share=on,mem-path={}", mib, *ram.shared_path)
                        : fmt::format("memory-backend-memfd,id=mem,size={}M,share=on", mib);
    std::vector<std::string> argv{options.qemu_binary, "-M", "microvm", "-enable-kvm", "-cpu", "host",
                                  "-smp", std::to_string(config.vcpus), "-m", fmt::format("{}M", mib),
                                  "-object", memory_object, "-machine", "memory-backend=mem",
                                  "-kernel", options.guest, "-append", "",
                                  "-nodefaults", "-no-user-config", "-display", "none",
                                  // The console carries the guest's heartbeat log (its own gap measurement).
                                  "-serial", "file:" + console_path,
                                  "-qmp", fmt::format("unix:{},server=on,wait=off", socket_path)};
    if (incoming) argv.insert(argv.end(), {"-incoming", "defer"});
    VMM_TRY_ASSIGN(process, ChildProcess::spawn(argv, log_path));
    const auto deadline = Clock::now() + 30s;
    while (true) {
      VMM_TRY(check_not_interrupted());
      if (auto exited = process.poll_exit())
        return fail(fmt::format("{} exited at start ({}):\n{}", name, describe(*exited), tail(log_path, 10)));
      if (std::filesystem::exists(socket_path)) {
        if (auto client = Client::connect(socket_path, 10s)) {
          VMM_TRY(client->negotiate());
          return QemuInstance(std::move(process), std::move(*client), console_path, log_path, name);
        }
      }
      if (Clock::now() > deadline) return fail(name + " did not open its QMP socket within 30 s:\n" + tail(log_path, 10));
      std::this_thread::sleep_for(1ms);
    }
  }

  // The path through which another process opens this QEMU's guest RAM memfd.
  Result<std::string> ram_memfd_path() const {
    const auto fds = fmt::format("/proc/{}/fd", process_.pid());
    std::error_code error;
    for (const auto& entry : std::filesystem::directory_iterator(fds, error)) {
      std::error_code link_error;
      const auto target = std::filesystem::read_symlink(entry.path(), link_error).string();
      if (!link_error && target.find("memfd:memory-backend-memfd") != std::string::npos) return entry.path().string();
    }
    return fail(fmt::format("{} has no guest RAM memfd among {}", name_, fds));
  }

  Result<json> command(const std::string& name, const json& arguments = json::object()) {
    return with_context(run_command(qmp_, name, arguments), name_);
  }

  Result<void> set_ignore_shared(bool on) {
    VMM_TRY(command("migrate-set-capabilities",
                    {{"capabilities", json::array({{{"capability", "x-ignore-shared"}, {"state", on}}})}}));
    return {};
  }

  // Polls query-migrate until the migration (either direction) completes.
  Result<void> wait_migration(std::chrono::seconds timeout) {
    const auto deadline = Clock::now() + timeout;
    while (Clock::now() < deadline) {
      VMM_TRY(check_not_interrupted());
      VMM_TRY_ASSIGN(status, command("query-migrate"));
      const std::string state = status.value("status", "");
      if (state == "completed") return {};
      if (state == "failed" || state == "cancelled")
        return fail(fmt::format("{}: migration {}: {}\n{}", name_, state, status.value("error-desc", ""),
                                tail(log_path_, 5)));
      std::this_thread::sleep_for(200us);
    }
    return fail(fmt::format("{}: migration did not complete within {} s", name_, timeout.count()));
  }

  void quit() {
    (void)qmp_.execute("quit");
    if (!process_.wait_exit(10s)) spdlog::warn("{} did not exit within 10 s of quit; killing it", name_);
  }

  [[nodiscard]] std::string console() const { return read_text(console_path_); }
  [[nodiscard]] const std::string& name() const { return name_; }

 private:
  QemuInstance(ChildProcess process, Client qmp, std::string console_path, std::string log_path, std::string name)
      : process_(std::move(process)), qmp_(std::move(qmp)), console_path_(std::move(console_path)),
        log_path_(std::move(log_path)), name_(std::move(name)) {}
  ChildProcess process_;
  Client qmp_;
  std::string console_path_;
  std::string log_path_;
  std::string name_;
};

// The "max gap N us" of each complete heartbeat log line the guest printed
// ("test-guest: heartbeat K: ..., max gap N us; ..."), once a second.
std::vector<int64_t> logged_gaps(const std::string& console) {
  std::vector<int64_t> gaps;
  std::istringstream lines(console);
  std::string line;
  while (std::getline(lines, line)) {
    if (lines.eof() || !line.starts_with("test-guest: heartbeat ")) continue;  // eof: an unfinished line
    const auto at = line.find("max gap ");
    if (at == std::string::npos) continue;
    gaps.push_back(std::strtoll(line.c_str() + at + 8, nullptr, 10));
  }
  return gaps;
}

Result<void> wait_console(const QemuInstance& qemu, std::string_view text, double timeout_s) {
  const auto deadline = Clock::now() + std::chrono::milliseconds(static_cast<int64_t>(timeout_s * 1000));
  while (Clock::now() < deadline) {
    VMM_TRY(check_not_interrupted());
    if (qemu.console().find(text) != std::string::npos) return {};
    std::this_thread::sleep_for(100ms);
  }
  return fail(fmt::format("{}: the guest did not print '{}' within {:.0f} s", qemu.name(), text, timeout_s));
}

// The guest's own gap across a handover: its first log line on the new
// QEMU may have been written before the stop (drained after), so the larger
// of the first two complete lines (two seconds of heartbeats) covers it.
Result<int64_t> guest_gap_after_handover(const QemuInstance& qemu) {
  const auto deadline = Clock::now() + 10s;
  while (Clock::now() < deadline) {
    VMM_TRY(check_not_interrupted());
    if (auto gaps = logged_gaps(qemu.console()); gaps.size() >= 2) return std::max(gaps[0], gaps[1]);
    std::this_thread::sleep_for(50ms);
  }
  return fail(qemu.name() + ": the guest logged no two heartbeat lines within 10 s of the handover");
}

int64_t elapsed_us(Clock::time_point since) {
  return std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - since).count();
}

// One handover from `old_qemu` to a new QEMU, which it returns.
Result<std::pair<QemuInstance, QemuSample>> qemu_handover(const QemuOptions& options, const Configuration& config,
                                                          const std::string& directory, int index,
                                                          QemuInstance& old_qemu, QemuMethod method) {
  const bool full_ram = method == QemuMethod::full_ram_prestarted;
  RamSource ram;
  if (!full_ram) {
    VMM_TRY_ASSIGN(path, old_qemu.ram_memfd_path());
    ram.shared_path = path;
  }
  auto start_new = [&]() -> Result<QemuInstance> {
    VMM_TRY_ASSIGN(started, QemuInstance::start(options, config, directory, index, ram, /*incoming=*/true));
    VMM_TRY(started.set_ignore_shared(!full_ram));
    return started;
  };
  std::optional<QemuInstance> new_qemu;
  if (method != QemuMethod::ignore_shared_started_in_blackout) {
    VMM_TRY_ASSIGN(started, start_new());
    new_qemu.emplace(std::move(started));
  }
  VMM_TRY(old_qemu.set_ignore_shared(!full_ram));
  // QEMU 7.2 caps a migration at 128 MiB/s unless told otherwise: lift the
  // cap so a full-RAM handover runs as fast as this machine can copy.
  VMM_TRY(old_qemu.command("migrate-set-parameters", {{"max-bandwidth", int64_t{1} << 40}}));
  const std::string state_path = fmt::format("{}/state{}", directory, index);

  QemuSample sample;
  const auto blackout_started = Clock::now();
  auto phase_started = blackout_started;
  auto phase_done = [&](std::string name) {
    sample.phases.push_back({std::move(name), elapsed_us(phase_started)});
    phase_started = Clock::now();
  };
  VMM_TRY(old_qemu.command("stop"));
  phase_done("stop");
  VMM_TRY(old_qemu.command("migrate", {{"uri", "exec:cat > " + state_path}}));
  VMM_TRY(old_qemu.wait_migration(600s));
  phase_done("save");
  if (!new_qemu) {
    VMM_TRY_ASSIGN(started, start_new());
    new_qemu.emplace(std::move(started));
    phase_done("start");
  }
  VMM_TRY(new_qemu->command("migrate-incoming", {{"uri", "exec:cat " + state_path}}));
  VMM_TRY(new_qemu->wait_migration(600s));
  phase_done("load");
  // The source was stopped, so the destination stays paused until told.
  VMM_TRY(new_qemu->command("cont"));
  phase_done("cont");
  sample.blackout_us = elapsed_us(blackout_started);

  std::error_code error;
  sample.state_bytes = static_cast<int64_t>(std::filesystem::file_size(state_path, error));
  std::filesystem::remove(state_path, error);
  old_qemu.quit();
  VMM_TRY_ASSIGN(gap, guest_gap_after_handover(*new_qemu));
  sample.guest_gap_us = gap;
  return std::pair{std::move(*new_qemu), std::move(sample)};
}

Result<void> measure_qemu(const BenchOptions& bench, const QemuOptions& options, QemuConfigurationResult& result) {
  const Configuration& config = result.config;
  if (config.memory_bytes % (1 << 20) != 0) return fail("QEMU needs a RAM size in whole MiB");
  VMM_TRY_ASSIGN(directory, TempDir::create("vmm-blackout-bench-qemu"));
  int index = 0;
  const auto launched = Clock::now();
  VMM_TRY_ASSIGN(first, QemuInstance::start(options, config, directory.path(), index++, RamSource{}, false));
  std::optional<QemuInstance> current(std::move(first));
  VMM_TRY(wait_console(*current, "stamping finished", scaled_timeout_s(bench.boot_timeout_s, config.memory_bytes)));
  result.boot_seconds = std::chrono::duration<double>(Clock::now() - launched).count();
  // One more log line, so the steady state's gap is known before any handover.
  const auto lines_at_stamp = logged_gaps(current->console()).size();
  const auto deadline = Clock::now() + 5s;
  while (logged_gaps(current->console()).size() <= lines_at_stamp && Clock::now() < deadline)
    std::this_thread::sleep_for(50ms);
  if (auto gaps = logged_gaps(current->console()); !gaps.empty()) result.steady_gap_us = gaps.back();
  spdlog::info("{} under QEMU: guest stamped after {:.1f} s", config.label(), result.boot_seconds);

  for (QemuMethod method : {QemuMethod::ignore_shared_started_in_blackout, QemuMethod::ignore_shared_prestarted,
                            QemuMethod::full_ram_prestarted}) {
    QemuMethodResult& method_result = result.methods.emplace_back(QemuMethodResult{method, {}});
    const int updates = method == QemuMethod::full_ram_prestarted ? options.full_ram_updates : config.updates;
    for (int update = 1; update <= updates; ++update) {
      std::this_thread::sleep_for(std::chrono::milliseconds(bench.settle_ms));
      auto handed = qemu_handover(options, config, directory.path(), index++, *current, method);
      if (!handed)
        return std::unexpected(handed.error().with_context(fmt::format("{} handover {}", short_name(method), update)));
      current.reset();
      current.emplace(std::move(handed->first));
      spdlog::info("{} under QEMU: {} {}/{}: blackout {} us, guest gap {} us, state {} bytes", config.label(),
                   short_name(method), update, updates, handed->second.blackout_us,
                   handed->second.guest_gap_us.value_or(-1), handed->second.state_bytes);
      method_result.samples.push_back(std::move(handed->second));
    }
  }
  current->quit();
  return {};
}

void print_qemu_table(const HostInfo& host, const QemuOptions& options,
                      const std::vector<QemuConfigurationResult>& results) {
  fmt::print("QEMU peer: {} ({} CPUs), load average {} at start, {} at end\n", host.kernel, host.cpus,
             host.load_at_start, host.load_at_end);
  fmt::print("qemu: {}; guest: {}\n", options.qemu_binary, options.guest);
  fmt::print("times in us, on the bench's clock (stop sent .. cont answered); nearest-rank percentiles\n");
  for (const auto& result : results) {
    fmt::print("\n== {} under QEMU: guest stamped {:.1f} s after launch; steady-state max gap {} us ==\n",
               result.config.label(), result.boot_seconds,
               result.steady_gap_us ? std::to_string(*result.steady_gap_us) : "?");
    if (result.error) fmt::print("   FAILED: {}\n", *result.error);
    for (const auto& method : result.methods) {
      if (method.samples.empty()) continue;
      fmt::print("   -- {}: {} handover(s), state file {} bytes\n", to_string(method.method), method.samples.size(),
                 method.samples.back().state_bytes);
      fmt::print("   {:<22} {:>9} {:>9} {:>9} {:>9}\n", "", "min", "median", "p90", "max");
      auto row = [](const std::string& name, const std::optional<Summary>& summary) {
        fmt::print("   {:<22} {:>9} {:>9} {:>9} {:>9}\n", name, cell(summary, &Summary::min),
                   cell(summary, &Summary::median), cell(summary, &Summary::p90), cell(summary, &Summary::max));
      };
      std::vector<int64_t> blackouts, gaps;
      for (const auto& sample : method.samples) {
        blackouts.push_back(sample.blackout_us);
        if (sample.guest_gap_us) gaps.push_back(*sample.guest_gap_us);
      }
      row("blackout", summarize(blackouts));
      for (const char* phase : {"stop", "save", "start", "load", "cont"})
        if (auto values = phase_values(std::span(method.samples), phase); !values.empty())
          row(fmt::format("  {}", phase), summarize(values));
      row("guest gap", summarize(gaps));
    }
  }
}

json qemu_results_json(const HostInfo& host, const QemuOptions& options,
                       const std::vector<QemuConfigurationResult>& results) {
  json configurations = json::array();
  for (const auto& result : results) {
    json methods = json::array();
    for (const auto& method : result.methods) {
      json samples = json::array();
      std::vector<int64_t> blackouts;
      for (const auto& sample : method.samples) {
        json phases = json::object();
        for (const auto& phase : sample.phases) phases[phase.name] = phase.duration_us;
        samples.push_back({{"blackout_us", sample.blackout_us},
                           {"phases_us", phases},
                           {"guest_gap_us", sample.guest_gap_us ? json(*sample.guest_gap_us) : json(nullptr)},
                           {"state_bytes", sample.state_bytes}});
        blackouts.push_back(sample.blackout_us);
      }
      methods.push_back({{"method", short_name(method.method)},
                         {"description", to_string(method.method)},
                         {"handovers", samples},
                         {"blackout_us", to_json(summarize(blackouts))}});
    }
    configurations.push_back({{"memory", result.config.memory},
                              {"memory_bytes", result.config.memory_bytes},
                              {"vcpus", result.config.vcpus},
                              {"boot_seconds", result.boot_seconds},
                              {"steady_gap_us", result.steady_gap_us ? json(*result.steady_gap_us) : json(nullptr)},
                              {"methods", methods},
                              {"error", result.error ? json(*result.error) : json(nullptr)}});
  }
  return {{"host", to_json(host)},
          {"qemu", options.qemu_binary},
          {"guest", options.guest},
          {"configurations", configurations}};
}

// `program` itself when it names a path, else its first executable match in
// $PATH (resolved here because only execv is safe to call after fork).
Result<std::string> find_program(const std::string& program) {
  if (program.find('/') != std::string::npos) {
    if (::access(program.c_str(), X_OK) != 0) return fail_errno(program + " is not executable");
    return program;
  }
  const char* path = std::getenv("PATH");
  std::istringstream directories(path ? path : "/usr/local/bin:/usr/bin:/bin");
  std::string directory;
  while (std::getline(directories, directory, ':')) {
    const std::string candidate = (std::filesystem::path(directory.empty() ? "." : directory) / program).string();
    if (::access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return fail(program + " is not in $PATH (install qemu-system-x86 or pass --qemu PATH)");
}

// Writes `document` to `path` (nothing to do when empty).
Result<void> write_json_file(const std::string& path, const json& document) {
  if (path.empty()) return {};
  std::ofstream out(path);
  out << document.dump(2) << '\n';
  if (!out.flush()) return fail_errno("cannot write " + path);
  return {};
}

std::string default_vmm_binary() {
  std::error_code error;
  const auto self = std::filesystem::read_symlink("/proc/self/exe", error);
  return error ? "vmm" : (self.parent_path() / "vmm").string();
}

Result<std::vector<Configuration>> build_matrix(const BenchOptions& options) {
  VMM_TRY_ASSIGN(large_threshold, vmm::parse_size(options.large_threshold, "--large-threshold"));
  std::vector<Configuration> matrix;
  for (const auto& memory : options.memory_sizes) {
    VMM_TRY_ASSIGN(bytes, vmm::parse_size(memory, "--memory"));
    for (uint32_t vcpus : options.vcpu_counts)
      for (const auto& backing : options.backings) {
        const int updates = bytes >= large_threshold ? options.large_updates.value_or(options.updates) : options.updates;
        matrix.push_back(Configuration{memory, bytes, vcpus, backing, updates});
      }
  }
  return matrix;
}

}  // namespace

// Measures every configuration of the matrix in turn (stopping early on
// Ctrl-C), then writes the JSON file and prints the JSON or the table.
// Returns whether any configuration failed.
template <class ResultType, class Configs, class Measure, class ToJson, class Print>
bool run_matrix(const Configs& matrix, const BenchOptions& options, HostInfo& host, Measure measure_one,
                ToJson to_json, Print print, std::string_view where) {
  bool any_failed = false;
  std::vector<ResultType> results;
  for (const auto& config : matrix) {
    if (g_interrupted) break;
    ResultType result{.config = config};
    spdlog::info("{} {}: launching", config.label(), where);
    if (auto measured = measure_one(result); !measured) {
      result.error = measured.error().describe();
      any_failed = true;
      spdlog::error("{} {}: {}", config.label(), where, *result.error);
    }
    results.push_back(std::move(result));
  }
  host.load_at_end = load_average();
  const json document = to_json(results);
  if (auto written = write_json_file(options.json_file, document); !written) {
    spdlog::error("{}", written.error().describe());
    any_failed = true;
  }
  if (options.json_output)
    fmt::print("{}\n", document.dump(2));
  else
    print(results);
  return any_failed;
}

int main(int argc, char** argv) {
  CLI::App app{"vmm-blackout-bench: measure the blackout of exec live updates across RAM sizes, vCPU counts and "
               "RAM backings (or, with --peer qemu, QEMU 7.2's closest equivalent). Results on stdout, progress "
               "on stderr."};
  BenchOptions options;
  QemuOptions qemu;
  std::string peer = "vmm";
  options.vmm_binary = default_vmm_binary();
  qemu.guest = (std::filesystem::path(options.vmm_binary).parent_path() / "test-guest.elf").string();
  app.add_option("--peer", peer, "What to measure: vmm (exec live updates) or qemu (QEMU handovers)")
      ->check(CLI::IsMember({"vmm", "qemu"}))
      ->capture_default_str();
  app.add_option("--vmm", options.vmm_binary, "The vmm binary (default: the one beside this program)")
      ->check(CLI::ExistingFile);
  app.add_option("--memory", options.memory_sizes, "RAM sizes, comma-separated")
      ->delimiter(',')
      ->capture_default_str();
  auto* vcpus_option = app.add_option("--vcpus", options.vcpu_counts,
                                      "vCPU counts, comma-separated (with --peer qemu: 1 unless given)")
                           ->delimiter(',')
                           ->check(CLI::Range(1, 64))
                           ->capture_default_str();
  app.add_option("--backing", options.backings, "RAM backings, comma-separated (vmm only)")
      ->delimiter(',')
      ->check(CLI::IsMember({"guest_memfd", "memfd"}))
      ->capture_default_str();
  auto* updates_option =
      app.add_option("--updates", options.updates,
                     "Updates in a row per configuration (with --peer qemu: per method, 5 unless given)")
          ->check(CLI::Range(1, 100000))
          ->capture_default_str();
  app.add_option("--large-updates", options.large_updates,
                 "Updates for configurations with at least --large-threshold of RAM (default: --updates)")
      ->check(CLI::Range(1, 100000));
  app.add_option("--large-threshold", options.large_threshold, "RAM size from which --large-updates applies")
      ->capture_default_str();
  app.add_option("--settle-ms", options.settle_ms, "Pause before each update, in ms")
      ->check(CLI::Range(0, 60000))
      ->capture_default_str();
  app.add_option("--boot-timeout", options.boot_timeout_s,
                 "Seconds to wait for the guest to stamp its RAM (default: 60 + 60 per GiB)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--verify-timeout", options.verify_timeout_s,
                 "Seconds the guest may take to verify its RAM (default: 60 + 60 per GiB)")
      ->check(CLI::NonNegativeNumber);
  app.add_flag("--skip-verify", options.skip_verify,
               "Do not verify the guest (and so skip the update after a verify, too)");
  app.add_flag("--skip-touched-update", options.skip_touched_update,
               "Skip the extra update after guest-verify has touched all RAM (and the second verify)");
  app.add_option("--qemu", qemu.qemu_binary, "The QEMU binary (--peer qemu)")->capture_default_str();
  app.add_option("--guest", qemu.guest, "The test guest ELF QEMU boots (default: beside the vmm)")
      ->check(CLI::ExistingFile);
  app.add_option("--full-ram-updates", qemu.full_ram_updates,
                 "Full-RAM handovers per configuration (--peer qemu; 0 skips them)")
      ->check(CLI::Range(0, 1000))
      ->capture_default_str();
  app.add_flag("--json", options.json_output, "Print the results as JSON (with every sample)");
  app.add_option("--json-file", options.json_file, "Also write the JSON results to this file");
  app.add_option("--log-level", options.log_level, "Progress log level on stderr")->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  spdlog::set_default_logger(spdlog::stderr_color_mt("bench"));
  spdlog::set_pattern("[%H:%M:%S.%e] bench %^%l%$: %v");
  spdlog::set_level(spdlog::level::from_str(options.log_level));

  const bool measure_qemu_peer = peer == "qemu";
  if (measure_qemu_peer) {
    // Without the vmm's shared region the test guest works on one vCPU, and
    // QEMU's RAM is a memfd: no backing or vCPU matrix unless asked for.
    options.backings = {"memfd"};
    if (vcpus_option->count() == 0) options.vcpu_counts = {1};
    if (updates_option->count() == 0) options.updates = 5;
  }
  auto matrix = build_matrix(options);
  if (!matrix) {
    spdlog::error("{}", matrix.error().describe());
    return 2;
  }
  if (!measure_qemu_peer && ::access(options.vmm_binary.c_str(), X_OK) != 0) {
    spdlog::error("{} is not an executable vmm binary (use --vmm)", options.vmm_binary);
    return 2;
  }
  if (measure_qemu_peer) {
    if (::access(qemu.guest.c_str(), R_OK) != 0) {
      spdlog::error("no test guest at {} (use --guest)", qemu.guest);
      return 2;
    }
    auto found = find_program(qemu.qemu_binary);
    if (!found) {
      spdlog::error("{}", found.error().describe());
      return 2;
    }
    qemu.qemu_binary = *found;
  }

  struct sigaction interrupt{};
  interrupt.sa_handler = on_interrupt;
  sigemptyset(&interrupt.sa_mask);
  for (int signo : {SIGINT, SIGTERM, SIGHUP}) ::sigaction(signo, &interrupt, nullptr);

  HostInfo host = host_info();
  bool any_failed = false;
  if (measure_qemu_peer) {
    any_failed = run_matrix<QemuConfigurationResult>(
        *matrix, options, host, [&](QemuConfigurationResult& result) { return measure_qemu(options, qemu, result); },
        [&](const auto& results) { return qemu_results_json(host, qemu, results); },
        [&](const auto& results) { print_qemu_table(host, qemu, results); }, "under QEMU");
  } else {
    any_failed = run_matrix<ConfigurationResult>(
        *matrix, options, host, [&](ConfigurationResult& result) { return measure(options, result); },
        [&](const auto& results) { return results_json(host, options, results); },
        [&](const auto& results) { print_table(host, options, results); }, "on the vmm");
  }
  if (g_interrupted) return 130;
  return any_failed ? 1 : 0;
}
