#include "machine/machine.h"

#include <sys/eventfd.h>
#include <cerrno>
#include <sys/stat.h>

#include <random>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "guest/embedded.h"
#include "machine/pvh.h"

namespace vmm {
namespace {

using namespace std::chrono;

// Where KVM puts its real-mode TSS and identity page table on Intel hosts:
// in the hole below 4 GiB, clear of the shared region and the APICs.
constexpr uint64_t kKvmTssGpa = 0xfffb'd000;
constexpr uint64_t kKvmIdentityMapGpa = 0xfffb'c000;
constexpr uint16_t kExitPortBase = VMM_GUEST_EXIT_PORT;

// PVH entry state: 32-bit protected mode, flat segments, paging off,
// %ebx = hvm_start_info (the layout Xen's PVH ABI specifies).
Result<void> set_pvh_entry_state(kvm::Vcpu& vcpu, uint32_t entry) {
  VMM_TRY_ASSIGN(sregs, vcpu.get_sregs());
  auto flat = [](kvm_segment& seg, uint16_t selector, uint8_t type) {
    seg = kvm_segment{};
    seg.base = 0;
    seg.limit = 0xffffffff;
    seg.selector = selector;
    seg.type = type;
    seg.present = 1;
    seg.s = 1;
    seg.db = 1;
    seg.g = 1;
  };
  flat(sregs.cs, 0x10, 0xb);  // execute/read, accessed
  for (kvm_segment* seg : {&sregs.ds, &sregs.es, &sregs.fs, &sregs.gs, &sregs.ss})
    flat(*seg, 0x18, 0x3);  // read/write, accessed
  sregs.tr = kvm_segment{};
  sregs.tr.limit = 0x67;
  sregs.tr.selector = 0x20;
  sregs.tr.type = 0xb;  // busy 32-bit TSS
  sregs.tr.present = 1;
  sregs.cr0 = 0x11;  // PE | ET
  sregs.cr3 = 0;
  sregs.cr4 = 0;
  sregs.efer = 0;
  VMM_TRY(vcpu.set_sregs(sregs));

  kvm_regs regs{};
  regs.rip = entry;
  regs.rbx = pvh::kStartInfoGpa;
  regs.rflags = 0x2;
  VMM_TRY(vcpu.set_regs(regs));
  return {};
}

}  // namespace

const char* to_string(RunState state) {
  switch (state) {
    case RunState::running: return "running";
    case RunState::paused: return "paused";
    case RunState::shutdown: return "shutdown";
  }
  return "unknown";
}

Machine::Machine(MachineConfig config, kvm::System system, kvm::Capabilities caps, kvm::Vm vm,
                 memory::GuestMemory memory, UniqueFd shutdown_event)
    : config_(std::move(config)), system_(std::move(system)), caps_(caps), vm_(std::move(vm)),
      memory_(std::move(memory)), shutdown_event_(std::move(shutdown_event)) {}

Machine::~Machine() { stop(); }

Result<std::unique_ptr<Machine>> Machine::create(const MachineConfig& config) {
  if (config.vcpus == 0 || config.vcpus > kMaxVcpus)
    return fail(fmt::format("--vcpus {} is out of range: use 1 to {}", config.vcpus, kMaxVcpus));

  // Everything that can be checked without touching KVM comes first.
  VMM_TRY_ASSIGN(layout, memory::MemoryLayout::plan(config.ram_size, config.shared_size, config.ram_backing));
  // The VMM reads the test guest's status structure at the start of the
  // shared region, whatever the guest: it must fit.
  constexpr uint64_t kMinShared = (sizeof(vmm_guest_shared) + memory::kPageSize - 1) / memory::kPageSize * memory::kPageSize;
  if (config.shared_size < kMinShared)
    return fail(fmt::format("--shared-memory {} is smaller than the test guest protocol's {} structure; use at "
                            "least {}", memory::format_size(config.shared_size), memory::format_size(kMinShared),
                            memory::format_size(kMinShared)));

  std::vector<uint8_t> kernel_file;
  std::span<const uint8_t> kernel;
  std::string origin = "the embedded test guest";
  if (config.kernel_path) {
    VMM_TRY_ASSIGN(bytes, pvh::read_file(*config.kernel_path));
    kernel_file = std::move(bytes);
    kernel = kernel_file;
    origin = "kernel '" + *config.kernel_path + "'";
  } else {
    kernel = guest::test_guest_image();
  }
  VMM_TRY_ASSIGN(image, pvh::parse(kernel, origin));

  VMM_TRY_ASSIGN(console, open_console(config));
  const auto started = steady_clock::now();
  VMM_TRY_ASSIGN(host, open_host(config));
  VMM_TRY_ASSIGN(vm, host.system.create_vm());
  VMM_TRY(prepare_vm(vm));
  VMM_TRY_ASSIGN(memory, memory::GuestMemory::create(vm, layout));
  VMM_TRY_ASSIGN(entry, pvh::load(memory, kernel, image, config.cmdline));

  UniqueFd shutdown_event(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!shutdown_event) return fail_errno("cannot create the shutdown eventfd");

  std::unique_ptr<Machine> machine(new Machine(config, std::move(host.system), host.caps, std::move(vm),
                                               std::move(memory), std::move(shutdown_event)));
  VMM_TRY(machine->build_devices(std::move(console)));
  VMM_TRY(machine->create_vcpus(entry));
  spdlog::debug("VM '{}' built in {} us: {} RAM in {}, {} shared memfd, {} vCPU(s), {}",
               config.name, duration_cast<microseconds>(steady_clock::now() - started).count(),
               memory::format_size(config.ram_size), memory::to_string(config.ram_backing),
               memory::format_size(config.shared_size), config.vcpus, origin);
  return machine;
}

Result<Machine::Host> Machine::open_host(const MachineConfig& config) {
  VMM_TRY_ASSIGN(system, kvm::System::open(config.kvm_path));
  VMM_TRY_ASSIGN(caps, system.probe());
  if (config.vcpus > static_cast<uint32_t>(caps.max_vcpus))
    return fail(fmt::format("--vcpus {} is more than this host's KVM allows ({})", config.vcpus, caps.max_vcpus));
  if (config.ram_backing == memory::Backing::guest_memfd && !caps.guest_memfd_mmap())
    return fail("this host's KVM lacks guest_memfd mmap support (KVM_CAP_GUEST_MEMFD_FLAGS lacks "
                "MMAP|INIT_SHARED); use --memory-backing memfd");
  return Host{std::move(system), caps};
}

Result<devices::ConsoleSink> Machine::open_console(const MachineConfig& config) {
  switch (config.console) {
    case ConsoleKind::stdout_console: return devices::ConsoleSink::stdout_sink();
    case ConsoleKind::none: return devices::ConsoleSink::none();
    case ConsoleKind::file: return devices::ConsoleSink::file(config.console_path);
  }
  return devices::ConsoleSink::none();
}

Result<void> Machine::prepare_vm(kvm::Vm& vm) {
  VMM_TRY(vm.set_tss_addr(kKvmTssGpa));
  VMM_TRY(vm.set_identity_map_addr(kKvmIdentityMapGpa));
  VMM_TRY(vm.create_irqchip());
  VMM_TRY(vm.create_pit2());
  return {};
}

Result<std::unique_ptr<Machine>> Machine::assemble(MachineConfig config, Host host, kvm::Vm vm,
                                                   memory::GuestMemory memory,
                                                   const std::vector<std::vector<kvm_cpuid_entry2>>& cpuid) {
  VMM_TRY_ASSIGN(console, open_console(config));
  UniqueFd shutdown_event(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!shutdown_event) return fail_errno("cannot create the shutdown eventfd");
  std::unique_ptr<Machine> machine(new Machine(std::move(config), std::move(host.system), host.caps, std::move(vm),
                                               std::move(memory), std::move(shutdown_event)));
  VMM_TRY(machine->build_devices(std::move(console)));
  VMM_TRY(machine->create_empty_vcpus(cpuid));
  // Threads parked from the start: load_state() runs each vCPU's ioctls on
  // its own thread, and resuming later is a message that cannot fail.
  VMM_TRY(machine->start(false));
  return machine;
}

// restore() and prebuild() take their memory from files that already exist:
// the configuration follows from the layout. Checks one file per region.
Result<void> Machine::describe_memory(MachineConfig& config, const memory::MemoryLayout& layout, size_t files,
                                      memory::SlotKind guest_memfd_slot_kind) {
  if (files != layout.regions.size())
    return fail(fmt::format("got {} memory files for {} regions", files, layout.regions.size()));
  config.ram_size = layout.ram_size();
  config.shared_size = layout.shared() ? layout.shared()->size : 0;
  config.ram_backing = layout.regions.empty() ? memory::Backing::memfd : layout.regions.front().backing;
  if (config.ram_backing == memory::Backing::guest_memfd && guest_memfd_slot_kind == memory::SlotKind::userspace)
    config.ram_backing = memory::Backing::memfd;  // only the capability check looks at this
  return {};
}

Result<std::unique_ptr<Machine>> Machine::restore(MachineConfig config, RestoreInputs inputs) {
  const migration::SavedState& state = inputs.state;
  memory::MemoryLayout layout;
  for (const auto& ref : state.memory) layout.regions.push_back(ref.spec);
  config.name = state.metadata.vm_name;
  config.vcpus = static_cast<uint32_t>(state.vcpus.size());
  VMM_TRY(with_context(describe_memory(config, layout, inputs.region_files.size(), inputs.guest_memfd_slot_kind),
                       "restore"));

  VMM_TRY_ASSIGN(host, open_host(config));
  kvm::Vm vm(std::move(inputs.vm_fd), host.system.vcpu_mmap_size());
  VMM_TRY(prepare_vm(vm));
  VMM_TRY_ASSIGN(memory, memory::GuestMemory::attach(vm, layout, std::move(inputs.region_files),
                                                     inputs.guest_memfd_slot_kind));
  VMM_TRY_ASSIGN(machine, assemble(std::move(config), std::move(host), std::move(vm), std::move(memory)));
  VMM_TRY(machine->load_state(state));
  return machine;
}

Result<std::unique_ptr<Machine>> Machine::prebuild(MachineConfig config, PrebuildInputs inputs) {
  if (config.vcpus == 0 || config.vcpus > kMaxVcpus)
    return fail(fmt::format("{} vCPUs is out of range: use 1 to {}", config.vcpus, kMaxVcpus));
  const memory::MemoryLayout& layout = inputs.layout;
  VMM_TRY(describe_memory(config, layout, inputs.region_files.size(), inputs.guest_memfd_slot_kind));

  const auto started = steady_clock::now();
  VMM_TRY_ASSIGN(host, open_host(config));
  VMM_TRY_ASSIGN(vm, host.system.create_vm());
  VMM_TRY(prepare_vm(vm));
  VMM_TRY_ASSIGN(memory, memory::GuestMemory::attach(vm, layout, std::move(inputs.region_files),
                                                     inputs.guest_memfd_slot_kind));
  if (inputs.prefault) {
    for (const auto& region : memory.regions()) {
      const auto begin = steady_clock::now();
      VMM_TRY(with_context(region->populate_page_tables(), "prefaulting memory region '" + region->spec().name + "'"));
      spdlog::debug("prefaulted the page tables of {} ({}) in {} us", region->spec().name,
                    memory::format_size(region->size()), duration_cast<microseconds>(steady_clock::now() - begin).count());
    }
  }
  if (!inputs.cpuid.empty() && inputs.cpuid.size() != config.vcpus)
    return fail(fmt::format("got CPUID for {} vCPUs of {}", inputs.cpuid.size(), config.vcpus), EINVAL);
  VMM_TRY_ASSIGN(machine, assemble(std::move(config), std::move(host), std::move(vm), std::move(memory),
                                   inputs.cpuid));
  spdlog::debug("VM '{}' prebuilt in {} us", machine->config_.name,
                duration_cast<microseconds>(steady_clock::now() - started).count());
  return machine;
}

Result<void> Machine::load_state(const migration::SavedState& state) {
  std::lock_guard operation(operation_mutex_);
  if (run_state() != RunState::paused) return fail("the VM must be paused to load a saved state", EBUSY);
  if (state.vcpus.size() != vcpus_.size())
    return fail(fmt::format("the saved state has {} vCPUs but the VM was built with {}", state.vcpus.size(),
                            vcpus_.size()), EINVAL);
  const auto& regions = memory_.regions();
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
  VMM_TRY(vm_.restore(state.vm));
  const auto vm_done = steady_clock::now();
  VMM_TRY(restore_vcpus(state.vcpus));
  spdlog::debug("state loaded: VM {} us, {} vCPU(s) {} us", duration_cast<microseconds>(vm_done - started).count(),
                state.vcpus.size(), duration_cast<microseconds>(steady_clock::now() - vm_done).count());

  devices::SerialRegisters serial;
  serial.ier = state.uart.ier;
  serial.iir = state.uart.iir;
  serial.lcr = state.uart.lcr;
  serial.mcr = state.uart.mcr;
  serial.lsr = state.uart.lsr;
  serial.msr = state.uart.msr;
  serial.scr = state.uart.scr;
  serial.dll = state.uart.dll;
  serial.dlm = state.uart.dlm;
  serial.fcr = state.uart.fcr;
  serial.rx.assign(state.uart.pending_input.begin(), state.uart.pending_input.end());
  serial_->set_registers(serial);
  if (state.test_device.last_verify_request != 0) {
    devices::VerifyResult last;
    last.request = state.test_device.last_verify_request;
    last.pages_checked = state.test_device.last_result.pages_checked;
    last.mismatches = state.test_device.last_result.mismatches;
    guest_link_->set_last_verify(last);
  }
  return {};
}

Result<void> Machine::create_empty_vcpus(const std::vector<std::vector<kvm_cpuid_entry2>>& cpuid) {
  VMM_TRY_ASSIGN(msrs, system_.msrs_to_save());
  msrs_to_save_ = std::move(msrs);
  for (uint32_t id = 0; id < config_.vcpus; ++id) {
    VMM_TRY_ASSIGN(vcpu, vm_.create_vcpu(id));
    if (id < cpuid.size() && !cpuid[id].empty())
      VMM_TRY(with_context(vcpu.preset_cpuid(cpuid[id]), fmt::format("presetting the CPUID of vCPU {}", id)));
    vcpus_.push_back(std::make_unique<VcpuThread>(std::move(vcpu), *this));
  }
  return {};
}

Result<void> Machine::restore_vcpus(const std::vector<kvm::VcpuState>& states) {
  return on_every_vcpu([&](size_t i, kvm::Vcpu& vcpu) { return vcpu.restore(states[i]); });
}

Result<void> Machine::on_every_vcpu(const std::function<Result<void>(size_t, kvm::Vcpu&)>& task) {
  std::vector<std::function<Result<void>(kvm::Vcpu&)>> tasks;
  tasks.reserve(vcpus_.size());
  for (size_t i = 0; i < vcpus_.size(); ++i) tasks.emplace_back([&task, i](kvm::Vcpu& vcpu) { return task(i, vcpu); });
  size_t posted = 0;
  Result<void> outcome;
  for (; posted < vcpus_.size(); ++posted) {
    if (auto sent = vcpus_[posted]->post_task(tasks[posted]); !sent) {
      outcome = std::unexpected(sent.error());
      break;
    }
  }
  for (size_t i = 0; i < posted; ++i) {
    auto done = vcpus_[i]->wait_task();
    if (!done && outcome) outcome = std::unexpected(done.error());
  }
  return outcome;
}

Result<migration::SavedState> Machine::save_state() {
  // The operation lock keeps the vCPUs parked until the state is complete.
  std::lock_guard operation(operation_mutex_);
  if (run_state() != RunState::paused) return fail("the VM must be paused to save its state", EBUSY);
  migration::SavedState state;
  state.metadata.vm_name = config_.name;
  const auto started = steady_clock::now();
  VMM_TRY_ASSIGN(vm_state, vm_.save());
  const auto vm_done = steady_clock::now();
  state.vm = vm_state;
  state.vcpus.resize(vcpus_.size());
  VMM_TRY(on_every_vcpu([&](size_t i, kvm::Vcpu& vcpu) -> Result<void> {
    VMM_TRY_ASSIGN(saved, vcpu.save(msrs_to_save_));
    state.vcpus[i] = std::move(saved);
    return {};
  }));
  spdlog::debug("state saved: VM {} us, {} vCPU(s) {} us", duration_cast<microseconds>(vm_done - started).count(),
                vcpus_.size(), duration_cast<microseconds>(steady_clock::now() - vm_done).count());
  for (const auto& region : memory_.regions()) {
    migration::RegionRef ref;
    ref.spec = region->spec();
    ref.slot_kind = region->slot_kind();
    state.memory.push_back(std::move(ref));
  }
  const devices::SerialRegisters serial = serial_->registers();
  state.uart = {serial.ier, serial.iir, serial.lcr, serial.mcr, serial.lsr, serial.msr, serial.scr,
                serial.dll, serial.dlm, serial.fcr, {serial.rx.begin(), serial.rx.end()}, false};
  state.test_device.heartbeat_at_save = guest_link_->status().heartbeat;
  if (auto last = guest_link_->last_verify()) {
    state.test_device.last_verify_request = last->request;
    state.test_device.last_result = {last->pages_checked, last->mismatches};
  }
  return state;
}

Result<void> Machine::build_devices(devices::ConsoleSink console) {
  serial_ = std::make_unique<devices::Serial>(std::move(console), [this](bool level) {
    if (auto set = vm_.set_irq_line(devices::kCom1Irq, level); !set)
      spdlog::warn("serial interrupt: {}", set.error().describe());
  });
  VMM_TRY(pio_bus_.add(devices::kCom1Base, 8, serial_.get()));
  exit_port_ = std::make_unique<devices::ExitPort>([this](uint8_t code) {
    request_shutdown(fmt::format("the guest requested shutdown (exit code {})", code), true);
  });
  VMM_TRY(pio_bus_.add(kExitPortBase, 1, exit_port_.get()));

  const memory::Region* shared = memory_.region("shared");
  if (!shared) return fail("the memory layout has no shared region");
  guest_link_ = std::make_unique<devices::TestGuestLink>(shared->host(), shared->size());
  return {};
}

Result<void> Machine::create_vcpus(uint32_t entry) {
  VMM_TRY_ASSIGN(cpuid, system_.supported_cpuid());
  VMM_TRY_ASSIGN(msrs, system_.msrs_to_save());
  msrs_to_save_ = std::move(msrs);
  uint64_t tsc_khz = 0;
  for (uint32_t id = 0; id < config_.vcpus; ++id) {
    VMM_TRY_ASSIGN(vcpu, vm_.create_vcpu(id));
    VMM_TRY(vcpu.set_cpuid(cpuid));
    VMM_TRY(set_pvh_entry_state(vcpu, entry));
    if (id != 0) {
      // PVH starts only the boot CPU; our test guest expects every vCPU at
      // the entry point, so the others are made runnable directly.
      VMM_TRY(vcpu.set_mp_state(kvm_mp_state{KVM_MP_STATE_RUNNABLE}));
    } else if (caps_.tsc_khz) {
      if (auto khz = vcpu.get_tsc_khz(); khz) tsc_khz = *khz;
    }
    vcpus_.push_back(std::make_unique<VcpuThread>(std::move(vcpu), *this));
  }
  std::random_device entropy;
  const uint64_t seed = (uint64_t{entropy()} << 32) | entropy();
  guest_link_->configure(config_.vcpus, seed, tsc_khz);
  spdlog::debug("test guest seed 0x{:x}, TSC {} kHz", seed, tsc_khz);
  return {};
}

Result<void> Machine::start(bool running) {
  std::lock_guard operation(operation_mutex_);
  {
    std::lock_guard lock(data_mutex_);
    if (state_ == RunState::shutdown) return fail("the VM has shut down");
    if (threads_started_) return fail("the vCPU threads are already started");
    threads_started_ = true;
  }
  for (auto& vcpu : vcpus_) VMM_TRY(vcpu->start(running));
  std::lock_guard lock(data_mutex_);
  state_ = running ? RunState::running : RunState::paused;
  return {};
}

void Machine::flush_console() {
  if (serial_) serial_->flush();
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
  // No data lock from here to the end of the wait: a vCPU that requests a
  // shutdown or fails meanwhile takes it, and must not block on it.
  const auto begin = steady_clock::now();
  for (auto& vcpu : vcpus_) vcpu->request_pause();
  const auto deadline = begin + timeout;
  for (auto& vcpu : vcpus_) {
    if (!vcpu->wait_paused(deadline)) {
      // Leave no vCPU half-stopped: let the others run again.
      for (auto& other : vcpus_) other->resume();
      return fail(fmt::format("vCPU {} did not pause within {} ms", vcpu->id(), timeout.count()),
                  ETIMEDOUT);
    }
  }
  const auto took = duration_cast<microseconds>(steady_clock::now() - begin);
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
  for (auto& vcpu : vcpus_) vcpu->resume();
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

Result<devices::VerifyResult> Machine::verify_guest(milliseconds timeout) {
  std::stop_token stop;
  {
    std::lock_guard lock(data_mutex_);
    if (update_leased_) return std::unexpected(busy_updating("guest-verify"));
    if (state_ != RunState::running)
      return fail(fmt::format("the VM is {}: the guest can only verify its memory while running (send 'cont' "
                              "first)", to_string(state_)));
    stop = verify_stop_.get_token();
  }
  auto result = guest_link_->verify(timeout, stop);
  if (!result && result.error().code == ECANCELED)
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
    for (const auto& region : memory_.regions()) {
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
  for (auto& vcpu : vcpus_) vcpu->exit();
  if (serial_) serial_->flush();
  std::lock_guard lock(data_mutex_);
  state_ = RunState::shutdown;
}

std::vector<std::vector<kvm_cpuid_entry2>> Machine::vcpu_cpuid() const {
  std::vector<std::vector<kvm_cpuid_entry2>> out;
  for (const auto& vcpu : vcpus_) out.push_back(vcpu->cpuid_set());
  return out;
}

std::vector<RegionInfo> Machine::memory_info() const {
  std::vector<RegionInfo> regions;
  for (const auto& region : memory_.regions()) {
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

std::vector<VcpuInfo> Machine::vcpu_info() const {
  std::vector<VcpuInfo> infos;
  for (const auto& vcpu : vcpus_)
    infos.push_back({vcpu->id(), vcpu->thread_id(), vcpu->state(), vcpu->exit_counts()});
  return infos;
}

void Machine::set_event_sink(EventSink sink) {
  std::lock_guard lock(event_mutex_);
  event_sink_ = std::move(sink);
}

void Machine::emit_event(const std::string& name, const nlohmann::json& data) {
  std::lock_guard lock(event_mutex_);
  if (event_sink_) event_sink_(name, data);
}

void Machine::io_in(uint16_t port, std::span<uint8_t> data) {
  if (!pio_bus_.read(port, data)) {
    std::ranges::fill(data, 0xff);  // nothing there: the bus floats high
    if (unclaimed_accesses_.fetch_add(1) < 16) spdlog::debug("unclaimed port read 0x{:x}", port);
  }
}

VcpuExitHandler::Next Machine::io_out(uint16_t port, std::span<const uint8_t> data) {
  if (!pio_bus_.write(port, data)) {
    if (unclaimed_accesses_.fetch_add(1) < 16) spdlog::debug("unclaimed port write 0x{:x}", port);
    return Next::resume_guest;
  }
  // The exit port parks the writing vCPU: the VM is going away.
  return port == kExitPortBase ? Next::park : Next::resume_guest;
}

void Machine::mmio_read(uint64_t address, std::span<uint8_t> data) {
  if (!mmio_bus_.read(address, data)) {
    std::ranges::fill(data, 0xff);
    if (unclaimed_accesses_.fetch_add(1) < 16) spdlog::debug("unclaimed MMIO read 0x{:x}", address);
  }
}

void Machine::mmio_write(uint64_t address, std::span<const uint8_t> data) {
  if (!mmio_bus_.write(address, data) && unclaimed_accesses_.fetch_add(1) < 16)
    spdlog::debug("unclaimed MMIO write 0x{:x}", address);
}

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
