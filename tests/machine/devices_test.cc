#include <gtest/gtest.h>
#include <sys/mman.h>

#include <atomic>
#include <stop_token>
#include <thread>
#include <vector>

#include "machine/devices/bus.h"
#include "machine/devices/serial.h"
#include "machine/devices/test_guest.h"

namespace vmm::devices {
namespace {

struct Recorder final : BusDevice {
  std::vector<std::pair<uint64_t, uint8_t>> writes;
  void read(uint64_t offset, std::span<uint8_t> data) override { std::ranges::fill(data, uint8_t(offset)); }
  void write(uint64_t offset, std::span<const uint8_t> data) override { writes.emplace_back(offset, data[0]); }
};

TEST(Bus, DispatchesByRangeAndRefusesOverlap) {
  Bus bus("test");
  Recorder a, b;
  ASSERT_TRUE(bus.add(0x100, 8, &a).has_value());
  ASSERT_TRUE(bus.add(0x108, 8, &b).has_value());
  EXPECT_FALSE(bus.add(0x104, 8, &b).has_value());
  EXPECT_FALSE(bus.add(0xfc, 8, &b).has_value());
  EXPECT_FALSE(bus.add(0x200, 0, &b).has_value());
  uint8_t byte = 0;
  EXPECT_TRUE(bus.read(0x103, std::span(&byte, 1)));
  EXPECT_EQ(byte, 3);
  EXPECT_TRUE(bus.write(0x10a, std::span<const uint8_t>(&byte, 1)));
  ASSERT_EQ(b.writes.size(), 1u);
  EXPECT_EQ(b.writes[0].first, 2u);
  EXPECT_FALSE(bus.read(0x110, std::span(&byte, 1)));
  EXPECT_FALSE(bus.read(0xff, std::span(&byte, 1)));
}

uint8_t reg(Serial& serial, uint64_t offset) {
  uint8_t value = 0;
  serial.read(offset, std::span(&value, 1));
  return value;
}
void set(Serial& serial, uint64_t offset, uint8_t value) { serial.write(offset, std::span<const uint8_t>(&value, 1)); }

TEST(Serial, TransmitterIsAlwaysEmptyAndScratchWorks) {
  Serial serial(ConsoleSink::none(), nullptr);
  EXPECT_EQ(reg(serial, 5) & 0x60, 0x60);
  set(serial, 7, 0x5a);
  EXPECT_EQ(reg(serial, 7), 0x5a);
  EXPECT_EQ(reg(serial, 2) & 0x0f, 0x01) << "no interrupt pending";
}

TEST(Serial, DivisorLatchIsSeparateFromData) {
  Serial serial(ConsoleSink::none(), nullptr);
  set(serial, 3, 0x80);
  set(serial, 0, 0x01);
  set(serial, 1, 0x02);
  EXPECT_EQ(reg(serial, 0), 0x01);
  EXPECT_EQ(reg(serial, 1), 0x02);
  set(serial, 3, 0x03);
  EXPECT_EQ(reg(serial, 1), 0x00) << "IER, not DLM";
}

TEST(Serial, ThrEmptyInterruptRaisesAndClearsTheLine) {
  std::vector<bool> levels;
  Serial serial(ConsoleSink::none(), [&](bool level) { levels.push_back(level); });
  set(serial, 4, 0x08);  // OUT2: route the interrupt
  set(serial, 1, 0x02);  // enable THR-empty interrupt
  ASSERT_FALSE(levels.empty());
  EXPECT_TRUE(levels.back());
  EXPECT_EQ(reg(serial, 2) & 0x0f, 0x02);
  EXPECT_FALSE(levels.back()) << "reading IIR acknowledges it";
}

TEST(Serial, LoopbackAndReceivedData) {
  Serial serial(ConsoleSink::none(), nullptr);
  set(serial, 4, 0x10);  // loopback
  set(serial, 0, 'x');
  EXPECT_EQ(reg(serial, 5) & 0x01, 0x01);
  EXPECT_EQ(reg(serial, 0), 'x');
  EXPECT_EQ(reg(serial, 5) & 0x01, 0x00);
  serial.enqueue_input('y');
  auto saved = serial.registers();
  Serial restored(ConsoleSink::none(), nullptr);
  restored.set_registers(saved);
  EXPECT_EQ(reg(restored, 4), 0x10);
  EXPECT_EQ(reg(restored, 0), 'y');
}

// A fake guest on the other side of the shared region.
class SharedRegion {
 public:
  SharedRegion() {
    memory_ = static_cast<uint8_t*>(::mmap(nullptr, kSize, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  }
  ~SharedRegion() { ::munmap(memory_, kSize); }
  uint8_t* data() { return memory_; }
  vmm_guest_shared* shared() { return reinterpret_cast<vmm_guest_shared*>(memory_); }
  static constexpr size_t kSize = 1 << 20;

 private:
  uint8_t* memory_;
};

TEST(TestGuestLink, ConfigureThenVerifySumsEveryVcpu) {
  SharedRegion region;
  TestGuestLink link(region.data(), SharedRegion::kSize);
  link.configure(2, 0x1234, 2'000'000);
  EXPECT_EQ(region.shared()->magic, VMM_GUEST_MAGIC);
  EXPECT_EQ(region.shared()->nr_vcpus, 2u);
  region.shared()->phase = VMM_GUEST_PHASE_RUNNING;

  std::atomic<bool> stop{false};
  std::thread guest([&] {
    auto* s = region.shared();
    while (!stop) {
      const uint64_t request = *static_cast<volatile uint64_t*>(&s->verify_request);
      for (uint32_t i = 0; i < 2; ++i) {
        if (s->vcpu[i].verify_seq < request) {
          s->vcpu[i].verify_pages_checked = 100 + i;
          s->vcpu[i].verify_mismatches = i;
          s->vcpu[i].verify_first_mismatch_gpa = 0x5000;
          std::atomic_thread_fence(std::memory_order_release);
          *static_cast<volatile uint64_t*>(&s->vcpu[i].verify_seq) = request;
        }
      }
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  });
  auto result = link.verify(std::chrono::seconds(5));
  stop = true;
  guest.join();
  ASSERT_TRUE(result.has_value()) << result.error().describe();
  EXPECT_EQ(result->pages_checked, 201u);
  EXPECT_EQ(result->mismatches, 1u);
  EXPECT_EQ(result->first_mismatch_gpa, 0x5000u);
  EXPECT_EQ(link.last_verify()->pages_checked, 201u);
}

TEST(TestGuestLink, VerifyTimesOutWithAnExplanation) {
  SharedRegion region;
  TestGuestLink link(region.data(), SharedRegion::kSize);
  link.configure(1, 1, 1);
  region.shared()->phase = VMM_GUEST_PHASE_STAMPING;
  auto result = link.verify(std::chrono::milliseconds(50));
  ASSERT_FALSE(result.has_value());
  EXPECT_NE(result.error().message.find("timed out"), std::string::npos);
  EXPECT_NE(result.error().message.find("0 of 1 vCPUs"), std::string::npos);
}

// The control server's stop token (the vmm shutting down) ends the wait at
// once, however long the timeout.
TEST(TestGuestLink, VerifyGivesUpWhenStopIsRequested) {
  SharedRegion region;
  TestGuestLink link(region.data(), SharedRegion::kSize);
  link.configure(1, 1, 1);
  region.shared()->phase = VMM_GUEST_PHASE_STAMPING;
  std::stop_source stop;
  std::thread stopper([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
    stop.request_stop();
  });
  const auto before = std::chrono::steady_clock::now();
  auto result = link.verify(std::chrono::hours(1), stop.get_token());
  const auto took = std::chrono::steady_clock::now() - before;
  stopper.join();
  ASSERT_FALSE(result.has_value());
  EXPECT_LT(took, std::chrono::seconds(10));  // not the hour; generous for a loaded machine
  EXPECT_EQ(result.error().code, ECANCELED);
  EXPECT_NE(result.error().message.find("gave up"), std::string::npos) << result.error().message;
  EXPECT_NE(result.error().message.find("0 of 1 vCPUs"), std::string::npos) << result.error().message;
  // Requested before the call: it returns without waiting at all.
  auto again = link.verify(std::chrono::hours(1), stop.get_token());
  ASSERT_FALSE(again.has_value());
  EXPECT_EQ(again.error().code, ECANCELED);
}

TEST(TestGuestLink, LargestHeartbeatGapComesFromTheRing) {
  SharedRegion region;
  TestGuestLink link(region.data(), SharedRegion::kSize);
  auto* s = region.shared();
  for (uint64_t h = 1; h <= 300; ++h) s->heartbeat_ring_tsc[h % VMM_GUEST_HEARTBEAT_RING] = h * 1000 + (h >= 250 ? 50'000 : 0);
  s->heartbeat = 300;
  auto gap = link.largest_gap_since(200);
  ASSERT_TRUE(gap.has_value());
  EXPECT_EQ(gap->gap_tsc, 51'000u);
  EXPECT_EQ(gap->after_heartbeat, 250u);
  EXPECT_EQ(link.largest_gap_since(260)->gap_tsc, 1000u);
  EXPECT_FALSE(link.largest_gap_since(10).has_value()) << "heartbeat 10 was overwritten in the ring";
}

// The guest side of a sweep: pass n goes to ring[(n - 1) % RING], then the
// count that publishes it.
void publish_sweeps(vmm_guest_shared* s, uint64_t up_to, uint64_t from = 1) {
  for (uint64_t n = from; n <= up_to; ++n) {
    s->sweep_ring[(n - 1) % VMM_GUEST_SWEEP_RING] = {n * 1000, n * 1000 + n};
    s->sweep_passes = n;
  }
}

TEST(TestGuestLink, SweepsSinceFiltersByNumber) {
  SharedRegion region;
  TestGuestLink link(region.data(), SharedRegion::kSize);
  link.configure(1, 1, 1000);  // 1 MHz: 1 cycle = 1 us
  auto* s = region.shared();
  EXPECT_EQ(link.sweep_passes(), 0u);
  EXPECT_TRUE(link.sweeps_since(0).empty()) << "no pass yet";
  EXPECT_EQ(link.status().sweep_passes, 0u);
  EXPECT_EQ(link.status().last_sweep_us, 0u);

  s->sweep_ms = 20;
  publish_sweeps(s, 5);
  EXPECT_EQ(link.sweep_ms(), 20u);
  EXPECT_EQ(link.sweep_passes(), 5u);
  auto all = link.sweeps_since(0);
  ASSERT_EQ(all.size(), 5u);
  for (uint64_t i = 0; i < 5; ++i) {
    EXPECT_EQ(all[i].number, i + 1) << "oldest first";
    EXPECT_EQ(all[i].start_tsc, (i + 1) * 1000);
    EXPECT_EQ(all[i].end_tsc, (i + 1) * 1001);
  }
  auto newer = link.sweeps_since(3);
  ASSERT_EQ(newer.size(), 2u);
  EXPECT_EQ(newer[0].number, 4u);
  EXPECT_EQ(newer[1].number, 5u);
  EXPECT_TRUE(link.sweeps_since(5).empty());
  EXPECT_TRUE(link.sweeps_since(100).empty());
  const auto status = link.status();
  EXPECT_EQ(status.sweep_passes, 5u);
  EXPECT_EQ(status.last_sweep_us, 5u) << "pass 5 spans 5 cycles at 1 MHz";
}

TEST(TestGuestLink, SweepsSinceKeepsOnlyWhatTheWrappedRingStillHolds) {
  SharedRegion region;
  TestGuestLink link(region.data(), SharedRegion::kSize);
  link.configure(1, 1, 1000);
  auto* s = region.shared();
  constexpr uint64_t kRing = VMM_GUEST_SWEEP_RING;
  publish_sweeps(s, 3 * kRing + 10);
  const uint64_t latest = 3 * kRing + 10;

  // The slot of the next pass (latest + 1) is the one a guest may be
  // rewriting: the oldest pass returned is latest + 2 - RING.
  auto all = link.sweeps_since(0);
  ASSERT_EQ(all.size(), kRing - 1);
  EXPECT_EQ(all.front().number, latest + 2 - kRing);
  EXPECT_EQ(all.back().number, latest);
  for (size_t i = 0; i < all.size(); ++i) {
    const uint64_t n = all.front().number + i;
    EXPECT_EQ(all[i].number, n);
    EXPECT_EQ(all[i].start_tsc, n * 1000) << "pass " << n << " read from its own slot";
    EXPECT_EQ(all[i].end_tsc, n * 1001);
  }
  // Asking from inside the ring: exactly the newer passes.
  auto recent = link.sweeps_since(latest - 8);
  ASSERT_EQ(recent.size(), 8u);
  EXPECT_EQ(recent.front().number, latest - 7);
  EXPECT_EQ(recent.back().number, latest);
  EXPECT_EQ(recent.back().end_tsc - recent.back().start_tsc, latest);
  // Asking from before the oldest kept pass gets what is left, not garbage.
  EXPECT_EQ(link.sweeps_since(latest - kRing - 5).front().number, latest + 2 - kRing);
  EXPECT_EQ(link.status().last_sweep_us, latest);
}

TEST(TestGuestLink, SweepsSinceIsConsistentWhileTheGuestWrites) {
  SharedRegion region;
  TestGuestLink link(region.data(), SharedRegion::kSize);
  link.configure(1, 1, 1000);
  auto* s = region.shared();
  std::atomic<bool> stop{false};
  // A guest that keeps publishing passes as fast as it can, wrapping the ring
  // many times while the VMM side reads.
  std::thread guest([&] {
    for (uint64_t n = 1; !stop; ++n) {
      auto* slot = static_cast<volatile vmm_guest_sweep*>(&s->sweep_ring[(n - 1) % VMM_GUEST_SWEEP_RING]);
      slot->start_tsc = n * 1000;
      slot->end_tsc = n * 1001;
      std::atomic_signal_fence(std::memory_order_seq_cst);
      *static_cast<volatile uint64_t*>(&s->sweep_passes) = n;
    }
  });
  uint64_t reads = 0, passes_seen = 0;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(200);
  while (std::chrono::steady_clock::now() < deadline) {
    const auto passes = link.sweeps_since(0);
    ++reads;
    for (size_t i = 0; i < passes.size(); ++i) {
      const auto& pass = passes[i];
      ASSERT_EQ(pass.start_tsc, pass.number * 1000) << "a torn or overwritten slot was returned";
      ASSERT_EQ(pass.end_tsc, pass.number * 1001);
      if (i > 0) {
        ASSERT_EQ(pass.number, passes[i - 1].number + 1);
      }
    }
    passes_seen += passes.size();
  }
  stop = true;
  guest.join();
  EXPECT_GT(reads, 0u);
  EXPECT_GT(passes_seen, 0u);
  EXPECT_GT(link.sweep_passes(), uint64_t{VMM_GUEST_SWEEP_RING}) << "the ring wrapped";
}

TEST(TestGuestLink, SweepDurationIsZeroForABackwardsTsc) {
  EXPECT_EQ(sweep_pass_us({.number = 1, .start_tsc = 5000, .end_tsc = 2000}, 1000), 0u);
  EXPECT_EQ(sweep_pass_us({.number = 1, .start_tsc = 2000, .end_tsc = 5000}, 0), 0u);
  EXPECT_EQ(sweep_pass_us({.number = 1, .start_tsc = 0, .end_tsc = 3'000'000}, 3'000'000), 1000u);
}

}  // namespace
}  // namespace vmm::devices
