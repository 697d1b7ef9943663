#include "update/frames.h"

#include <spdlog/spdlog.h>
#include <unistd.h>

#include "base/pagemap.h"

namespace vmm {

std::vector<SampledFrame> sample_guest_frames(const Machine& machine) {
  std::vector<SampledFrame> frames;
  const auto& regions = machine.memory().regions();
  for (size_t i = 0; i < regions.size(); ++i) {
    auto sampled = sample_frames(regions[i]->bytes(), regions[i]->fd(), kFramesPerRegion);
    if (!sampled) {
      spdlog::debug("live update: no frame samples of '{}': {}", regions[i]->spec().name, sampled.error().describe());
      continue;
    }
    for (const auto& sample : *sampled)
      if (!sample.hole && sample.pfn != 0) frames.push_back({static_cast<uint32_t>(i), sample.offset, sample.pfn});
  }
  return frames;
}

void check_guest_frames(const Machine& machine, UpdateRecord& record) {
  record.frames_sampled.reset();
  record.frames_same.reset();
  if (record.frames_at_prepare.empty()) return;
  const auto& regions = machine.memory().regions();
  const auto page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  uint64_t same = 0;
  // One pagemap read per region. The record is the old side's word: a
  // region or offset it names that this VM does not have counts as moved,
  // never as a read out of bounds (and never spoils the other samples).
  for (size_t index = 0; index < regions.size(); ++index) {
    const auto& region = regions[index];
    std::vector<uint64_t> offsets;
    std::vector<uint64_t> pfns;
    for (const auto& before : record.frames_at_prepare) {
      if (before.region != index || before.offset % page != 0 || before.offset >= region->bytes().size()) continue;
      offsets.push_back(before.offset);
      pfns.push_back(before.pfn);
    }
    if (offsets.empty()) continue;
    auto now = sample_frames_at(region->bytes(), region->fd(), offsets);
    if (!now || now->size() != offsets.size()) continue;
    for (size_t i = 0; i < offsets.size(); ++i)
      if (!(*now)[i].hole && (*now)[i].pfn == pfns[i]) ++same;
  }
  record.frames_sampled = record.frames_at_prepare.size();
  record.frames_same = same;
  if (same != record.frames_at_prepare.size())
    spdlog::warn("live update: {} of {} sampled guest pages are on other physical frames than before the pause", 
                 record.frames_at_prepare.size() - same, record.frames_at_prepare.size());
}

}  // namespace vmm
