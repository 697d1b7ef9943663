#include "update/guest_watch.h"

#include <algorithm>
#include <vector>

#include <spdlog/spdlog.h>

namespace vmm {

using namespace std::chrono;

void GuestWatch::start(ResumePoint point) {
  update([](Findings& found) { found.brownout_status = "pending"; });
  gap_thread_ = std::thread([this, point] { measure_guest_gap(point.heartbeat_at_save); });
  brownout_thread_ = std::thread([this, point] { measure_brownout(point); });
}

void GuestWatch::stop() {
  stopping_ = true;
  if (gap_thread_.joinable()) gap_thread_.join();
  if (brownout_thread_.joinable()) brownout_thread_.join();
}

GuestWatch::Findings GuestWatch::findings() const {
  std::lock_guard lock(mutex_);
  return findings_;
}

void GuestWatch::update(const std::function<void(Findings&)>& change) {
  std::lock_guard lock(mutex_);
  change(findings_);
  if (publish_) publish_(findings_);
}

void GuestWatch::set_guest_gap(int64_t us) {
  update([&](Findings& found) { found.guest_gap_us = us; });
}

void GuestWatch::set_baseline(int64_t us) {
  update([&](Findings& found) { found.baseline_pass_us = us; });
}

// The guest stamps each heartbeat with its TSC: the largest step between the
// heartbeat before the freeze and those after the resume is the gap the guest
// saw (blackout plus the brown-out of re-faulting its pages in the new VM).
void GuestWatch::measure_guest_gap(uint64_t heartbeat_at_save) {
  auto& guest = machine_.guest();
  if (!guest.guest_speaks() || guest.tsc_khz() == 0) return;
  const auto deadline = steady_clock::now() + seconds(5);
  while (!stopping_ && steady_clock::now() < deadline) {
    if (machine_.run_state() != RunState::running) return;  // a paused VM has no gap to show yet
    if (guest.status().heartbeat >= heartbeat_at_save + 5) {
      const auto gap = guest.largest_gap_since(heartbeat_at_save > 0 ? heartbeat_at_save - 1 : 0);
      if (!gap) {
        spdlog::warn("live update: the guest's heartbeat ring moved past the freeze before it was read; "
                     "guest_gap_us is not reported");
        return;
      }
      set_guest_gap(static_cast<int64_t>(gap->gap_tsc * 1000 / guest.tsc_khz()));
      return;
    }
    std::this_thread::sleep_for(milliseconds(2));
  }
}

void GuestWatch::set_brownout(std::string status, std::optional<int64_t> us, std::optional<std::string> reason) {
  update([&](Findings& found) {
    found.brownout_status = std::move(status);
    found.brownout_us = us;
    found.brownout_reason = std::move(reason);
    if (found.brownout_reason) spdlog::info("live update: brown-out not measured: {}", *found.brownout_reason);
    if (found.brownout_us) spdlog::info("live update: brown-out {} us", *found.brownout_us);
  });
}

// The brown-out: a rebuilt VM starts with empty (shadow) page tables, so the
// guest re-faults every page it touches. The guest's sweep reads all of its
// RAM once per pass and stamps each pass with its TSC. Baseline: the median
// of the last (up to 8) passes that ended before the freeze. The brown-out
// ends where the first pass that started after the resume runs within 1.25x
// of that baseline; its resolution is the guest's sweep period.
void GuestWatch::measure_brownout(ResumePoint point) {
  auto& guest = machine_.guest();
  const uint64_t khz = guest.tsc_khz();
  if (!guest.guest_speaks() || khz == 0)
    return set_brownout("unavailable", std::nullopt, "the guest does not speak the test guest protocol");
  if (guest.sweep_ms() == 0)
    return set_brownout("unavailable", std::nullopt,
                        "the guest does not sweep its RAM (boot the test guest with sweep-ms=N)");
  if (!point.running)
    return set_brownout("unavailable", std::nullopt, "the VM was paused across the update");
  std::vector<uint64_t> before;
  uint64_t last_seen = 0;
  for (const auto& pass : guest.sweeps_since(0)) {
    if (pass.end_tsc <= point.guest_tsc_at_save && pass.end_tsc > pass.start_tsc)
      before.push_back(devices::sweep_pass_us(pass, khz));
    last_seen = pass.number;
  }
  if (before.empty())
    return set_brownout("unavailable", std::nullopt, "the guest finished no RAM sweep pass before the update");
  if (before.size() > 8) before.erase(before.begin(), before.end() - 8);
  std::ranges::sort(before);
  const uint64_t baseline_us = before[before.size() / 2];
  set_baseline(static_cast<int64_t>(baseline_us));
  // A pass over 8 GiB that re-faults every page takes ~30 s here.
  const auto deadline = steady_clock::now() + seconds(120) + seconds(10 * (machine_.config().ram_size >> 30));
  while (!stopping_ && steady_clock::now() < deadline) {
    if (machine_.run_state() != RunState::running)
      return set_brownout("unavailable", std::nullopt, "the VM stopped running before the guest swept its RAM again");
    for (const auto& pass : guest.sweeps_since(last_seen)) {
      last_seen = pass.number;
      if (pass.start_tsc < point.guest_tsc_at_resume || pass.end_tsc <= pass.start_tsc) continue;
      if (devices::sweep_pass_us(pass, khz) * 4 <= baseline_us * 5) {
        return set_brownout("measured",
                            static_cast<int64_t>((pass.start_tsc - point.guest_tsc_at_resume) * 1000 / khz),
                            std::nullopt);
      }
    }
    std::this_thread::sleep_for(milliseconds(5));
  }
  if (!stopping_)
    set_brownout("unavailable", std::nullopt, "the guest's RAM sweep did not get back to its speed before the update");
}

}  // namespace vmm
