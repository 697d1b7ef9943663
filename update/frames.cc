#include "update/frames.h"

#include <spdlog/spdlog.h>

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
  uint64_t same = 0;
  for (const auto& before : record.frames_at_prepare) {
    // The record is the old side's word: a region or offset it names that
    // this VM does not have counts as moved, never as a read out of bounds.
    if (before.region >= regions.size()) continue;
    const auto& region = regions[before.region];
    const uint64_t offset = before.offset;
    auto now = sample_frames_at(region->bytes(), region->fd(), std::span(&offset, 1));
    if (now && now->size() == 1 && !now->front().hole && now->front().pfn == before.pfn) ++same;
  }
  record.frames_sampled = record.frames_at_prepare.size();
  record.frames_same = same;
  if (same != record.frames_at_prepare.size())
    spdlog::warn("live update: {} of {} sampled guest pages are on other physical frames than before the pause", 
                 record.frames_at_prepare.size() - same, record.frames_at_prepare.size());
}

}  // namespace vmm
