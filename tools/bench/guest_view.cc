#include "tools/bench/guest_view.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <x86intrin.h>

#include <algorithm>
#include <cstddef>
#include <thread>
#include <utility>

#include <fmt/format.h>

#include "guest/protocol.h"

namespace bench {

namespace {

constexpr uint64_t kPage = 4096;
// The guest is linked at 1 MiB and its .bss follows: the structure is well
// inside the first 16 MiB.
constexpr uint64_t kScanBytes = 16 * kMiB;
// The layout before the sweep fields were appended; an older guest's
// structure ends there.
constexpr uint64_t kBaseLayoutSize = offsetof(vmm_guest_shared, vcpu) + sizeof(vmm_guest_shared::vcpu);

// The sweep fields were appended to guest/protocol.h while this bench was
// written; reach them only through a template, so the bench still builds
// (and reports "no sweep") against a header without them.
template <class S>
concept HasSweepRing = requires(const volatile S& shared) {
  shared.sweep_ms;
  shared.sweep_passes;
  shared.sweep_ring[0].start_tsc;
  shared.sweep_ring[0].end_tsc;
};

template <class S>
uint64_t sweep_ms_of(const volatile S* shared) {
  if constexpr (HasSweepRing<S>) return shared->sweep_ms;
  else return 0;
}

template <class S>
uint64_t sweep_passes_of(const volatile S* shared) {
  if constexpr (HasSweepRing<S>) return shared->sweep_passes;
  else return 0;
}

template <class S>
constexpr uint64_t sweep_ring_size() {
  if constexpr (HasSweepRing<S>) return sizeof(S::sweep_ring) / sizeof(S::sweep_ring[0]);
  else return 0;
}

// Pass `number` (from 1) sits at [(number - 1) % ring size].
template <class S>
SweepPass sweep_slot_of(const volatile S* shared, uint64_t number) {
  if constexpr (HasSweepRing<S>) {
    const auto& slot = shared->sweep_ring[(number - 1) % sweep_ring_size<S>()];
    return SweepPass{number, slot.start_tsc, slot.end_tsc};
  } else {
    return SweepPass{number, 0, 0};
  }
}

void compiler_barrier() { asm volatile("" ::: "memory"); }

}  // namespace

Result<GuestView> GuestView::open(const std::string& ram_path, uint64_t ram_bytes) {
  const int fd = ::open(ram_path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return fail_errno("cannot open the guest RAM file " + ram_path);
  struct stat status{};
  if (::fstat(fd, &status) != 0) {
    ::close(fd);
    return fail_errno("cannot stat " + ram_path);
  }
  const uint64_t size = std::min<uint64_t>(static_cast<uint64_t>(status.st_size), ram_bytes);
  if (size < kScanBytes) {
    ::close(fd);
    return fail(fmt::format("{} holds {} bytes, less than the {} the guest needs", ram_path, size, kScanBytes));
  }
  void* base = ::mmap(nullptr, size, PROT_READ, MAP_SHARED | MAP_NORESERVE, fd, 0);
  ::close(fd);
  if (base == MAP_FAILED) return fail_errno("cannot map " + ram_path);
  return GuestView(static_cast<const uint8_t*>(base), size);
}

GuestView::GuestView(GuestView&& other) noexcept
    : base_(std::exchange(other.base_, nullptr)), size_(std::exchange(other.size_, 0)), offset_(other.offset_) {}

GuestView& GuestView::operator=(GuestView&& other) noexcept {
  if (this != &other) {
    if (base_) ::munmap(const_cast<uint8_t*>(base_), size_);
    base_ = std::exchange(other.base_, nullptr);
    size_ = std::exchange(other.size_, 0);
    offset_ = other.offset_;
  }
  return *this;
}

GuestView::~GuestView() {
  if (base_) ::munmap(const_cast<uint8_t*>(base_), size_);
}

Result<void> GuestView::locate(std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  while (true) {
    VMM_TRY(check_not_interrupted());
    for (uint64_t at = 0; at + sizeof(vmm_guest_shared) <= kScanBytes; at += 8) {
      const auto* candidate = reinterpret_cast<const volatile vmm_guest_shared*>(base_ + at);
      if (candidate->magic != VMM_GUEST_MAGIC) continue;
      if (candidate->version != VMM_GUEST_PROTOCOL_VERSION) continue;
      const uint64_t size = candidate->shared_size;
      if (size < kBaseLayoutSize || size > kMiB) continue;
      offset_ = at;
      return {};
    }
    if (Clock::now() > deadline)
      return fail(fmt::format("no test-guest status structure (magic {:#x}) in the first {} MiB of guest RAM "
                              "within {} s: is the guest the test guest?",
                              VMM_GUEST_MAGIC, kScanBytes / kMiB, timeout.count() / 1000));
    std::this_thread::sleep_for(20ms);
  }
}

const volatile vmm_guest_shared* GuestView::shared() const {
  return reinterpret_cast<const volatile vmm_guest_shared*>(base_ + offset_.value_or(0));
}

uint64_t GuestView::phase() const { return shared()->phase; }
uint64_t GuestView::pages_total() const { return shared()->pages_total; }
uint64_t GuestView::pages_stamped() const { return shared()->vcpu[0].pages_stamped; }
uint64_t GuestView::tsc_khz() const { return shared()->tsc_khz; }
uint64_t GuestView::seed() const { return shared()->seed; }
uint64_t GuestView::heartbeat() const { return shared()->heartbeat; }
uint64_t GuestView::heartbeat_tsc(uint64_t n) const {
  return shared()->heartbeat_ring_tsc[n % VMM_GUEST_HEARTBEAT_RING];
}

bool GuestView::has_sweep() const {
  if constexpr (!HasSweepRing<vmm_guest_shared>) return false;
  return shared()->shared_size >= sizeof(vmm_guest_shared) && sweep_ms_of(shared()) != 0;
}

uint64_t GuestView::sweep_passes() const { return has_sweep() ? sweep_passes_of(shared()) : 0; }

std::vector<SweepPass> GuestView::sweep_ring() const {
  constexpr uint64_t ring = sweep_ring_size<vmm_guest_shared>();
  std::vector<SweepPass> passes;
  if (!has_sweep() || ring < 2) return passes;
  for (int attempt = 0; attempt < 100; ++attempt) {
    passes.clear();
    const uint64_t published = sweep_passes_of(shared());
    compiler_barrier();
    // The slot of the next pass (that of pass published + 1 - ring) may be
    // mid-rewrite: leave it out.
    const uint64_t first = published >= ring ? published - ring + 2 : 1;
    for (uint64_t number = first; number <= published; ++number) {
      const SweepPass pass = sweep_slot_of(shared(), number);
      if (pass.start_tsc != 0 && pass.end_tsc >= pass.start_tsc) passes.push_back(pass);
    }
    compiler_barrier();
    if (sweep_passes_of(shared()) == published) return passes;
  }
  return passes;
}

Result<StampCheck> GuestView::check_stamps() const {
  const auto started = Clock::now();
  const uint64_t seed = this->seed();
  auto intact = [&](uint64_t offset, uint64_t gpa) {
    return *reinterpret_cast<const volatile uint64_t*>(base_ + offset) == vmm_guest_page_stamp(gpa, seed);
  };
  // QEMU's microvm maps RAM from guest address 0 up to a below-4G limit and
  // the rest from 4 GiB, in file order. Find the limit by probing pages
  // beyond each known candidate (QEMU versions differ), instead of assuming.
  uint64_t low_end = size_;
  StampCheck check;
  check.layout = "file offset = guest address";
  for (uint64_t candidate : {0xe0000000ull, 0xc0000000ull, 0xb0000000ull, 0x80000000ull}) {
    if (candidate >= size_) continue;
    int hits = 0;
    constexpr int kProbes = 16;
    for (int i = 0; i < kProbes; ++i) {
      const uint64_t offset = (candidate + (size_ - candidate) / kProbes * i) & ~(kPage - 1);
      if (intact(offset, offset - candidate + 4 * kGiB)) ++hits;
    }
    if (hits >= kProbes / 2) {
      low_end = candidate;
      check.layout = fmt::format("file offsets from {:#x} on at guest address 4 GiB", candidate);
      break;
    }
  }
  // Stamped pages start after the guest image, which is loaded at 1 MiB.
  for (uint64_t offset = kMiB; offset < size_; offset += kPage) {
    if ((offset & (256 * kMiB - 1)) == 0) VMM_TRY(check_not_interrupted());
    const uint64_t gpa = offset < low_end ? offset : offset - low_end + 4 * kGiB;
    if (intact(offset, gpa)) ++check.pages_intact;
  }
  check.pages_expected = static_cast<int64_t>(pages_total());
  check.duration_us = elapsed_us(started);
  return check;
}

uint64_t read_tsc() { return __rdtsc(); }

uint64_t calibrate_tsc_khz(std::chrono::milliseconds duration) {
  auto now_ns = [] {
    timespec time{};
    ::clock_gettime(CLOCK_MONOTONIC_RAW, &time);
    return static_cast<uint64_t>(time.tv_sec) * 1'000'000'000ull + static_cast<uint64_t>(time.tv_nsec);
  };
  const uint64_t start_ns = now_ns();
  const uint64_t start_tsc = read_tsc();
  std::this_thread::sleep_for(duration);
  const uint64_t end_tsc = read_tsc();
  const uint64_t end_ns = now_ns();
  if (end_ns <= start_ns) return 0;
  return static_cast<uint64_t>(static_cast<double>(end_tsc - start_tsc) * 1e6 /
                               static_cast<double>(end_ns - start_ns));
}

std::optional<uint64_t> baseline_cycles(const std::vector<SweepPass>& passes) {
  if (passes.empty()) return std::nullopt;
  std::vector<uint64_t> cycles;
  const size_t first = passes.size() > kBaselinePasses ? passes.size() - kBaselinePasses : 0;
  for (size_t i = first; i < passes.size(); ++i) cycles.push_back(passes[i].cycles());
  std::ranges::sort(cycles);
  return cycles[cycles.size() / 2];
}

std::optional<SweepPass> first_steady_pass(const std::vector<SweepPass>& ring, uint64_t resumed_tsc,
                                           uint64_t baseline_cycles) {
  const double limit = kBrownoutTolerance * static_cast<double>(baseline_cycles);
  for (const auto& pass : ring)
    if (pass.start_tsc >= resumed_tsc && static_cast<double>(pass.cycles()) <= limit) return pass;
  return std::nullopt;
}

}  // namespace bench
