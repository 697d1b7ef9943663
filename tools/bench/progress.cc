#include "tools/bench/progress.h"

#include <time.h>

#include <cstdio>

namespace bench {

void Progress::line(const std::string& message) const {
  const time_t now = ::time(nullptr);
  tm local{};
  ::localtime_r(&now, &local);
  fmt::print(stderr, "{:02}:{:02}:{:02} [{}/{}] {}: {}\n", local.tm_hour, local.tm_min, local.tm_sec, index_, total_,
             label_, message);
  std::fflush(stderr);
}

std::string human_us(int64_t us) {
  const double value = static_cast<double>(us);
  if (us < 1000) return fmt::format("{} us", us);
  if (us < 10'000) return fmt::format("{:.2f} ms", value / 1e3);
  if (us < 1'000'000) return fmt::format("{:.1f} ms", value / 1e3);
  return fmt::format("{:.1f} s", value / 1e6);
}

std::string vcpus_label(uint32_t vcpus) { return fmt::format("{} vCPU{}", vcpus, vcpus == 1 ? "" : "s"); }

}  // namespace bench
