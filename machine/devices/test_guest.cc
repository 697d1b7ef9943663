#include "machine/devices/test_guest.h"

#include <algorithm>
#include <atomic>
#include <thread>

#include <fmt/format.h>

namespace vmm::devices {
namespace {
// Orders our loads after the guest's stores that published them (x86 is TSO;
// this only stops the compiler from reordering).
inline void compiler_barrier() { std::atomic_signal_fence(std::memory_order_seq_cst); }
}  // namespace

void TestGuestLink::configure(uint32_t vcpus, uint64_t seed, uint64_t tsc_khz) {
  shared_->version = VMM_GUEST_PROTOCOL_VERSION;
  shared_->nr_vcpus = vcpus;
  shared_->seed = seed;
  shared_->tsc_khz = tsc_khz;
  shared_->shared_size = shared_size_;
  compiler_barrier();
  shared_->magic = VMM_GUEST_MAGIC;
}

GuestStatus TestGuestLink::status() const {
  GuestStatus status;
  status.heartbeat = shared_->heartbeat;
  compiler_barrier();
  status.phase = shared_->phase;
  status.heartbeat_tsc = shared_->heartbeat_tsc;
  status.pages_total = shared_->pages_total;
  const uint32_t vcpus = std::min<uint32_t>(uint32_t{shared_->nr_vcpus}, VMM_GUEST_MAX_VCPUS);
  for (uint32_t i = 0; i < vcpus; ++i) {
    const volatile vmm_guest_vcpu& cpu = shared_->vcpu[i];
    if (cpu.online) ++status.vcpus_online;
    status.pages_stamped += cpu.pages_stamped;
    status.pages_dirtied += cpu.pages_dirtied;
    status.vcpus.push_back({cpu.ticks, cpu.pages_dirtied, cpu.pass, cpu.online != 0});
  }
  const uint64_t passes = sweep_passes();
  if (passes > 0) {
    // The latest pass, or a newer one if the guest finished it meanwhile.
    if (const auto recent = sweeps_since(passes - 1); !recent.empty()) {
      status.sweep_passes = recent.back().number;
      status.last_sweep_us = sweep_pass_us(recent.back(), shared_->tsc_khz);
    } else {
      status.sweep_passes = passes;
    }
  }
  return status;
}

Result<VerifyResult> TestGuestLink::verify(std::chrono::milliseconds timeout, std::stop_token stop) {
  std::lock_guard serialize(verify_mutex_);
  const auto start = std::chrono::steady_clock::now();
  const auto deadline = start + timeout;
  const uint32_t vcpus = std::min<uint32_t>(uint32_t{shared_->nr_vcpus}, VMM_GUEST_MAX_VCPUS);
  if (!guest_speaks() && std::chrono::steady_clock::now() >= deadline)
    return fail("the guest does not speak the test-guest protocol");

  const uint64_t request = shared_->verify_request + 1;
  compiler_barrier();
  shared_->verify_request = request;

  while (true) {
    uint32_t done = 0;
    for (uint32_t i = 0; i < vcpus; ++i)
      if (shared_->vcpu[i].verify_seq >= request) ++done;
    if (done == vcpus) break;
    if (stop.stop_requested())
      return fail(fmt::format("guest-verify gave up after {} ms: {} of {} vCPUs had answered",
                              std::chrono::duration_cast<std::chrono::milliseconds>(
                                  std::chrono::steady_clock::now() - start).count(),
                              done, vcpus),
                  ECANCELED);
    if (std::chrono::steady_clock::now() >= deadline) {
      const auto s = status();
      return fail(fmt::format(
          "guest-verify timed out after {} ms: {} of {} vCPUs answered (guest phase {}, {} of {} "
          "pages stamped; a large guest needs longer to stamp its RAM, or the guest is hung)",
          timeout.count(), done, vcpus, s.phase, s.pages_stamped, s.pages_total));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  compiler_barrier();

  VerifyResult result;
  result.request = request;
  for (uint32_t i = 0; i < vcpus; ++i) {
    const volatile vmm_guest_vcpu& cpu = shared_->vcpu[i];
    result.pages_checked += cpu.verify_pages_checked;
    result.mismatches += cpu.verify_mismatches;
    if (cpu.verify_mismatches && !result.first_mismatch_gpa)
      result.first_mismatch_gpa = cpu.verify_first_mismatch_gpa;
  }
  result.duration = std::chrono::duration_cast<std::chrono::microseconds>(
      std::chrono::steady_clock::now() - start);
  set_last_verify(result);
  return result;
}

std::optional<VerifyResult> TestGuestLink::last_verify() const {
  std::lock_guard lock(last_mutex_);
  return last_verify_;
}

void TestGuestLink::set_last_verify(std::optional<VerifyResult> result) {
  std::lock_guard lock(last_mutex_);
  last_verify_ = std::move(result);
}

std::optional<HeartbeatGap> TestGuestLink::largest_gap_since(uint64_t since_heartbeat) const {
  const uint64_t latest = shared_->heartbeat;
  compiler_barrier();
  HeartbeatGap gap;
  // Heartbeat h (the counter's value after its increment, from 1) is stamped
  // at ring[h % RING]; the ring keeps the last RING of them, and the newest
  // slot may be mid-rewrite, so the oldest trusted one is latest - RING + 2.
  const uint64_t oldest_kept = latest > VMM_GUEST_HEARTBEAT_RING ? latest - VMM_GUEST_HEARTBEAT_RING + 2 : 1;
  if (since_heartbeat < oldest_kept) return std::nullopt;
  for (uint64_t h = since_heartbeat + 1; h <= latest; ++h) {
    const uint64_t a = shared_->heartbeat_ring_tsc[(h - 1) % VMM_GUEST_HEARTBEAT_RING];
    const uint64_t b = shared_->heartbeat_ring_tsc[h % VMM_GUEST_HEARTBEAT_RING];
    if (b > a && b - a > gap.gap_tsc) {
      gap.gap_tsc = b - a;
      gap.after_heartbeat = h;
    }
  }
  return gap;
}

uint64_t TestGuestLink::sweep_passes() const { return holds_sweep() ? uint64_t{shared_->sweep_passes} : 0; }

uint64_t TestGuestLink::sweep_ms() const { return holds_sweep() ? uint64_t{shared_->sweep_ms} : 0; }

std::vector<SweepPass> TestGuestLink::sweeps_since(uint64_t after_number) const {
  std::vector<SweepPass> passes;
  if (!holds_sweep()) return passes;
  const uint64_t latest = shared_->sweep_passes;
  compiler_barrier();
  if (latest <= after_number) return passes;
  // Pass n sits at ring[(n - 1) % RING]. Copy first, check afterwards: the
  // guest keeps sweeping while we read.
  const uint64_t ring = VMM_GUEST_SWEEP_RING;
  const uint64_t first = std::max(after_number + 1, latest >= ring ? latest - ring + 1 : 1);
  for (uint64_t n = first; n <= latest; ++n) {
    const volatile vmm_guest_sweep& slot = shared_->sweep_ring[(n - 1) % ring];
    passes.push_back({n, slot.start_tsc, slot.end_tsc});
  }
  compiler_barrier();
  // Once the guest has published pass `now`, it may be writing the slot of
  // pass now + 1, which held pass now + 1 - RING; every slot it wrote since
  // our first read held a pass numbered at most that. Keep the newer ones.
  const uint64_t now = shared_->sweep_passes;
  const uint64_t oldest_intact = now + 1 >= ring ? now + 2 - ring : 1;
  // (A count that went down means the guest started over: trust none above it.)
  std::erase_if(passes, [&](const SweepPass& pass) { return pass.number < oldest_intact || pass.number > now; });
  return passes;
}

}  // namespace vmm::devices
