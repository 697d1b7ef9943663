#include "tools/bench/report.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <set>
#include <sstream>

#include <fmt/format.h>

#include "tools/bench/progress.h"
#include "tools/bench/stats.h"

namespace bench {

namespace {

Result<void> write_file(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::trunc);
  out << text;
  if (!out.flush()) return fail_errno("cannot write " + path);
  return {};
}

std::string csv_field(const std::string& text) {
  if (text.find_first_of(",\"\n\r") == std::string::npos) return text;
  std::string quoted = "\"";
  for (char c : text) quoted += c == '"' ? std::string("\"\"") : std::string(1, c);
  return quoted + "\"";
}

std::string optional_number(const std::optional<int64_t>& value) {
  return value ? std::to_string(*value) : "";
}

json optional_json(const std::optional<int64_t>& value) { return value ? json(*value) : json(nullptr); }

// Phase names over all samples, in order of first appearance.
std::vector<std::string> all_phase_names(const std::vector<Sample>& samples) {
  std::vector<std::string> names;
  for (const auto& sample : samples)
    for (const auto& phase : sample.phases)
      if (std::ranges::find(names, phase.name) == names.end()) names.push_back(phase.name);
  return names;
}

std::optional<int64_t> phase_of(const Sample& sample, const std::string& name) {
  for (const auto& phase : sample.phases)
    if (phase.name == name) return phase.duration_us;
  return std::nullopt;
}

// The systems this run measured, in report order.
std::vector<std::string> systems_of(const BlackoutOptions& options) {
  std::vector<std::string> systems;
  for (const auto& system : all_systems()) {
    const bool ours = is_ours(system);
    const std::string name = ours ? system.substr(4) : system;
    const auto& chosen = ours ? options.modes : options.peers;
    if (std::ranges::find(chosen, name) != chosen.end()) systems.push_back(system);
  }
  return systems;
}

std::string in_ms(int64_t us) {
  const double value = static_cast<double>(us) / 1e3;
  if (value < 10) return fmt::format("{:.2f}", value);
  if (value < 100) return fmt::format("{:.1f}", value);
  return fmt::format("{:.0f}", value);
}

std::string in_s(int64_t us) {
  const double value = static_cast<double>(us) / 1e6;
  if (value < 10) return fmt::format("{:.2f}", value);
  return fmt::format("{:.1f}", value);
}

std::string cells(const std::optional<Summary>& summary, std::string (*format)(int64_t)) {
  if (!summary) return "- | - | -";
  return fmt::format("{} | {} | {}", format(summary->median), format(summary->p90), format(summary->max));
}

std::string ratio(const std::optional<Summary>& ours, const std::optional<Summary>& theirs) {
  if (!ours || !theirs || theirs->median <= 0) return "-";
  const double value = static_cast<double>(ours->median) / static_cast<double>(theirs->median);
  if (value >= 10) return fmt::format("{:.0f}", value);
  if (value >= 0.1) return fmt::format("{:.2f}", value);
  if (value >= 0.01) return fmt::format("{:.3f}", value);
  return fmt::format("{:.4f}", value);
}

std::string vcpu_word(uint32_t vcpus) { return vcpus == 1 ? "vCPU" : "vCPUs"; }

// The phases inside our blackout, for the stacked bars: prepare runs before
// the pause and finish after the resume (docs/live-update.md).
bool inside_blackout(const std::string& phase) { return phase != "prepare" && phase != "finish"; }

std::string quoted(const std::string& text) {
  std::string out = "'";
  for (char c : text) out += c == '\'' ? std::string("''") : std::string(1, c);
  return out + "'";
}

const std::map<std::string, std::string>& system_colours() {
  static const std::map<std::string, std::string> colours{{"vmm-exec", "#1f77b4"},
                                                          {"vmm-transfer", "#2ca02c"},
                                                          {"qemu-shared", "#ff7f0e"},
                                                          {"qemu-file", "#d62728"}};
  return colours;
}

std::string system_title(const std::string& system) {
  if (system == "vmm-exec") return "vmm exec";
  if (system == "vmm-transfer") return "vmm transfer";
  if (system == "qemu-shared") return "QEMU x-ignore-shared";
  if (system == "qemu-file") return "QEMU via file";
  return system;
}

std::string block_name(const std::string& prefix, const std::string& system, uint32_t vcpus) {
  std::string name = "$" + prefix + "_" + system + "_" + std::to_string(vcpus);
  std::ranges::replace(name, '-', '_');
  return name;
}

std::string terminal(const std::string& out, const std::string& file, size_t panels) {
  return fmt::format("set terminal pngcairo size {},520 enhanced font 'DejaVu Sans,11'\nset output {}\n",
                     std::max<size_t>(1, panels) * 620, quoted((std::filesystem::absolute(out) / file).string()));
}

// The log-scaled RAM axis, ticks at the measured sizes.
std::string ram_axis(const BlackoutOptions& options) {
  double smallest = 1e30, largest = 0;
  std::vector<std::string> ticks;
  for (const auto& size : options.sizes) {
    const double value = gib(size.bytes);
    smallest = std::min(smallest, value);
    largest = std::max(largest, value);
    ticks.push_back(fmt::format("\"{}\" {}", size.label, value));
  }
  std::string text = "set logscale x 2\n";
  text += fmt::format("set xrange [{}:{}]\n", smallest / 1.6, largest * 1.6);
  text += fmt::format("set xtics ({})\n", fmt::join(ticks, ", "));
  text += "set xlabel 'guest RAM'\nset grid\nset pointsize 1.3\n"
          "set key outside bottom center horizontal maxrows 2 samplen 2\nset bmargin 7\n";
  return text;
}

// One panel per vCPU count of `value` (median per system) against RAM size.
// Returns the script, or "" when nothing was measured.
std::string line_plot(const std::string& out, const std::string& file, const std::string& title,
                      const std::string& ylabel, const BlackoutOptions& options, const RunResults& results,
                      const std::string& block, std::optional<Summary> (Group::*value)() const, double unit_us) {
  std::string data, panels_text;
  size_t panels = 0;
  for (uint32_t vcpus : options.vcpus) {
    std::vector<std::string> series;
    for (const auto& system : systems_of(options)) {
      std::string points;
      for (const auto& size : options.sizes) {
        const Group group = group_of(results.samples, system, size.label, size.bytes, vcpus);
        if (auto summary = (group.*value)(); summary && summary->median > 0)
          points += fmt::format("{} {}\n", gib(size.bytes), static_cast<double>(summary->median) / unit_us);
      }
      if (points.empty()) continue;
      const std::string name = block_name(block, system, vcpus);
      data += fmt::format("{} << EOD\n{}EOD\n", name, points);
      series.push_back(fmt::format("{} using 1:2 with linespoints lw 2 pt 7 lc rgb '{}' title '{}'", name,
                                   system_colours().at(system), system_title(system)));
    }
    if (series.empty()) continue;
    ++panels;
    panels_text += fmt::format("set title '{} {}'\nplot {}\n", vcpus, vcpu_word(vcpus), fmt::join(series, ", \\\n     "));
  }
  if (panels == 0) return "";
  std::string script = terminal(out, file, panels);
  script += data;
  script += fmt::format("set multiplot layout 1,{} title '{}'\n", panels, title);
  script += ram_axis(options);
  script += fmt::format("set logscale y 10\nset ylabel '{}'\nset format y '%g'\n", ylabel);
  script += panels_text;
  script += "unset multiplot\n";
  return script;
}

std::string phases_plot(const std::string& out, const BlackoutOptions& options, const RunResults& results) {
  // Phase names inside the blackout, over all our samples.
  std::vector<std::string> names;
  for (const auto& sample : results.samples)
    if (is_ours(sample.system))
      for (const auto& phase : sample.phases)
        if (inside_blackout(phase.name) && std::ranges::find(names, phase.name) == names.end())
          names.push_back(phase.name);
  if (names.empty()) return "";
  static const std::vector<std::string> palette{"#4c72b0", "#dd8452", "#55a868", "#c44e52",
                                                "#8172b3", "#937860", "#da8bc3", "#8c8c8c"};
  // One panel per mode, each with its own scale: an exec blackout is tens to
  // hundreds of ms, a transfer one about 1-2 ms.
  std::string data, panels_text;
  size_t panels = 0;
  for (const auto& mode : options.modes) {
    std::string rows;
    for (const auto& size : options.sizes)
      for (uint32_t vcpus : options.vcpus) {
        const Group group = group_of(results.samples, "vmm-" + mode, size.label, size.bytes, vcpus);
        const auto blackout = group.blackout();
        if (!blackout) continue;
        rows += fmt::format("\"{} {}\"", size.label, vcpus == 1 ? "1 vCPU" : std::to_string(vcpus) + " vCPUs");
        for (const auto& name : names) {
          const auto phase = group.phase(name);
          rows += fmt::format(" {}", phase ? static_cast<double>(phase->median) / 1e3 : 0.0);
        }
        rows += fmt::format(" {}\n", static_cast<double>(blackout->median) / 1e3);
      }
    if (rows.empty()) continue;
    ++panels;
    std::string block = fmt::format("$phases_{}", mode);
    std::ranges::replace(block, '-', '_');
    data += fmt::format("{} << EOD\n{}EOD\n", block, rows);
    std::vector<std::string> series;
    for (size_t i = 0; i < names.size(); ++i)
      series.push_back(fmt::format("{} using {}{} title '{}' lc rgb '{}'", i == 0 ? block : "''", i + 2,
                                   i == 0 ? ":xtic(1)" : "", names[i], palette[i % palette.size()]));
    series.push_back(fmt::format("'' using 0:{} with points pt 9 ps 1.6 lc rgb 'black' title 'blackout'",
                                 names.size() + 2));
    panels_text += fmt::format("set title '{} mode'\nplot {}\n", mode, fmt::join(series, ", \\\n     "));
  }
  if (panels == 0) return "";
  std::string script = terminal(out, "phases.png", panels);
  script += data;
  // prepare runs before the pause and finish after the resume: not stacked.
  script += fmt::format("set multiplot layout 1,{} title 'Our blackout by phase (medians)'\n", panels);
  script += "set style data histograms\nset style histogram rowstacked\nset style fill solid 0.85 border -1\n"
            "set boxwidth 0.7\nset ylabel 'ms'\nset yrange [0:*]\nset grid ytics\n"
            "set key outside bottom center horizontal maxrows 2 samplen 2\nset bmargin 8\n"
            "set xtics rotate by -30\n";
  script += panels_text;
  script += "unset multiplot\n";
  return script;
}

}  // namespace

