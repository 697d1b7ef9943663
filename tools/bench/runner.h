// The two measuring halves of `vmm-bench blackout`: our vmm (vmm_runner.cc)
// and the QEMU peers (qemu_runner.cc). Each runs one RAM size and vCPU
// count, appends what it measured (and what kept it from measuring) to the
// results, and never throws a failure further: the next configuration runs.
#pragma once

#include <cstddef>
#include <optional>
#include <string>
#include <vector>

#include "tools/bench/options.h"
#include "tools/bench/progress.h"
#include "tools/bench/sample.h"

namespace bench {

struct RunContext {
  const BlackoutOptions& options;
  Progress& progress;
  RunResults& results;
  std::string logs_dir;      // the vmm's and QEMU's logs and consoles
  uint64_t host_tsc_khz = 0; // calibrated at start, for guests that publish no tsc_khz
};

// The progress units of one configuration (our modes, or QEMU's paths),
// measured in order. give_up() reports every unit not measured yet, with
// the reason, so the run goes on with the next configuration.
class Units {
 public:
  // A unit is shown as `label_prefix` + name and reported as system
  // `system_prefix` + name.
  Units(RunContext& context, const std::vector<std::string>& names, std::string label_prefix,
        std::string system_prefix, const RamSize& size, uint32_t vcpus);
  // Begins the progress unit `index`, and any before it not begun yet.
  void begin(size_t index);
  void give_up(const std::string& message);

  size_t next = 0;  // the first unit not measured yet

 private:
  RunContext& context_;
  const std::vector<std::string>& names_;
  const std::string label_prefix_, system_prefix_;
  const RamSize& size_;
  const uint32_t vcpus_;
  size_t begun_ = 0;
};

// Why the host cannot hold a guest of `size` now (its RAM plus 1 GiB
// available), or nothing when it can or cannot tell.
[[nodiscard]] std::optional<std::string> memory_shortfall(const RamSize& size);

// Boots the vmm once and runs --updates live updates in each mode of
// --modes, then guest-verify after each mode. One progress unit per mode.
void run_vmm(RunContext& context, const RamSize& size, uint32_t vcpus);

// Boots QEMU once and runs --updates handovers for each path of --peers,
// each to a new QEMU process, then checks the page stamps from the host.
// One progress unit per path.
void run_qemu(RunContext& context, const RamSize& size, uint32_t vcpus);

// Timeouts that grow with RAM: stamping or verifying it under shadow paging
// (~10-15 us per first touch of a page, at 60% of each 1 ms tick), and
// waiting for a brown-out to end.
double stamp_timeout_s(uint64_t ram_bytes);
double brownout_timeout_s(uint64_t ram_bytes);

}  // namespace bench
