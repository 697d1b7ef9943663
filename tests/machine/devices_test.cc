#include <gtest/gtest.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <functional>
#include <stop_token>
#include <thread>
#include <vector>

#include "machine/devices/bus.h"
#include "machine/devices/serial.h"
#include "machine/devices/test_guest.h"
#include "migration/state_blob.h"

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
  const auto saved = serial.save();
  Serial restored(ConsoleSink::none(), nullptr);
  ASSERT_TRUE(restored.restore(saved).has_value());
  EXPECT_EQ(reg(restored, 4), 0x10);
  EXPECT_EQ(reg(restored, 0), 'y');
}

// A device's state the way a live update carries it: inside a SavedState,
// through the blob encoder and decoder.
migration::SavedState through_the_blob(const migration::UartState& uart, const migration::TestDeviceState& test = {}) {
  migration::SavedState state;
  state.metadata.vm_name = "devices";
  state.vcpus.push_back({});
  state.memory.push_back({{"ram0", memory::RegionRole::ram, memory::Backing::memfd, 0, 1 << 20, 0}, 1, 0,
                          memory::SlotKind::userspace});
  state.uart = uart;
  state.test_device = test;
  auto blob = migration::encode(state);
  EXPECT_TRUE(blob.has_value()) << blob.error().describe();
  auto decoded = migration::decode(blob.value_or(std::vector<uint8_t>{}));
  EXPECT_TRUE(decoded.has_value()) << decoded.error().describe();
  return decoded.value_or(migration::SavedState{});
}

// Every register a guest reads, without side effects worth noticing (IIR is
// read last: reading it acknowledges a THR-empty interrupt).
std::vector<uint8_t> guest_view(Serial& serial) {
  std::vector<uint8_t> view;
  for (uint64_t offset : {1, 3, 4, 5, 6, 7}) view.push_back(reg(serial, offset));
  const uint8_t lcr = reg(serial, 3);
  set(serial, 3, lcr | 0x80);
  view.push_back(reg(serial, 0));  // DLL
  view.push_back(reg(serial, 1));  // DLM
  set(serial, 3, lcr);
  view.push_back(reg(serial, 2));
  return view;
}

TEST(Serial, APendingThrInterruptSurvivesSaveEncodeDecodeRestore) {
  std::vector<bool> levels;
  Serial serial(ConsoleSink::none(), [&](bool level) { levels.push_back(level); });
  set(serial, 4, 0x08);  // OUT2
  set(serial, 1, 0x02);  // enable THR-empty: raised at once, not yet acknowledged
  ASSERT_TRUE(levels.back());
  const migration::UartState saved = serial.save();
  EXPECT_TRUE(saved.thr_interrupt_pending);
  EXPECT_TRUE(saved.irq_level);
  EXPECT_EQ(saved.iir & 0x0f, 0x02) << "the IIR as the guest would read it";

  const migration::SavedState carried = through_the_blob(saved);
  std::vector<bool> restored_levels;
  Serial restored(ConsoleSink::none(), [&](bool level) { restored_levels.push_back(level); });
  ASSERT_TRUE(restored.restore(carried.uart).has_value());
  ASSERT_FALSE(restored_levels.empty()) << "restore drives the interrupt line";
  EXPECT_TRUE(restored_levels.back()) << "the pending interrupt is still raised";
  EXPECT_EQ(reg(restored, 2) & 0x0f, 0x02) << "and reported in IIR";
  EXPECT_FALSE(restored_levels.back()) << "reading IIR acknowledges it, as before the update";
  EXPECT_EQ(reg(restored, 2) & 0x0f, 0x01);
}

