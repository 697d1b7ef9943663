#include "update/guest_watch.h"

#include <algorithm>
#include <vector>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

namespace vmm {

using namespace std::chrono;

namespace {

// Slack for what the guest's clock and ours legitimately disagree by: the
// heartbeat before the freeze came up to one tick (at most 4 s, tick-us)
// before the save, and threads here wake late on a busy host.
constexpr uint64_t kClockSlackUs = 5'000'000;

uint64_t us_since(steady_clock::time_point start) {
  return static_cast<uint64_t>(duration_cast<microseconds>(steady_clock::now() - start).count());
}

int64_t as_int64(uint64_t us) { return us > uint64_t{INT64_MAX} ? INT64_MAX : static_cast<int64_t>(us); }

}  // namespace

void GuestWatch::start(ResumePoint point) {
  update([](Findings& found) { found.brownout_status = "pending"; });
  gap_thread_ = std::thread([this, point] { measure_guest_gap(point); });
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

void GuestWatch::set_guest_gap_unavailable(std::string reason) {
  spdlog::info("live update: guest gap not measured: {}", reason);
  update([&](Findings& found) { found.guest_gap_reason = std::move(reason); });
}

void GuestWatch::set_baseline(int64_t us) {
  update([&](Findings& found) { found.baseline_pass_us = us; });
}

// The guest stamps each heartbeat with its TSC: the largest step between the
// heartbeat before the freeze and those after the resume is the gap the guest
// saw (blackout plus the brown-out of re-faulting its pages in the new VM).
// The step across the freeze spans at least the TSC the clocks were moved
// on by, and no step can be longer than the freeze plus the time since.
void GuestWatch::measure_guest_gap(ResumePoint point) {
  auto& guest = machine_.guest();
  const uint64_t khz = guest.tsc_khz();
  if (khz == 0) return set_guest_gap_unavailable("the VMM knows no TSC rate for the guest");
  if (!guest.guest_speaks()) return set_guest_gap_unavailable("the guest does not speak the test guest protocol");
  if (point.heartbeat_at_save == 0) return set_guest_gap_unavailable("the guest had not beaten before the update");
  const auto started = steady_clock::now();
  const auto deadline = started + seconds(5);
  while (!stopping_ && steady_clock::now() < deadline) {
    // A paused VM has no gap to show yet.
    if (machine_.run_state() != RunState::running)
      return set_guest_gap_unavailable("the VM stopped running before the guest beat again");
    const uint64_t heartbeat = guest.heartbeat();
    if (heartbeat < point.heartbeat_at_save)
      return set_guest_gap_unavailable(fmt::format("the guest's heartbeat went backwards across the update, from "
                                                   "{} to {}", point.heartbeat_at_save, heartbeat));
    if (heartbeat - point.heartbeat_at_save >= 5) {
      const auto gap = guest.largest_gap_since(point.heartbeat_at_save - 1);
      if (!gap) return set_guest_gap_unavailable(gap.error().message);
      const uint64_t frozen_tsc = point.guest_tsc_at_resume >= point.guest_tsc_at_save
                                      ? point.guest_tsc_at_resume - point.guest_tsc_at_save : 0;
      if (gap->gap_tsc < frozen_tsc)
        return set_guest_gap_unavailable(fmt::format(
            "the guest's heartbeat ring shows at most {} TSC cycles between two heartbeats, less than the {} its "
            "clock was moved on by across the freeze", gap->gap_tsc, frozen_tsc));
      const uint64_t gap_us = devices::tsc_to_us(gap->gap_tsc, khz);
      const uint64_t possible_us = devices::tsc_to_us(frozen_tsc, khz) + us_since(started) + kClockSlackUs;
      if (gap_us > possible_us)
        return set_guest_gap_unavailable(fmt::format(
            "the guest's heartbeat ring shows a gap of {} us, longer than the {} us the update can have stopped it",
            gap_us, possible_us));
      return set_guest_gap(as_int64(gap_us));
    }
    std::this_thread::sleep_for(milliseconds(2));
  }
  if (!stopping_) set_guest_gap_unavailable("the guest did not beat five times within 5 s of the resume");
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
  if (khz == 0) return set_brownout("unavailable", std::nullopt, "the VMM knows no TSC rate for the guest");
  if (!guest.guest_speaks())
    return set_brownout("unavailable", std::nullopt, "the guest does not speak the test guest protocol");
  if (guest.sweep_ms() == 0)
    return set_brownout("unavailable", std::nullopt,
                        "the guest does not sweep its RAM (boot the test guest with sweep-ms=N)");
  if (!point.running)
    return set_brownout("unavailable", std::nullopt, "the VM was paused across the update");
  const auto started = steady_clock::now();
  std::vector<uint64_t> before;
  uint64_t last_seen = 0;
  for (const auto& pass : guest.sweeps_since(0)) {  // at most the ring
    // sweep_pass_us is 0 for a span that is backwards or longer than any pass.
    if (const uint64_t us = devices::sweep_pass_us(pass, khz); pass.end_tsc <= point.guest_tsc_at_save && us != 0)
      before.push_back(us);
    last_seen = pass.number;
  }
  if (before.empty())
    return set_brownout("unavailable", std::nullopt, "the guest finished no RAM sweep pass before the update");
  if (before.size() > 8) before.erase(before.begin(), before.end() - 8);
  std::ranges::sort(before);
  const uint64_t baseline_us = before[before.size() / 2];
  set_baseline(as_int64(baseline_us));
  // A pass over 8 GiB that re-faults every page takes ~30 s here.
  const auto deadline = steady_clock::now() + seconds(120) + seconds(10 * (machine_.config().ram_size >> 30));
  while (!stopping_ && steady_clock::now() < deadline) {
    if (machine_.run_state() != RunState::running)
      return set_brownout("unavailable", std::nullopt, "the VM stopped running before the guest swept its RAM again");
    for (const auto& pass : guest.sweeps_since(last_seen)) {
      last_seen = pass.number;
      const uint64_t us = devices::sweep_pass_us(pass, khz);
      if (pass.start_tsc < point.guest_tsc_at_resume || us == 0) continue;
      if (us > baseline_us + baseline_us / 4) continue;  // not yet within 1.25x
      // The pass ended before we read it, so after the resume it can have
      // run no longer than we have been watching.
      const uint64_t since_resume_us = devices::tsc_to_us(pass.end_tsc - point.guest_tsc_at_resume, khz);
      const uint64_t possible_us = us_since(started) + kClockSlackUs;
      if (since_resume_us > possible_us)
        return set_brownout("unavailable", std::nullopt,
                            fmt::format("the guest's sweep pass {} ends {} us after the resume, but only {} us can "
                                        "have passed",
                                        pass.number, since_resume_us, possible_us));
      return set_brownout("measured", as_int64(devices::tsc_to_us(pass.start_tsc - point.guest_tsc_at_resume, khz)),
                          std::nullopt);
    }
    std::this_thread::sleep_for(milliseconds(5));
  }
  if (!stopping_)
    set_brownout("unavailable", std::nullopt, "the guest's RAM sweep did not get back to its speed before the update");
}

}  // namespace vmm
