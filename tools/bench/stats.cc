#include "tools/bench/stats.h"

namespace bench {

namespace {

template <class Get>
std::optional<Summary> summarize_field(const std::vector<const Sample*>& samples, Get get) {
  std::vector<int64_t> values;
  for (const Sample* sample : samples)
    if (std::optional<int64_t> value = get(*sample)) values.push_back(*value);
  return summarize(std::move(values));
}

}  // namespace

std::optional<Summary> Group::blackout() const {
  return summarize_field(samples, [](const Sample& sample) { return sample.blackout_us; });
}

std::optional<Summary> Group::guest_gap() const {
  return summarize_field(samples, [](const Sample& sample) { return sample.guest_gap_us; });
}

std::optional<Summary> Group::brownout() const {
  return summarize_field(samples, [](const Sample& sample) {
    return sample.brownout_status == "measured" ? sample.brownout_us : std::nullopt;
  });
}

std::optional<Summary> Group::phase(const std::string& name) const {
  return summarize_field(samples, [&](const Sample& sample) -> std::optional<int64_t> {
    for (const auto& phase : sample.phases)
      if (phase.name == name) return phase.duration_us;
    return std::nullopt;
  });
}

std::vector<std::string> Group::phase_names() const {
  std::vector<std::string> names;
  for (const Sample* sample : samples)
    for (const auto& phase : sample->phases)
      if (std::ranges::find(names, phase.name) == names.end()) names.push_back(phase.name);
  return names;
}

Group group_of(const std::vector<Sample>& samples, const std::string& system, const std::string& size,
               uint64_t size_bytes, uint32_t vcpus) {
  Group group{.system = system, .size = size, .size_bytes = size_bytes, .vcpus = vcpus};
  for (const auto& sample : samples) {
    if (sample.system != system || sample.size != size || sample.vcpus != vcpus) continue;
    if (!sample.ok) ++group.failed;
    group.samples.push_back(&sample);
  }
  return group;
}

}  // namespace bench