TEST(Serial, RegistersAndTheReceiveFifoSurviveSaveEncodeDecodeRestore) {
  Serial serial(ConsoleSink::none(), nullptr);
  set(serial, 3, 0x80);  // DLAB
  set(serial, 0, 0x03);  // DLL: 38400 baud
  set(serial, 1, 0x01);  // DLM
  set(serial, 3, 0x1b);  // 8 data bits, even parity, DLAB off
  set(serial, 2, 0xc1);  // FIFO on, 14-byte trigger
  set(serial, 1, 0x0d);  // IER: receive, line status, modem status
  set(serial, 4, 0x0b);  // DTR, RTS, OUT2
  set(serial, 7, 0xa5);
  for (uint8_t byte : std::vector<uint8_t>{'h', 'i', 0, 0xff}) serial.enqueue_input(byte);

  const migration::UartState saved = serial.save();
  EXPECT_EQ(saved.ier, 0x0d);
  EXPECT_EQ(saved.lcr, 0x1b);
  EXPECT_EQ(saved.mcr, 0x0b);
  EXPECT_EQ(saved.scr, 0xa5);
  EXPECT_EQ(saved.dll, 0x03);
  EXPECT_EQ(saved.dlm, 0x01);
  EXPECT_EQ(saved.fcr, 0xc1);
  EXPECT_EQ(saved.iir, 0xc4) << "received data pending, FIFOs enabled";
  EXPECT_EQ(saved.lsr, 0x61) << "data ready, transmitter empty";
  EXPECT_TRUE(saved.irq_level);
  EXPECT_EQ(saved.pending_input, (std::vector<uint8_t>{'h', 'i', 0, 0xff}));

  const migration::SavedState carried = through_the_blob(saved);
  EXPECT_EQ(carried.uart, saved);
  Serial restored(ConsoleSink::none(), nullptr);
  ASSERT_TRUE(restored.restore(carried.uart).has_value());
  EXPECT_EQ(restored.save(), saved) << "saving again gives the same state, derived registers included";
  EXPECT_EQ(guest_view(restored), guest_view(serial)) << "the guest sees the same UART";
  for (uint8_t byte : std::vector<uint8_t>{'h', 'i', 0, 0xff}) EXPECT_EQ(reg(restored, 0), byte) << "the FIFO, in order";
  EXPECT_EQ(reg(restored, 5) & 0x01, 0) << "and then it is empty";
}

TEST(Serial, RestoreRefusesAStateItCannotHoldAndChangesNothing) {
  Serial serial(ConsoleSink::none(), nullptr);
  set(serial, 7, 0x42);
  const migration::UartState before = serial.save();
  migration::UartState too_much;
  too_much.pending_input.assign(migration::kMaxUartPendingInput + 1, 'x');
  auto refused = serial.restore(too_much);
  ASSERT_FALSE(refused.has_value());
  EXPECT_EQ(refused.error().message,
            "the saved UART holds 65 bytes of pending input, more than its 64-byte receive FIFO");
  migration::UartState bad_ier;
  bad_ier.ier = 0x10;
  ASSERT_FALSE(serial.restore(bad_ier).has_value());
  EXPECT_EQ(serial.save(), before);
}

// The irqchip restored just before may hold the line high (it was saved at
// another moment, or by an older vmm): restore drives it either way.
TEST(Serial, RestoreDrivesTheLineLowWhenNothingIsPending) {
  std::vector<bool> levels;
  Serial serial(ConsoleSink::none(), [&](bool level) { levels.push_back(level); });
  migration::UartState quiet = through_the_blob(migration::UartState{.mcr = 0x08}).uart;
  quiet.irq_level = true;  // what an inconsistent writer might have said
  ASSERT_TRUE(serial.restore(quiet).has_value());
  ASSERT_EQ(levels, std::vector<bool>{false});
  EXPECT_FALSE(serial.save().irq_level);
}

