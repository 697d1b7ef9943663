#include "machine/machine.h"

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "machine/machine_builder.h"

namespace vmm {

using namespace std::chrono;

const char* to_string(RunState state) {
  switch (state) {
    case RunState::running: return "running";
    case RunState::paused: return "paused";
    case RunState::shutdown: return "shutdown";
  }
  return "unknown";
}

Machine::Machine(MachineConfig config, VmCore core, UniqueFd shutdown_event)
    : config_(std::move(config)), core_(std::move(core)), shutdown_event_(std::move(shutdown_event)) {}

Machine::~Machine() { stop(); }

Result<std::unique_ptr<Machine>> Machine::create(const MachineConfig& config) {
  return MachineBuilder::build(config, MachineBuilder::NewMemory{});
}

Result<std::unique_ptr<Machine>> Machine::restore(MachineConfig config, RestoreInputs inputs) {
  return MachineBuilder::build(std::move(config), std::move(inputs));
}

Result<std::unique_ptr<Machine>> Machine::prebuild(MachineConfig config, PrebuildInputs inputs) {
  return MachineBuilder::build(std::move(config), std::move(inputs));
}

Result<void> Machine::load_state(const migration::SavedState& state) {
  std::lock_guard operation(operation_mutex_);
  if (run_state() != RunState::paused) return fail("the VM must be paused to load a saved state", EBUSY);
  if (state.vcpus.size() != vcpus_.size())
    return fail(fmt::format("the saved state has {} vCPUs but the VM was built with {}", state.vcpus.size(),
                            vcpus_.size()), EINVAL);
  const auto& regions = core_.memory.regions();
  if (state.memory.size() != regions.size())
    return fail(fmt::format("the saved state has {} memory regions but the VM was built with {}",
                            state.memory.size(), regions.size()), EINVAL);
  for (size_t i = 0; i < regions.size(); ++i) {
    const memory::RegionSpec& saved = state.memory[i].spec;
    const memory::RegionSpec& built = regions[i]->spec();
    if (saved.name != built.name || saved.gpa != built.gpa || saved.size != built.size)
      return fail(fmt::format("memory region {} of the saved state ('{}', {} at 0x{:x}) is not the VM's ('{}', "
                              "{} at 0x{:x})", i, saved.name, memory::format_size(saved.size), saved.gpa,
                              built.name, memory::format_size(built.size), built.gpa), EINVAL);
  }
  const auto started = steady_clock::now();
  VMM_TRY(core_.vm.restore(state.vm));
  const auto vm_done = steady_clock::now();
  // Each boot calibrates the host TSC anew, so after a kexec the saved rate
  // can differ from this host's (two TCG boots: ~790 ppm). KVM runs the guest
  // at the saved rate where it can (TSC scaling; without it, a faster rate by
  // catching up, or a difference within its 250 ppm tolerance); a slower rate
  // without scaling fails KVM_SET_TSC_KHZ with EINVAL, and the guest then
  // keeps this host's rate rather than being lost: its TSC then
  // ticks that much faster or slower than it calibrated. kvmclock stays right
  // (KVM derives it from the real rate); a guest timing by the raw TSC drifts
  // by the difference until it recalibrates.
  const uint64_t saved_khz = state.vcpus.empty() ? 0 : state.vcpus[0].tsc_khz;
  std::vector<kvm::Vcpu::TscRestore> tsc(vcpus_.size());
  VMM_TRY(vcpus_.on_every_vcpu([&](size_t i, kvm::Vcpu& vcpu) { return vcpu.restore(state.vcpus[i], &tsc[i]); }));
  tsc_rate_change_.reset();
  const bool tsc_corrected = std::ranges::any_of(tsc, [](const auto& vcpu) { return vcpu.tsc_corrected; });
  const bool tsc_not_set = std::ranges::any_of(tsc, [](const auto& vcpu) { return vcpu.tsc_not_set; });
  if (tsc_corrected)
    spdlog::info("KVM did not take the saved TSC as written; it was set through the vCPUs' TSC offset");
  if (tsc_not_set)
    spdlog::warn("KVM keeps its own TSC for the guest (it ignored both the TSC write and the TSC offset): the "
                 "guest's TSC does not show the time it was frozen; kvmclock does");
  uint64_t host = 0;
  bool kept_host_rate = false;
  for (const auto& vcpu : tsc) {
    host = std::max(host, vcpu.host_khz);
    kept_host_rate = kept_host_rate || vcpu.kept_host_rate;
  }
  if (host != 0) {
    const uint64_t khz = kept_host_rate ? host : saved_khz;
    tsc_rate_change_ = TscRateChange{saved_khz, host, khz};
    const double ppm = saved_khz ? (static_cast<double>(host) - static_cast<double>(saved_khz)) * 1e6 /
                                       static_cast<double>(saved_khz)
                                 : 0;
    if (kept_host_rate) {
      spdlog::warn("the guest's TSC ran at {} kHz, this host's runs at {} kHz ({:+.0f} ppm) and KVM cannot run the "
                   "saved rate (no TSC scaling, slower beyond its tolerance): the guest keeps running at {} kHz; "
                   "kvmclock stays right, a guest timing by the raw TSC drifts by {:+.0f} ppm until it recalibrates",
                   saved_khz, host, ppm, khz, ppm);
    } else {
      spdlog::info("the guest's TSC ran at {} kHz, this host's runs at {} kHz ({:+.0f} ppm): KVM runs the guest at "
                   "its saved rate, so it sees no change",
                   saved_khz, host, ppm);
    }
  }
  spdlog::debug("state loaded: VM {} us, {} vCPU(s) {} us", duration_cast<microseconds>(vm_done - started).count(),
                state.vcpus.size(), duration_cast<microseconds>(steady_clock::now() - vm_done).count());

  VMM_TRY(with_context(devices_->serial().restore(state.uart), "restoring the UART"));
  devices_->guest().restore(state.test_device);
  // The test guest's vCPU count and TSC rate as the VMM knows them, not as
  // the (guest-writable) shared region says.
  devices_->guest().adopt(config_.vcpus, tsc_rate_change_ ? tsc_rate_change_->khz : saved_khz);
  return {};
}

Result<migration::SavedState> Machine::save_state() {
  // The operation lock keeps the vCPUs parked until the state is complete.
  std::lock_guard operation(operation_mutex_);
  if (run_state() != RunState::paused) return fail("the VM must be paused to save its state", EBUSY);
  migration::SavedState state;
  state.metadata.vm_name = config_.name;
  const auto started = steady_clock::now();
  VMM_TRY_ASSIGN(vm_state, core_.vm.save());
  const auto vm_done = steady_clock::now();
  state.vm = vm_state;
  state.vcpus.resize(vcpus_.size());
  VMM_TRY(vcpus_.on_every_vcpu([&](size_t i, kvm::Vcpu& vcpu) -> Result<void> {
    VMM_TRY_ASSIGN(saved, vcpu.save(core_.msrs_to_save));
    state.vcpus[i] = std::move(saved);
    return {};
  }));
  spdlog::debug("state saved: VM {} us, {} vCPU(s) {} us", duration_cast<microseconds>(vm_done - started).count(),
                vcpus_.size(), duration_cast<microseconds>(steady_clock::now() - vm_done).count());
  for (const auto& region : core_.memory.regions()) {
    migration::RegionRef ref;
    ref.spec = region->spec();
    ref.slot_kind = region->slot_kind();
    state.memory.push_back(std::move(ref));
  }
  state.uart = devices_->serial().save();
  state.test_device = devices_->guest().save();
  return state;
}

Result<void> Machine::start(bool running) {
  std::lock_guard operation(operation_mutex_);
  {
    std::lock_guard lock(data_mutex_);
    if (state_ == RunState::shutdown) return fail("the VM has shut down");
    if (threads_started_) return fail("the vCPU threads are already started");
    threads_started_ = true;
  }
  VMM_TRY(vcpus_.start(running));
  std::lock_guard lock(data_mutex_);
  state_ = running ? RunState::running : RunState::paused;
  return {};
}

void Machine::flush_console() {
  if (devices_) devices_->flush_console();
}

Error Machine::busy_updating(std::string_view what) {
  return Error{EBUSY, fmt::format("{} is refused: a live update is in progress; retry when it ends", what)};
}

std::optional<Error> Machine::refuse_if_shutting_down_locked() const {
  if (state_ == RunState::shutdown) return Error{ESHUTDOWN, "the VM has shut down"};
  if (!shutdown_reason_.empty()) return Error{ESHUTDOWN, fmt::format("the VM is shutting down ({})", shutdown_reason_)};
  return std::nullopt;
}

Result<microseconds> Machine::pause(milliseconds timeout) {
  // Checked before and after taking the operation lock: a caller never
  // waits behind an update's pause only to stop the VM it has frozen.
  if (update_in_progress()) return std::unexpected(busy_updating("pausing the VM"));
  std::lock_guard operation(operation_mutex_);
  if (update_in_progress()) return std::unexpected(busy_updating("pausing the VM"));
  return pause_vcpus(timeout);
}

Result<void> Machine::resume() {
  if (update_in_progress()) return std::unexpected(busy_updating("resuming the VM"));
  std::lock_guard operation(operation_mutex_);
  if (update_in_progress()) return std::unexpected(busy_updating("resuming the VM"));
  return resume_vcpus();
}

Result<microseconds> Machine::pause_vcpus(milliseconds timeout) {
  {
    std::lock_guard lock(data_mutex_);
    if (auto refused = refuse_if_shutting_down_locked()) return std::unexpected(*refused);
    if (state_ == RunState::paused) return microseconds(0);
  }
  // No data lock during the wait: a vCPU that requests a shutdown or fails
  // meanwhile takes it, and must not block on it.
  VMM_TRY_ASSIGN(took, vcpus_.pause(timeout));
  std::string shutting_down;
  {
    std::lock_guard lock(data_mutex_);
    state_ = RunState::paused;
    last_pause_latency_ = took;
    shutting_down = shutdown_reason_;
  }
  spdlog::debug("paused {} vCPU(s) in {} us", vcpus_.size(), took.count());
  emit_event("STOP", nlohmann::json::object());
  // A guest that wrote the exit port (or a vCPU that failed) while it was
  // being paused: the VM is going away, so whatever wanted it paused (an
  // update, a stop) must not go on with it. The vCPUs stay parked.
  if (!shutting_down.empty())
    return fail(fmt::format("the VM began shutting down while it was being paused ({})", shutting_down),
                ECANCELED);
  return took;
}

Result<void> Machine::resume_vcpus() {
  {
    std::lock_guard lock(data_mutex_);
    if (auto refused = refuse_if_shutting_down_locked()) return std::unexpected(*refused);
    if (state_ == RunState::running) return {};
  }
  vcpus_.resume();
  {
    std::lock_guard lock(data_mutex_);
    state_ = RunState::running;
  }
  emit_event("RESUME", nlohmann::json::object());
  return {};
}

Result<UpdateLease> Machine::begin_update() {
  // After any pause or resume in flight: the update then sees the run state
  // that every earlier command left, and nothing changes it but the lease.
  std::lock_guard operation(operation_mutex_);
  std::lock_guard lock(data_mutex_);
  if (update_leased_) return fail("a live update is already in progress", EBUSY);
  if (auto refused = refuse_if_shutting_down_locked())
    return fail(fmt::format("no live update can start: {}", refused->message), refused->code);
  update_leased_ = true;
  verify_stop_.request_stop();
  verify_stop_ = std::stop_source();
  return UpdateLease(*this);
}

void Machine::end_update() {
  std::lock_guard lock(data_mutex_);
  update_leased_ = false;
}

bool Machine::update_in_progress() const {
  std::lock_guard lock(data_mutex_);
  return update_leased_;
}

UpdateLease& UpdateLease::operator=(UpdateLease&& other) noexcept {
  if (this != &other) {
    end();
    machine_ = std::exchange(other.machine_, nullptr);
  }
  return *this;
}

Result<microseconds> UpdateLease::pause(milliseconds timeout) {
  if (!machine_) return fail("this update lease has ended", EINVAL);
  std::lock_guard operation(machine_->operation_mutex_);
  return machine_->pause_vcpus(timeout);
}

Result<void> UpdateLease::resume() {
  if (!machine_) return fail("this update lease has ended", EINVAL);
  std::lock_guard operation(machine_->operation_mutex_);
  return machine_->resume_vcpus();
}

void UpdateLease::end() {
  if (machine_) std::exchange(machine_, nullptr)->end_update();
}

Result<void> Machine::quit(const std::string& reason) {
  {
    std::lock_guard lock(data_mutex_);
    // Under the same lock as begin_update(): either the update sees this
    // shutdown and does not start, or this sees the update.
    if (update_leased_) return std::unexpected(busy_updating("quit"));
    if (!shutdown_reason_.empty()) return {};
    shutdown_reason_ = reason;
  }
  announce_shutdown(reason, false);
  return {};
}

Result<devices::VerifyResult> Machine::verify_guest(milliseconds timeout, std::stop_token shutting_down) {
  std::stop_token stop;
  {
    std::lock_guard lock(data_mutex_);
    if (update_leased_) return std::unexpected(busy_updating("guest-verify"));
    if (state_ != RunState::running)
      return fail(fmt::format("the VM is {}: the guest can only verify its memory while running (send 'cont' "
                              "first)", to_string(state_)));
    stop = verify_stop_.get_token();
  }
  // Either stop ends the wait: an update that began, or the caller's (the
  // control server shutting down).
  std::stop_source either;
  std::stop_callback on_update(stop, [&either] { either.request_stop(); });
  std::stop_callback on_shutdown(shutting_down, [&either] { either.request_stop(); });
  auto result = devices_->guest().verify(timeout, either.get_token());
  if (!result && result.error().code == ECANCELED && stop.stop_requested())
    return std::unexpected(busy_updating(fmt::format("guest-verify ({})", result.error().message)));
  return result;
}

RunState Machine::run_state() const {
  std::lock_guard lock(data_mutex_);
  return state_;
}

std::optional<microseconds> Machine::last_pause_latency() const {
  std::lock_guard lock(data_mutex_);
  return last_pause_latency_;
}

void Machine::request_shutdown(const std::string& reason, bool by_guest) {
  {
    std::lock_guard lock(data_mutex_);
    if (!shutdown_reason_.empty()) return;
    shutdown_reason_ = reason;
  }
  announce_shutdown(reason, by_guest);
}

void Machine::announce_shutdown(const std::string& reason, bool by_guest) {
  spdlog::info("shutting down: {}", reason);
  emit_event("SHUTDOWN", {{"guest", by_guest}, {"reason", reason}});
  const uint64_t one = 1;
  [[maybe_unused]] ssize_t n = ::write(shutdown_event_.get(), &one, sizeof one);
}

std::string Machine::shutdown_reason() const {
  std::lock_guard lock(data_mutex_);
  return shutdown_reason_;
}

bool Machine::shutdown_failed() const {
  std::lock_guard lock(data_mutex_);
  return shutdown_failed_;
}

void Machine::prefault_in_background() {
  if (prefault_thread_.joinable()) return;
  prefault_thread_ = std::thread([this] {
    const auto begin = steady_clock::now();
    // In chunks, so stop() need not wait for gigabytes.
    constexpr uint64_t kChunk = 64ULL << 20;
    for (const auto& region : core_.memory.regions()) {
      for (uint64_t offset = 0; offset < region->size() && !prefault_stop_.load(); offset += kChunk) {
        if (auto done = region->populate_page_tables(offset, std::min(kChunk, region->size() - offset)); !done) {
          spdlog::warn("prefaulting '{}' in the background: {}", region->spec().name, done.error().describe());
          break;
        }
      }
    }
    spdlog::debug("prefaulted guest memory in the background in {} us",
                  duration_cast<microseconds>(steady_clock::now() - begin).count());
  });
}

void Machine::stop() {
  prefault_stop_ = true;
  if (prefault_thread_.joinable()) prefault_thread_.join();
  // After a pause, save or load in flight, never in the middle of one.
  std::lock_guard operation(operation_mutex_);
  vcpus_.exit();
  flush_console();
  std::lock_guard lock(data_mutex_);
  state_ = RunState::shutdown;
}

std::vector<std::vector<kvm_cpuid_entry2>> Machine::vcpu_cpuid() const { return vcpus_.cpuid(); }

std::vector<RegionInfo> Machine::memory_info() const {
  std::vector<RegionInfo> regions;
  for (const auto& region : core_.memory.regions()) {
    RegionInfo info{region->spec().name, region->gpa(), region->size(), region->spec().backing,
                    region->slot_kind(), 0, 0};
    struct stat st{};
    if (::fstat(region->fd().get(), &st) == 0) {
      info.inode = st.st_ino;
      info.device = st.st_dev;
    }
    regions.push_back(std::move(info));
  }
  return regions;
}

std::vector<VcpuInfo> Machine::vcpu_info() const { return vcpus_.info(); }

void Machine::set_event_sink(EventSink sink) {
  std::lock_guard lock(event_mutex_);
  event_sink_ = std::move(sink);
}

void Machine::emit_event(const std::string& name, const nlohmann::json& data) {
  std::lock_guard lock(event_mutex_);
  if (event_sink_) event_sink_(name, data);
}

void Machine::io_in(uint16_t port, std::span<uint8_t> data) { devices_->io_in(port, data); }

VcpuExitHandler::Next Machine::io_out(uint16_t port, std::span<const uint8_t> data) {
  // The exit port parks the writing vCPU: the VM is going away.
  if (devices_->io_out(port, data) && port == DeviceSet::kExitPort) return Next::park;
  return Next::resume_guest;
}

void Machine::mmio_read(uint64_t address, std::span<uint8_t> data) { devices_->mmio_read(address, data); }

void Machine::mmio_write(uint64_t address, std::span<const uint8_t> data) { devices_->mmio_write(address, data); }

void Machine::guest_system_event(uint32_t vcpu, uint32_t type) {
  request_shutdown(fmt::format("vCPU {} requested a system event (type {})", vcpu, type), true);
}

void Machine::vcpu_failed(uint32_t vcpu, const std::string& why) {
  spdlog::error("vCPU {} stopped: {}", vcpu, why);
  {
    std::lock_guard lock(data_mutex_);
    shutdown_failed_ = true;
  }
  request_shutdown(fmt::format("vCPU {} failed: {}", vcpu, why), false);
}


}  // namespace vmm
