// vmm-bench: measuring tools for the vmm, never part of the test suite.
//
//   vmm-bench blackout   live-update blackout, guest gap and brown-out of our
//                        vmm (exec and transfer modes) beside QEMU's two ways
//                        of moving a guest to a new QEMU process, across RAM
//                        sizes and vCPU counts; writes CSV, JSON, a Markdown
//                        table and PNG plots (docs/performance.md).
//
// Progress goes to stderr. Exit status: 0 when everything was measured and
// every memory check passed, 1 when anything failed (summary.md lists it),
// 2 on bad usage, 130 when interrupted (the results so far are written).
#include <time.h>
#include <unistd.h>

#include <filesystem>
#include <set>

#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include "tools/bench/common.h"
#include "tools/bench/guest_view.h"
#include "tools/bench/options.h"
#include "tools/bench/progress.h"
#include "tools/bench/report.h"
#include "tools/bench/runner.h"
#include "base/size.h"

namespace bench {
namespace {

std::string timestamp(const char* format, bool utc) {
  const time_t now = ::time(nullptr);
  tm parts{};
  if (utc) ::gmtime_r(&now, &parts);
  else ::localtime_r(&now, &parts);
  char text[64];
  ::strftime(text, sizeof text, format, &parts);
  return text;
}

std::string shell_quoted(const std::string& word) {
  if (!word.empty() && word.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_=.,/:+@%") ==
                           std::string::npos)
    return word;
  std::string quoted = "'";
  for (char c : word) quoted += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return quoted + "'";
}

std::string beside_self(const std::string& name) {
  std::error_code error;
  const auto self = std::filesystem::read_symlink("/proc/self/exe", error);
  return error ? name : (self.parent_path() / name).string();
}

void write_outputs(const std::string& out, const RunInfo& info, const BlackoutOptions& options,
                   const RunResults& results) {
  if (auto written = write_samples_csv(out + "/samples.csv", results); !written)
    fmt::print(stderr, "vmm-bench: {}\n", written.error().describe());
  if (auto written = write_samples_json(out + "/samples.json", info, options, results); !written)
    fmt::print(stderr, "vmm-bench: {}\n", written.error().describe());
}

int run_blackout(BlackoutOptions& options, const std::vector<std::string>& size_labels) {
  // Validate everything before the first VM starts.
  for (const auto& label : size_labels) {
    auto bytes = vmm::parse_size(label, "--sizes");
    if (!bytes) {
      fmt::print(stderr, "vmm-bench: {}\n", bytes.error().describe());
      return 2;
    }
    options.sizes.push_back({label, *bytes});
  }
  if (std::ranges::find(options.modes, "none") != options.modes.end()) {
    if (options.modes.size() != 1) {
      fmt::print(stderr, "vmm-bench: --modes none excludes the other modes\n");
      return 2;
    }
    options.modes.clear();
  }
  if (std::ranges::find(options.peers, "none") != options.peers.end()) {
    if (options.peers.size() != 1) {
      fmt::print(stderr, "vmm-bench: --peers none excludes the other peers\n");
      return 2;
    }
    options.peers.clear();
  }
  if (options.modes.empty() && options.peers.empty()) {
    fmt::print(stderr, "vmm-bench: nothing to measure (no --modes and --peers none)\n");
    return 2;
  }
  if (!options.modes.empty()) {
    if (auto vmm = find_program(options.vmm, "pass --vmm PATH"); !vmm) {
      fmt::print(stderr, "vmm-bench: {}\n", vmm.error().describe());
      return 2;
    }
  }
  if (!options.peers.empty()) {
    auto qemu = find_program(options.qemu, "install qemu-system-x86 (tools/setup.sh) or pass --qemu PATH");
    if (!qemu) {
      fmt::print(stderr, "vmm-bench: {}\n", qemu.error().describe());
      return 2;
    }
    options.qemu = *qemu;
    if (::access(options.guest.c_str(), R_OK) != 0) {
      fmt::print(stderr, "vmm-bench: no test guest ELF at {} (pass --guest PATH)\n", options.guest);
      return 2;
    }
    if (::access(options.shm_dir.c_str(), W_OK) != 0) {
      fmt::print(stderr, "vmm-bench: cannot write QEMU's guest RAM files in {}\n", options.shm_dir);
      return 2;
    }
  }
  if (options.out.empty()) options.out = "bench-results/" + timestamp("%Y%m%d-%H%M%S", false);
  const std::string logs_dir = options.out + "/logs";
  std::error_code error;
  std::filesystem::create_directories(logs_dir, error);
  if (error) {
    fmt::print(stderr, "vmm-bench: cannot create {}: {}\n", logs_dir, error.message());
    return 2;
  }

  install_interrupt_handlers();
  become_subreaper();
  RunInfo info;
  info.host = host_info();
  info.started_at = timestamp("%Y-%m-%dT%H:%M:%SZ", true);
  if (!options.peers.empty()) info.qemu_version = first_output_line(shell_quoted(options.qemu) + " --version");
  // The checkout the vmm was built in (build dirs live inside it).
  info.commit = first_output_line(fmt::format(
      "git -C {} describe --always --dirty --abbrev=10",
      shell_quoted(std::filesystem::absolute(options.vmm).parent_path().string())));
  // The guest publishes its TSC rate; this is the fallback (and a check).
  info.host_tsc_khz = calibrate_tsc_khz(250ms);
  const auto started = Clock::now();

  const int units = static_cast<int>(options.sizes.size() * options.vcpus.size() *
                                     (options.modes.size() + options.peers.size()));
  fmt::print(stderr,
             "vmm-bench blackout: {} measurement(s): sizes {}, vCPUs {}, updates {} ({} from 4G), modes [{}], "
             "peers [{}]; results in {}\n",
             units, fmt::join(size_labels, ","), fmt::join(options.vcpus, ","), options.updates, options.large_updates,
             fmt::join(options.modes, ","), fmt::join(options.peers, ","), options.out);
  Progress progress(units);
  RunResults results;
  RunContext context{options, progress, results, logs_dir, info.host_tsc_khz};
  for (const auto& size : options.sizes)
    for (uint32_t vcpus : options.vcpus) {
      if (!options.modes.empty() && !interrupted()) run_vmm(context, size, vcpus);
      if (!options.peers.empty() && !interrupted()) run_qemu(context, size, vcpus);
      // Partial results survive a crash or an interrupted run.
      write_outputs(options.out, info, options, results);
    }

  info.interrupted = interrupted();
  info.host.load_at_end = load_average();
  info.finished_at = timestamp("%Y-%m-%dT%H:%M:%SZ", true);
  info.duration_s = std::chrono::duration<double>(Clock::now() - started).count();
  write_outputs(options.out, info, options, results);
  const Plots plots = draw_plots(options.out, options, results);
  if (auto written = write_summary(options.out + "/summary.md", info, options, results, plots); !written)
    fmt::print(stderr, "vmm-bench: {}\n", written.error().describe());
  for (const auto& note : plots.notes) fmt::print(stderr, "vmm-bench: plot {}\n", note);

  const bool failed = results.failed() || plots.failed;
  fmt::print(stderr, "vmm-bench blackout: {} after {:.1f} min; {}/summary.md, samples.csv, samples.json{}\n",
             info.interrupted ? "INTERRUPTED" : failed ? "done, with FAILURES (see summary.md)" : "done",
             info.duration_s / 60, options.out,
             plots.drawn.empty() ? "" : fmt::format(", {}", fmt::join(plots.drawn, ", ")));
  if (info.interrupted) return 130;
  return failed ? 1 : 0;
}

}  // namespace
}  // namespace bench