Result<void> write_samples_csv(const std::string& path, const RunResults& results) {
  const auto phases = all_phase_names(results.samples);
  std::string text = "system,mode,size,size_bytes,vcpus,backing,update,ok,blackout_us,guest_gap_us,brownout_us,"
                     "brownout_status,rss_anon_kib";
  for (const auto& phase : phases) text += fmt::format(",phase_{}_us", phase);
  text += ",notes\n";
  for (const auto& sample : results.samples) {
    text += fmt::format("{},{},{},{},{},{},{},{},{},{},{},{},{}", sample.system, sample.mode, sample.size,
                        sample.size_bytes, sample.vcpus, sample.backing, sample.update, sample.ok ? 1 : 0,
                        optional_number(sample.blackout_us), optional_number(sample.guest_gap_us),
                        optional_number(sample.brownout_us), sample.brownout_status,
                        optional_number(sample.rss_anon_kib));
    // Appended piece by piece: `"," + std::string&&` (an insert at 0) trips
    // GCC 12's -Wrestrict false positive at -O3 (GCC bug 105329).
    for (const auto& phase : phases) {
      text += ',';
      text += optional_number(phase_of(sample, phase));
    }
    text += ',';
    text += csv_field(sample.notes);
    text += '\n';
  }
  return write_file(path, text);
}