TEST(Serial, ADefaultStateIsTheUartAfterReset) {
  Serial fresh(ConsoleSink::none(), nullptr);
  EXPECT_EQ(fresh.save(), migration::UartState{});
  Serial restored(ConsoleSink::none(), nullptr);
  set(restored, 7, 0x42);
  ASSERT_TRUE(restored.restore(migration::UartState{}).has_value());
  EXPECT_EQ(guest_view(restored), guest_view(fresh));
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

TEST(TestGuestLink, StateSurvivesSaveEncodeDecodeRestore) {
  SharedRegion region;
  TestGuestLink link(region.data(), SharedRegion::kSize);
  region.shared()->heartbeat = 777;
  link.set_last_verify(VerifyResult{.request = 5, .pages_checked = 4096, .mismatches = 2});
  const migration::TestDeviceState saved = link.save();
  EXPECT_EQ(saved.last_verify_request, 5u);
  EXPECT_EQ(saved.last_result.pages_checked, 4096u);
  EXPECT_EQ(saved.last_result.mismatches, 2u);
  EXPECT_EQ(saved.heartbeat_at_save, 777u);

  const migration::SavedState carried = through_the_blob({}, saved);
  EXPECT_EQ(carried.test_device, saved);
  TestGuestLink restored(region.data(), SharedRegion::kSize);  // the same shared region, as after an update
  restored.restore(carried.test_device);
  ASSERT_TRUE(restored.last_verify().has_value());
  EXPECT_EQ(restored.last_verify()->request, 5u);
  EXPECT_EQ(restored.last_verify()->pages_checked, 4096u);
  EXPECT_EQ(restored.last_verify()->mismatches, 2u);
  EXPECT_EQ(restored.save(), saved);

  restored.restore(migration::TestDeviceState{});
  EXPECT_FALSE(restored.last_verify().has_value()) << "request 0: there was no verification";
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

// ---------------------------------------------------------------------------
// A hostile guest: everything in the shared region is the guest's to write.

// Runs `body` in a child process with a 1 GiB address-space limit and a time
// limit. A loop that guest data can make endless, or an allocation it can
// make unbounded, then fails the test instead of hanging or OOM-killing it.
// `body` returns whether its own checks passed.
::testing::AssertionResult bounded(const std::function<bool()>& body,
                                   std::chrono::milliseconds timeout = std::chrono::seconds(5)) {
  const pid_t child = ::fork();
  if (child < 0) return ::testing::AssertionFailure() << "fork failed";
  if (child == 0) {
    const rlimit limit{1ULL << 30, 1ULL << 30};
    ::setrlimit(RLIMIT_AS, &limit);
    // Nothing may leave the child: an exception would return into gtest,
    // which would then run the remaining tests a second time in here.
    bool passed = false;
    try {
      passed = body();
    } catch (...) {
      ::_exit(3);
    }
    ::_exit(passed ? 0 : 2);
  }
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  int status = 0;
  while (::waitpid(child, &status, WNOHANG) == 0) {
    if (std::chrono::steady_clock::now() >= deadline) {
      ::kill(child, SIGKILL);
      ::waitpid(child, &status, 0);
      return ::testing::AssertionFailure() << "did not finish within " << timeout.count()
                                           << " ms: a loop bounded only by guest data";
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  if (WIFSIGNALED(status))
    return ::testing::AssertionFailure() << "died of signal " << WTERMSIG(status)
                                         << " (SIGABRT: an allocation bounded only by guest data)";
  if (WEXITSTATUS(status) == 3)
    return ::testing::AssertionFailure() << "threw (std::bad_alloc: an allocation bounded only by guest data)";
  if (WEXITSTATUS(status) != 0) return ::testing::AssertionFailure() << "its checks failed";
  return ::testing::AssertionSuccess();
}

TEST(HostileGuest, SweepCountAtTheMaximumReadsAtMostTheRing) {
  SharedRegion region;
  TestGuestLink link(region.data(), SharedRegion::kSize);
  link.configure(1, 1, 1000);
  auto* s = region.shared();
  s->sweep_ms = 20;
  s->sweep_passes = UINT64_MAX;
  EXPECT_TRUE(bounded([&] { return link.sweeps_since(0).size() <= VMM_GUEST_SWEEP_RING - 1; }));
  EXPECT_TRUE(bounded([&] { return link.sweeps_since(UINT64_MAX - 2).size() == 2; }));
  EXPECT_TRUE(bounded([&] { return link.status().sweep_passes == UINT64_MAX; }));
  s->sweep_passes = uint64_t{1} << 63;
  EXPECT_TRUE(bounded([&] { return link.sweeps_since(5).size() == VMM_GUEST_SWEEP_RING - 1; }));
}

TEST(HostileGuest, HeartbeatAtTheMaximumEndsTheGapScan) {
  SharedRegion region;
  TestGuestLink link(region.data(), SharedRegion::kSize);
  auto* s = region.shared();
  for (uint64_t i = 0; i < VMM_GUEST_HEARTBEAT_RING; ++i) s->heartbeat_ring_tsc[i] = i * 10;
  s->heartbeat = UINT64_MAX;
  // A heartbeat saved just before the counter's maximum: the scan must not
  // step past 2^64-1 (where ++h wraps to 0 and the loop never ends).
  EXPECT_TRUE(bounded([&] { return link.largest_gap_since(UINT64_MAX - 3).has_value(); }));
  EXPECT_TRUE(bounded([&] { return !link.largest_gap_since(7).has_value(); }))
      << "the ring cannot hold 2^64 heartbeats";
}

TEST(HostileGuest, HeartbeatThatWentBackwardsGivesNoGap) {
  SharedRegion region;
  TestGuestLink link(region.data(), SharedRegion::kSize);
  auto* s = region.shared();
  for (uint64_t h = 1; h <= 100; ++h) s->heartbeat_ring_tsc[h % VMM_GUEST_HEARTBEAT_RING] = h * 1000;
  s->heartbeat = 40;
  const auto gap = link.largest_gap_since(90);
  ASSERT_FALSE(gap.has_value()) << "a counter below the heartbeat asked for is no gap of 0";
  EXPECT_NE(gap.error().message.find("backwards"), std::string::npos) << gap.error().message;
  EXPECT_FALSE(link.largest_gap_since(0).has_value()) << "heartbeat 0 has no ring entry";
}

TEST(HostileGuest, TscRateIsTheVmmsOwnNotTheRegions) {
  SharedRegion region;
  TestGuestLink link(region.data(), SharedRegion::kSize);
  link.configure(2, 1, 2'000'000);
  auto* s = region.shared();
  s->tsc_khz = 0;  // the guest toggles it
  s->nr_vcpus = 1000;
  EXPECT_EQ(link.tsc_khz(), 2'000'000u);
  EXPECT_EQ(link.vcpus(), 2u);
  EXPECT_EQ(link.status().vcpus.size(), 2u) << "the VMM's vCPU count, not the guest's";
  s->tsc_khz = 1000;
  EXPECT_EQ(link.tsc_khz(), 2'000'000u);

  // After a restore the VMM adopts what it knows itself, writing nothing.
  SharedRegion restored;
  TestGuestLink adopted(restored.data(), SharedRegion::kSize);
  restored.shared()->tsc_khz = 0;
  adopted.adopt(3, 2'500'000);
  EXPECT_EQ(adopted.tsc_khz(), 2'500'000u);
  EXPECT_EQ(adopted.vcpus(), 3u);
  EXPECT_EQ(restored.shared()->magic, 0u) << "adopt writes nothing to the region";
}

TEST(HostileGuest, SweepDurationsThatCannotBeAreZeroNotWrapped) {
  // 2^63 cycles at 1 MHz: * 1000 wraps in 64 bits.
  EXPECT_EQ(sweep_pass_us({.number = 1, .start_tsc = 0, .end_tsc = uint64_t{1} << 63}, 1000), 0u);
  EXPECT_EQ(sweep_pass_us({.number = 1, .start_tsc = 1, .end_tsc = UINT64_MAX}, 1), 0u);
  // An hour is the longest plausible pass; anything below is reported.
  EXPECT_EQ(sweep_pass_us({.number = 1, .start_tsc = 0, .end_tsc = 3'600'000'000}, 1000), 3'600'000'000u);
  EXPECT_EQ(tsc_to_us(UINT64_MAX, 1), UINT64_MAX) << "saturates";
  EXPECT_EQ(tsc_to_us(5000, 0), 0u);
}

TEST(HostileGuest, StatusSumsSaturateInsteadOfWrapping) {
  SharedRegion region;
  TestGuestLink link(region.data(), SharedRegion::kSize);
  link.configure(2, 1, 1000);
  auto* s = region.shared();
  s->vcpu[0].pages_stamped = UINT64_MAX;
  s->vcpu[1].pages_stamped = 2;
  s->vcpu[0].pages_dirtied = UINT64_MAX - 1;
  s->vcpu[1].pages_dirtied = UINT64_MAX - 1;
  const auto status = link.status();
  EXPECT_EQ(status.pages_stamped, UINT64_MAX);
  EXPECT_EQ(status.pages_dirtied, UINT64_MAX);
}

// A guest that answers every verify request at once, with what `answer` writes.
class AnsweringGuest {
 public:
  AnsweringGuest(vmm_guest_shared* s, uint32_t vcpus, std::function<void(volatile vmm_guest_vcpu&)> answer)
      : thread_([this, s, vcpus, answer = std::move(answer)] {
          while (!stop_) {
            const uint64_t request = *static_cast<volatile uint64_t*>(&s->verify_request);
            for (uint32_t i = 0; i < vcpus; ++i) {
              auto& cpu = *static_cast<volatile vmm_guest_vcpu*>(&s->vcpu[i]);
              answer(cpu);
              std::atomic_signal_fence(std::memory_order_seq_cst);
              cpu.verify_seq = request;
            }
            std::this_thread::sleep_for(std::chrono::microseconds(200));
          }
        }) {}
  ~AnsweringGuest() {
    stop_ = true;
    thread_.join();
  }

 private:
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

TEST(HostileGuest, VerifyRefusesAnswersThatCannotBeRight) {
  SharedRegion region;
  TestGuestLink link(region.data(), SharedRegion::kSize);
  link.configure(2, 1, 1000);
  auto* s = region.shared();
  s->phase = VMM_GUEST_PHASE_RUNNING;
  {
    AnsweringGuest guest(s, 2, [](volatile vmm_guest_vcpu& cpu) {
      cpu.verify_pages_checked = 10;
      cpu.verify_mismatches = 11;
    });
    auto result = link.verify(std::chrono::seconds(5));
    ASSERT_FALSE(result.has_value()) << "more mismatches than pages checked";
    EXPECT_NE(result.error().message.find("inconsistent"), std::string::npos) << result.error().message;
  }
  {
    AnsweringGuest guest(s, 2, [](volatile vmm_guest_vcpu& cpu) {
      cpu.verify_pages_checked = UINT64_MAX;
      cpu.verify_mismatches = 0;
    });
    auto result = link.verify(std::chrono::seconds(5));
    ASSERT_FALSE(result.has_value()) << "page counts that add up past 2^64";
    EXPECT_NE(result.error().message.find("inconsistent"), std::string::npos) << result.error().message;
  }
  EXPECT_FALSE(link.last_verify().has_value()) << "a refused answer is not remembered as the last verify";
}

TEST(HostileGuest, VerifyRequestCounterAtTheMaximumIsNotAnAnswer) {
  SharedRegion region;
  TestGuestLink link(region.data(), SharedRegion::kSize);
  link.configure(1, 1, 1000);
  auto* s = region.shared();
  s->phase = VMM_GUEST_PHASE_RUNNING;
  s->verify_request = UINT64_MAX;  // + 1 would wrap to 0, "answered" by every vCPU
  auto result = link.verify(std::chrono::milliseconds(200));
  ASSERT_FALSE(result.has_value());
  EXPECT_NE(result.error().message.find("verify_request"), std::string::npos) << result.error().message;
}

TEST(HostileGuest, VerifyAsksTheVmmsVcpusAndIgnoresAnswersToOtherRequests) {
  SharedRegion region;
  TestGuestLink link(region.data(), SharedRegion::kSize);
  link.configure(1, 1, 1000);
  auto* s = region.shared();
  s->phase = VMM_GUEST_PHASE_RUNNING;
  s->nr_vcpus = 0;  // with the guest's count, nobody would need to answer
  s->vcpu[0].verify_seq = UINT64_MAX;  // "answered" a request never made
  auto result = link.verify(std::chrono::milliseconds(100));
  ASSERT_FALSE(result.has_value()) << "no vCPU answered this request";
  EXPECT_NE(result.error().message.find("0 of 1 vCPUs"), std::string::npos) << result.error().message;
}

}  // namespace
}  // namespace vmm::devices