int main(int argc, char** argv) {
  using bench::BlackoutOptions;
  CLI::App app{"vmm-bench: measuring tools for the vmm (not tests: they report numbers and never gate CI)"};
  app.require_subcommand(1);
  auto* blackout = app.add_subcommand(
      "blackout",
      "Live-update blackout, the guest's heartbeat gap and the brown-out after the resume: our vmm's exec and "
      "transfer modes beside QEMU's x-ignore-shared and via-file handovers to a new QEMU process, for each RAM "
      "size and vCPU count. Writes samples.csv, samples.json, summary.md and PNG plots to --out.");
  BlackoutOptions options;
  std::vector<std::string> sizes{"256M", "1G", "4G", "8G"};
  options.vmm = bench::beside_self("vmm");
  options.work_dir = std::getenv("TMPDIR") ? std::getenv("TMPDIR") : "/tmp";
  blackout->add_option("--sizes", sizes, "Guest RAM sizes, comma-separated (K, M, G suffixes)")
      ->delimiter(',')
      ->capture_default_str();
  blackout->add_option("--vcpus", options.vcpus, "vCPU counts, comma-separated")
      ->delimiter(',')
      ->check(CLI::Range(1, 32))
      ->capture_default_str();
  blackout->add_option("--updates", options.updates, "Updates per system, size and vCPU count")
      ->check(CLI::Range(1, 100000))
      ->capture_default_str();
  blackout
      ->add_option("--large-updates", options.large_updates,
                   "Updates for sizes of 4G and more, where each update waits out a brown-out of seconds to tens of seconds")
      ->check(CLI::Range(1, 100000))
      ->capture_default_str();
  blackout->add_option("--modes", options.modes, "Our live-update modes, comma-separated (exec, transfer), or none")
      ->delimiter(',')
      ->check(CLI::IsMember({"exec", "transfer", "none"}))
      ->capture_default_str();
  blackout
      ->add_option("--peers", options.peers,
                   "QEMU peers, comma-separated: qemu-shared (x-ignore-shared), qemu-file (migration via a file), "
                   "or none")
      ->delimiter(',')
      ->check(CLI::IsMember({"qemu-shared", "qemu-file", "none"}))
      ->capture_default_str();
  blackout->add_option("--backing", options.backing, "Our guest RAM backing")
      ->check(CLI::IsMember({"guest_memfd", "memfd"}))
      ->capture_default_str();
  blackout->add_option("--out", options.out, "Output folder (default: bench-results/YYYYMMDD-HHMMSS)");
  blackout->add_option("--vmm", options.vmm, "The vmm binary (default: the one beside vmm-bench)")
      ->capture_default_str();
  blackout->add_option("--qemu", options.qemu, "The QEMU binary")->capture_default_str();
  blackout->add_option("--guest", options.guest,
                       "The test guest's PVH ELF for QEMU (default: test-guest.elf beside the vmm)");
  blackout->add_option("--sweep-ms", options.sweep_ms,
                       "The guest's RAM sweep period (guest option sweep-ms): one pass over all RAM every N ms")
      ->check(CLI::Range(1, 60000))
      ->capture_default_str();
  blackout
      ->add_option("--work-dir", options.work_dir,
                   "Where sockets and qemu-file's state file go (needs free space for the largest guest)")
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);

  std::vector<std::string> words(argv, argv + argc);
  words[0] = std::filesystem::path(words[0]).filename().string();
  for (auto& word : words) word = bench::shell_quoted(word);
  options.command_line = fmt::format("{}", fmt::join(words, " "));
  if (options.guest.empty())
    options.guest = (std::filesystem::path(options.vmm).parent_path() / "test-guest.elf").string();
  return bench::run_blackout(options, sizes);
}