Result<void> write_samples_json(const std::string& path, const RunInfo& info, const BlackoutOptions& options,
                                const RunResults& results) {
  json samples = json::array();
  for (const auto& sample : results.samples) {
    json phases = json::object();
    for (const auto& phase : sample.phases) phases[phase.name] = phase.duration_us;
    samples.push_back({{"system", sample.system},
                       {"mode", sample.mode},
                       {"size", sample.size},
                       {"size_bytes", sample.size_bytes},
                       {"vcpus", sample.vcpus},
                       {"backing", sample.backing},
                       {"update", sample.update},
                       {"ok", sample.ok},
                       {"blackout_us", optional_json(sample.blackout_us)},
                       {"phases_us", phases},
                       {"guest_gap_us", optional_json(sample.guest_gap_us)},
                       {"brownout_us", optional_json(sample.brownout_us)},
                       {"brownout_status", sample.brownout_status},
                       {"rss_anon_kib", optional_json(sample.rss_anon_kib)},
                       {"notes", sample.notes}});
  }
  json verifications = json::array();
  for (const auto& verification : results.verifications)
    verifications.push_back({{"system", verification.system},
                             {"size", verification.size},
                             {"vcpus", verification.vcpus},
                             {"method", verification.method},
                             {"pages_checked", verification.pages_checked},
                             {"mismatches", verification.mismatches},
                             {"duration_us", verification.duration_us},
                             {"ok", verification.ok},
                             {"notes", verification.notes}});
  json failures = json::array();
  for (const auto& failure : results.failures)
    failures.push_back(
        {{"system", failure.system}, {"size", failure.size}, {"vcpus", failure.vcpus}, {"message", failure.message}});
  json sizes = json::array();
  for (const auto& size : options.sizes) sizes.push_back({{"label", size.label}, {"bytes", size.bytes}});
  const json document = {
      {"benchmark", "blackout"},
      {"run",
       {{"command", options.command_line},
        {"started_at", info.started_at},
        {"finished_at", info.finished_at},
        {"duration_s", info.duration_s},
        {"interrupted", info.interrupted},
        {"host", to_json(info.host)},
        {"host_tsc_khz", info.host_tsc_khz},
        {"qemu_version", info.qemu_version},
        {"commit", info.commit}}},
      {"options",
       {{"sizes", sizes},
        {"vcpus", options.vcpus},
        {"updates", options.updates},
        {"large_updates", options.large_updates},
        {"modes", options.modes},
        {"peers", options.peers},
        {"backing", options.backing},
        {"sweep_ms", options.sweep_ms},
        {"vmm", options.vmm},
        {"qemu", options.qemu},
        {"guest", options.guest}}},
      {"samples", samples},
      {"verifications", verifications},
      {"failures", failures}};
  return write_file(path, document.dump(2) + "\n");
}

