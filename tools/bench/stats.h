// Nearest-rank statistics: every number reported is one that was measured.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "tools/bench/sample.h"

namespace bench {

struct Summary {
  int64_t median = 0;
  int64_t p90 = 0;
  int64_t max = 0;
  size_t count = 0;
};

inline std::optional<Summary> summarize(std::vector<int64_t> values) {
  if (values.empty()) return std::nullopt;
  std::ranges::sort(values);
  auto rank = [&](double percent) {
    const auto index = static_cast<size_t>(std::ceil(percent / 100.0 * static_cast<double>(values.size())));
    return values[std::clamp<size_t>(index, 1, values.size()) - 1];
  };
  return Summary{rank(50), rank(90), values.back(), values.size()};
}

// The samples of one system on one RAM size and vCPU count. A failed sample
// still counts for what it did measure (a brown-out that timed out leaves a
// valid blackout); its failure is listed apart.
struct Group {
  std::string system;
  std::string size;
  uint64_t size_bytes = 0;
  uint32_t vcpus = 1;
  size_t failed = 0;  // samples not ok
  std::vector<const Sample*> samples;

  [[nodiscard]] std::optional<Summary> blackout() const;
  [[nodiscard]] std::optional<Summary> guest_gap() const;
  [[nodiscard]] std::optional<Summary> brownout() const;
  [[nodiscard]] std::optional<Summary> phase(const std::string& name) const;
  // Phase names in the order the system reports them.
  [[nodiscard]] std::vector<std::string> phase_names() const;
};

Group group_of(const std::vector<Sample>& samples, const std::string& system, const std::string& size,
               uint64_t size_bytes, uint32_t vcpus);

}  // namespace bench
