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

// Guest counters summed over vCPUs: a hostile guest must not make them wrap.
uint64_t add_saturating(uint64_t a, uint64_t b) { return b > UINT64_MAX - a ? UINT64_MAX : a + b; }
}  // namespace

void TestGuestLink::configure(uint32_t vcpus, uint64_t seed, uint64_t tsc_khz) {
  adopt(vcpus, tsc_khz);
  shared_->version = VMM_GUEST_PROTOCOL_VERSION;
  shared_->nr_vcpus = vcpus;
  shared_->seed = seed;
  shared_->tsc_khz = tsc_khz;
  shared_->shared_size = shared_size_;
  compiler_barrier();
  shared_->magic = VMM_GUEST_MAGIC;
}

void TestGuestLink::adopt(uint32_t vcpus, uint64_t tsc_khz) {
  vcpus_ = std::min<uint32_t>(vcpus, VMM_GUEST_MAX_VCPUS);
  tsc_khz_ = tsc_khz;
}

GuestStatus TestGuestLink::status() const {
  GuestStatus status;
  status.heartbeat = shared_->heartbeat;
  compiler_barrier();
  status.phase = shared_->phase;
  status.heartbeat_tsc = shared_->heartbeat_tsc;
  status.pages_total = shared_->pages_total;
  for (uint32_t i = 0; i < vcpus_; ++i) {
    const volatile vmm_guest_vcpu& cpu = shared_->vcpu[i];
    GuestVcpuStatus vcpu{cpu.ticks, cpu.pages_dirtied, cpu.pass, cpu.online != 0};
    const uint64_t pages_stamped = cpu.pages_stamped;
    if (vcpu.online) ++status.vcpus_online;
    status.pages_stamped = add_saturating(status.pages_stamped, pages_stamped);
    status.pages_dirtied = add_saturating(status.pages_dirtied, vcpu.pages_dirtied);
    status.vcpus.push_back(vcpu);
  }
  const uint64_t passes = sweep_passes();
  if (passes > 0) {
    // The latest pass, or a newer one if the guest finished it meanwhile.
    if (const auto recent = sweeps_since(passes - 1); !recent.empty()) {
      status.sweep_passes = recent.back().number;
      status.last_sweep_us = sweep_pass_us(recent.back(), tsc_khz_);
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
  const uint32_t vcpus = vcpus_;
  if (vcpus == 0) return fail("the test guest was never configured: there is no vCPU to ask");
  if (!guest_speaks() && std::chrono::steady_clock::now() >= deadline)
    return fail("the guest does not speak the test-guest protocol");

  // Our own field, but guest-writable: one read, and no wrap to 0 (which
  // every vCPU would seem to have answered already).
  const uint64_t previous = shared_->verify_request;
  if (previous == UINT64_MAX)
    return fail("the shared region's verify_request is 2^64-1: the guest overwrote the VMM's request "
                        "counter, so no request can be told apart from an old one", EPROTO);
  const uint64_t request = previous + 1;
  compiler_barrier();
  shared_->verify_request = request;

  // A vCPU answers request r by publishing verify_seq = r; any other value
  // (an older request, or one the VMM never made) is no answer to this one.
  while (true) {
    uint32_t done = 0;
    for (uint32_t i = 0; i < vcpus; ++i)
      if (shared_->vcpu[i].verify_seq == request) ++done;
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
          timeout.count(), done, vcpus, s.phase, s.pages_stamped, s.pages_total), ETIMEDOUT);
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  compiler_barrier();

  VerifyResult result;
  result.request = request;
  for (uint32_t i = 0; i < vcpus; ++i) {
    const volatile vmm_guest_vcpu& cpu = shared_->vcpu[i];
    const uint64_t checked = cpu.verify_pages_checked;
    const uint64_t mismatches = cpu.verify_mismatches;
    const uint64_t first_gpa = cpu.verify_first_mismatch_gpa;
    if (mismatches > checked)
      return fail(fmt::format("guest-verify: vCPU {} reports {} mismatches among {} pages checked; the "
                                      "guest's answer is inconsistent",
                                      i, mismatches, checked), EPROTO);
    if (checked > UINT64_MAX - result.pages_checked)
      return fail("guest-verify: the guest's page counts add up to more than 2^64; its answer is "
                          "inconsistent", EPROTO);
    result.pages_checked += checked;
    result.mismatches += mismatches;  // <= pages_checked, so it cannot wrap either
    if (mismatches != 0 && first_gpa != UINT64_MAX && !result.first_mismatch_gpa)
      result.first_mismatch_gpa = first_gpa;
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

migration::TestDeviceState TestGuestLink::save() const {
  migration::TestDeviceState state;
  state.heartbeat_at_save = shared_->heartbeat;
  if (auto last = last_verify()) {
    state.last_verify_request = last->request;
    state.last_result = {last->pages_checked, last->mismatches};
  }
  return state;
}

void TestGuestLink::restore(const migration::TestDeviceState& state) {
  if (state.last_verify_request == 0) {
    set_last_verify(std::nullopt);
    return;
  }
  VerifyResult last;
  last.request = state.last_verify_request;
  last.pages_checked = state.last_result.pages_checked;
  last.mismatches = state.last_result.mismatches;
  set_last_verify(last);
}

Result<HeartbeatGap> TestGuestLink::largest_gap_since(uint64_t since_heartbeat) const {
  const uint64_t latest = shared_->heartbeat;
  compiler_barrier();
  // Heartbeat h (the counter's value after its increment, from 1) is stamped
  // at ring[h % RING]; the ring keeps the last RING of them, and the newest
  // slot may be mid-rewrite, so at most RING - 2 steps back are trusted.
  if (since_heartbeat == 0) return fail("the guest had not beaten yet: heartbeat 0 has no ring entry", ENODATA);
  if (latest < since_heartbeat)
    return fail(fmt::format("the guest's heartbeat went backwards, from {} to {}", since_heartbeat, latest), EPROTO);
  const uint64_t steps = latest - since_heartbeat;
  if (steps > VMM_GUEST_HEARTBEAT_RING - 2)
    return fail(fmt::format("the guest's heartbeat ring no longer holds heartbeat {} (the counter is at {})",
                                     since_heartbeat, latest), ENODATA);
  HeartbeatGap gap;
  uint64_t previous = shared_->heartbeat_ring_tsc[since_heartbeat % VMM_GUEST_HEARTBEAT_RING];
  for (uint64_t step = 1; step <= steps; ++step) {
    const uint64_t h = since_heartbeat + step;
    const uint64_t tsc = shared_->heartbeat_ring_tsc[h % VMM_GUEST_HEARTBEAT_RING];
    if (tsc > previous && tsc - previous > gap.gap_tsc) {
      gap.gap_tsc = tsc - previous;
      gap.after_heartbeat = h;
    }
    previous = tsc;
  }
  return gap;
}

uint64_t TestGuestLink::sweep_passes() const { return holds_sweep() ? uint64_t{shared_->sweep_passes} : 0; }

uint64_t TestGuestLink::sweep_ms() const { return holds_sweep() ? uint64_t{shared_->sweep_ms} : 0; }

std::vector<SweepPass> TestGuestLink::sweeps_since(uint64_t after_number) const {
  std::vector<SweepPass> passes;
  if (!holds_sweep()) return passes;
  constexpr uint64_t ring = VMM_GUEST_SWEEP_RING;
  const uint64_t latest = shared_->sweep_passes;
  compiler_barrier();
  if (latest <= after_number) return passes;
  // Pass n sits at ring[(n - 1) % RING]; the slot of pass latest + 1 may be
  // mid-rewrite, so at most RING - 1 passes, counted back from `latest`
  // (whatever the guest claims, the loop is bounded by the ring). Copy
  // first, check afterwards: the guest keeps sweeping while we read.
  const uint64_t count = std::min(latest - after_number, ring - 1);
  passes.reserve(count);
  for (uint64_t i = 0; i < count; ++i) {
    const uint64_t n = latest - count + 1 + i;
    const volatile vmm_guest_sweep& slot = shared_->sweep_ring[(n - 1) % ring];
    passes.push_back({n, slot.start_tsc, slot.end_tsc});
  }
  compiler_barrier();
  // Once the guest has published pass `now`, it may be writing the slot of
  // pass now + 1, which held pass now + 1 - RING; every slot it wrote since
  // our first read held a pass numbered at most that. Keep the newer ones.
  const uint64_t now = shared_->sweep_passes;
  const uint64_t oldest_intact = now >= ring - 1 ? now - (ring - 2) : 1;
  // (A count that went down means the guest started over: trust none above it.)
  std::erase_if(passes, [&](const SweepPass& pass) { return pass.number < oldest_intact || pass.number > now; });
  return passes;
}

}  // namespace vmm::devices