Plots draw_plots(const std::string& out, const BlackoutOptions& options, const RunResults& results) {
  Plots plots;
  const std::string plots_dir = out + "/plots";
  std::error_code error;
  std::filesystem::create_directories(plots_dir, error);
  auto gnuplot = find_program("gnuplot", "install gnuplot-nox, e.g. with tools/setup.sh");
  if (error || !gnuplot) {
    plots.failed = true;
    plots.notes.push_back("none drawn: " + (error ? "cannot create " + plots_dir + ": " + error.message()
                                                  : gnuplot.error().describe()));
    return plots;
  }
  const std::vector<std::pair<std::string, std::string>> scripts{
      {"blackout.png",
       line_plot(out, "blackout.png", "Blackout per update (median)", "blackout (ms)", options, results, "blackout",
                 &Group::blackout, 1e3)},
      {"phases.png", phases_plot(out, options, results)},
      {"brownout.png",
       line_plot(out, "brownout.png", "Brown-out after the resume (median): until a RAM sweep runs at its old speed",
                 "brown-out (s)", options, results, "brownout", &Group::brownout, 1e6)}};
  for (const auto& [png, script] : scripts) {
    if (script.empty()) {
      plots.notes.push_back(png + ": nothing to plot (no measured values)");
      continue;
    }
    const std::string script_path = fmt::format("{}/{}.gp", plots_dir, png.substr(0, png.size() - 4));
    const std::string log_path = script_path + ".log";
    auto written = write_file(script_path, script);
    auto process = written ? ChildProcess::spawn({*gnuplot, script_path}, log_path)
                           : Result<ChildProcess>(std::unexpected(written.error()));
    std::optional<ExitStatus> status;
    if (process) status = process->wait_exit(60s);
    if (!process || !status || !status->exited || status->code != 0) {
      plots.failed = true;
      plots.notes.push_back(fmt::format("{}: not drawn: {}", png,
                                        !process ? process.error().describe()
                                                 : fmt::format("gnuplot {}: {}",
                                                               status ? describe(*status) : "timed out",
                                                               tail(log_path, 5))));
      continue;
    }
    plots.drawn.push_back(png);
  }
  return plots;
}

