// The outputs of `vmm-bench blackout` in --out: samples.csv and samples.json
// (every sample), summary.md (the table) and PNG plots drawn by gnuplot.
#pragma once

#include <string>
#include <vector>

#include "tools/bench/common.h"
#include "tools/bench/options.h"
#include "tools/bench/sample.h"

namespace bench {

struct RunInfo {
  HostInfo host;
  std::string started_at;   // UTC, ISO 8601
  std::string finished_at;
  double duration_s = 0;
  std::string qemu_version;
  std::string commit;       // of the working directory's git checkout, if any
  uint64_t host_tsc_khz = 0;
  bool interrupted = false;
};

Result<void> write_samples_csv(const std::string& path, const RunResults& results);
Result<void> write_samples_json(const std::string& path, const RunInfo& info, const BlackoutOptions& options,
                                const RunResults& results);
struct Plots {
  std::vector<std::string> drawn;  // PNG file names
  std::vector<std::string> notes;  // plots left out, and why
  bool failed = false;             // gnuplot missing or failing (no data is no failure)
};
// Draws blackout.png, phases.png and brownout.png into `out` (scripts and
// data in out/plots/, so a plot can be redrawn or restyled by hand).
Plots draw_plots(const std::string& out, const BlackoutOptions& options, const RunResults& results);
Result<void> write_summary(const std::string& path, const RunInfo& info, const BlackoutOptions& options,
                           const RunResults& results, const Plots& plots);

}  // namespace bench
