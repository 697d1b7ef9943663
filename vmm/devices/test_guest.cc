#include "vmm/devices/test_guest.h"

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
  return status;
}

Result<VerifyResult> TestGuestLink::verify(std::chrono::milliseconds timeout) {
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

}  // namespace vmm::devices