Result<void> write_summary(const std::string& path, const RunInfo& info, const BlackoutOptions& options,
                           const RunResults& results, const Plots& plots) {
  std::string md;
  const HostInfo& host = info.host;
  md += fmt::format("# vmm-bench blackout, {}\n\n", info.started_at);
  md += fmt::format("- Command: `{}`\n", options.command_line);
  md += fmt::format("- Machine: {}, {} CPUs, {:.1f} GiB RAM, {} {}; {}\n", host.cpu_model, host.cpus,
                    gib(host.memory_bytes), host.kernel, host.machine, host.hypervisor);
  md += fmt::format("- Load average (1, 5, 15 min): {} at the start, {} at the end\n", host.load_at_start,
                    host.load_at_end);
  md += fmt::format("- vmm: `{}`{}; guest RAM backing {}; guest option sweep-ms={}\n", options.vmm,
                    info.commit.empty() ? "" : fmt::format(" (commit {})", info.commit), options.backing,
                    options.sweep_ms);
  if (!options.peers.empty()) md += fmt::format("- QEMU: `{}`, {}\n", options.qemu, info.qemu_version);
  md += fmt::format("- Updates per configuration: {} ({} for {} and above)\n", options.updates, options.large_updates,
                    "4G");
  md += fmt::format("- Took {}{}\n\n",
                    info.duration_s < 120 ? fmt::format("{:.0f} s", info.duration_s)
                                          : fmt::format("{:.0f} min", info.duration_s / 60),
                    info.interrupted ? " (INTERRUPTED: the results are partial)" : "");

  md += "## Blackout, guest gap and brown-out\n\n";
  md += "Per update: median, 90th percentile and maximum (nearest rank). Blackout and guest gap in ms, "
        "brown-out in s. The ratio columns divide our median blackout by QEMU's on the same RAM size and vCPU "
        "count: below 1, ours is shorter. n counts the updates measured (failed ones in brackets). How each "
        "number is taken: docs/performance.md. Under QEMU the test guest works on one vCPU whatever the VM has.\n\n";
  md += "| RAM | vCPUs | system | n | blackout median | p90 | max | guest gap median | p90 | max | "
        "brown-out median | p90 | max | ours : qemu-shared | ours : qemu-file |\n";
  md += "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n";
  const auto systems = systems_of(options);
  for (const auto& size : options.sizes)
    for (uint32_t vcpus : options.vcpus) {
      const Group shared = group_of(results.samples, "qemu-shared", size.label, size.bytes, vcpus);
      const Group file = group_of(results.samples, "qemu-file", size.label, size.bytes, vcpus);
      for (const auto& system : systems) {
        const Group group = group_of(results.samples, system, size.label, size.bytes, vcpus);
        const auto blackout = group.blackout();
        std::string n = blackout ? std::to_string(blackout->count) : "0";
        if (group.failed > 0) n += fmt::format(" ({} failed)", group.failed);
        const bool ours = is_ours(system);
        md += fmt::format("| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n", size.label, vcpus, system, n,
                          cells(blackout, in_ms), cells(group.guest_gap(), in_ms), cells(group.brownout(), in_s),
                          ours ? ratio(blackout, shared.blackout()) : "", ours ? ratio(blackout, file.blackout()) : "");
      }
    }

  md += "\n## Phases\n\nMedian duration of each phase, in ms, in the order the system reports them. Ours: "
        "`prepare` runs before the pause and `finish` after the resume, the rest is the blackout. QEMU: "
        "`stop`, then `migrate` (x-ignore-shared: device state over a Unix socket) or `save`, `exit` (the old "
        "QEMU quits) and `load` (via file), then `cont`. RssAnon: the largest anonymous memory of the (new) VMM "
        "process after an update, in KiB; guest RAM is never in it.\n\n";
  md += "| RAM | vCPUs | system | phases (median ms) | RssAnon KiB |\n|---|---|---|---|---|\n";
  for (const auto& size : options.sizes)
    for (uint32_t vcpus : options.vcpus)
      for (const auto& system : systems) {
        const Group group = group_of(results.samples, system, size.label, size.bytes, vcpus);
        std::vector<std::string> parts;
        for (const auto& name : group.phase_names())
          if (auto phase = group.phase(name)) parts.push_back(fmt::format("{} {}", name, in_ms(phase->median)));
        std::optional<int64_t> rss;
        for (const Sample* sample : group.samples)
          if (sample->rss_anon_kib) rss = std::max(rss.value_or(0), *sample->rss_anon_kib);
        md += fmt::format("| {} | {} | {} | {} | {} |\n", size.label, vcpus, system,
                          parts.empty() ? "-" : fmt::format("{}", fmt::join(parts, " · ")),
                          rss ? std::to_string(*rss) : "-");
      }

  md += "\n## Memory checks\n\n";
  if (results.verifications.empty()) {
    md += "None ran.\n";
  } else {
    md += "| RAM | vCPUs | system | check | pages | mismatches | took | notes |\n|---|---|---|---|---|---|---|---|\n";
    for (const auto& v : results.verifications)
      md += fmt::format("| {} | {} | {} | {} | {} | {} | {} | {} |\n", v.size, v.vcpus, v.system, v.method,
                        v.pages_checked, v.ok ? "0" : (v.mismatches >= 0 ? fmt::format("**{}**", v.mismatches)
                                                                         : std::string("**check failed**")),
                        v.duration_us >= 0 ? human_us(v.duration_us) : "-", v.notes);
  }

  md += "\n## Failures\n\n";
  bool any_failure = false;
  for (const auto& failure : results.failures) {
    any_failure = true;
    const auto newline = failure.message.find('\n');
    md += fmt::format("- **{} {} {} {}**: {}\n", failure.system, failure.size, failure.vcpus, vcpu_word(failure.vcpus),
                      failure.message.substr(0, newline));
    if (newline != std::string::npos)
      md += fmt::format("\n  ```\n  {}\n  ```\n", failure.message.substr(newline + 1));
  }
  for (const auto& sample : results.samples)
    if (!sample.ok) {
      any_failure = true;
      md += fmt::format("- **{} {} {} {}, update {}**: {}\n", sample.system, sample.size, sample.vcpus,
                        vcpu_word(sample.vcpus), sample.update, sample.notes);
    }
  for (const auto& v : results.verifications)
    if (!v.ok) {
      any_failure = true;
      md += fmt::format("- **{} {} {} {}**: {} found {} mismatches {}\n", v.system, v.size, v.vcpus,
                        vcpu_word(v.vcpus), v.method, v.mismatches, v.notes);
    }
  if (!any_failure) md += "None: every update was measured and every memory check passed.\n";

  // Notes on samples that were measured, e.g. why a brown-out is missing.
  std::map<std::string, std::map<std::string, int>> notes;  // system -> note -> count
  for (const auto& sample : results.samples)
    if (sample.ok && !sample.notes.empty()) ++notes[sample.system][sample.notes];
  if (!notes.empty() || !plots.notes.empty()) {
    md += "\n## Notes\n\n";
    for (const auto& [system, counts] : notes)
      for (const auto& [note, count] : counts) md += fmt::format("- {} ({} update(s)): {}\n", system, count, note);
    for (const auto& note : plots.notes) md += fmt::format("- plot {}\n", note);
  }

  if (!plots.drawn.empty()) {
    md += "\n## Plots\n\n";
    for (const auto& png : plots.drawn) md += fmt::format("![{}]({})\n\n", png.substr(0, png.size() - 4), png);
  }
  return write_file(path, md);
}

}  // namespace bench
