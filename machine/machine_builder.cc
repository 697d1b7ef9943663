#include "machine/machine_builder.h"

#include <sys/eventfd.h>

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

struct Host {
  kvm::System system;
  kvm::Capabilities caps;
};

Result<Host> open_host(const MachineConfig& config) {
  VMM_TRY_ASSIGN(system, kvm::System::open(config.kvm_path));
  VMM_TRY_ASSIGN(caps, system.probe());
  if (config.vcpus > static_cast<uint32_t>(caps.max_vcpus))
    return fail(fmt::format("--vcpus {} is more than this host's KVM allows ({})", config.vcpus, caps.max_vcpus));
  if (config.ram_backing == memory::Backing::guest_memfd && !caps.guest_memfd_mmap())
    return fail("this host's KVM lacks guest_memfd mmap support (KVM_CAP_GUEST_MEMFD_FLAGS lacks "
                "MMAP|INIT_SHARED); use --memory-backing memfd");
  return Host{std::move(system), caps};
}

Result<devices::ConsoleSink> open_console(const MachineConfig& config) {
  switch (config.console) {
    case ConsoleKind::stdout_console: return devices::ConsoleSink::stdout_sink();
    case ConsoleKind::none: return devices::ConsoleSink::none();
    case ConsoleKind::file: return devices::ConsoleSink::file(config.console_path);
  }
  return devices::ConsoleSink::none();
}

Result<void> prepare_vm(kvm::Vm& vm) {
  VMM_TRY(vm.set_tss_addr(kKvmTssGpa));
  VMM_TRY(vm.set_identity_map_addr(kKvmIdentityMapGpa));
  VMM_TRY(vm.create_irqchip());
  VMM_TRY(vm.create_pit2());
  return {};
}

// Memory that already exists (received or retrieved): the configuration
// follows from its layout. Checks one file per region.
Result<void> describe_memory(MachineConfig& config, const memory::MemoryLayout& layout, size_t files,
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

// The kernel of a new VM: read and parsed before KVM is touched.
struct Kernel {
  std::vector<uint8_t> file;  // empty for the embedded test guest
  std::span<const uint8_t> bytes;
  std::string origin = "the embedded test guest";
  pvh::Image image;
};

Result<Kernel> read_kernel(const MachineConfig& config) {
  Kernel kernel;
  if (config.kernel_path) {
    VMM_TRY_ASSIGN(bytes, pvh::read_file(*config.kernel_path));
    kernel.file = std::move(bytes);
    kernel.bytes = kernel.file;
    kernel.origin = "kernel '" + *config.kernel_path + "'";
  } else {
    kernel.bytes = guest::test_guest_image();
  }
  VMM_TRY_ASSIGN(image, pvh::parse(kernel.bytes, kernel.origin));
  kernel.image = std::move(image);
  return kernel;
}

}  // namespace

Result<std::unique_ptr<Machine>> MachineBuilder::build(MachineConfig config, MemorySource source) {
  const bool fresh = std::holds_alternative<NewMemory>(source);
  auto* received = std::get_if<PrebuildInputs>(&source);
  auto* retrieved = std::get_if<RestoreInputs>(&source);

  // 1. Everything that can be checked without touching KVM: the vCPU count,
  //    the layout and (new VM) the kernel; existing memory dictates the
  //    configuration.
  memory::MemoryLayout layout;
  std::vector<UniqueFd> files;
  memory::SlotKind slot_kind = memory::SlotKind::guest_memfd;
  if (retrieved) {
    for (const auto& ref : retrieved->state.memory) layout.regions.push_back(ref.spec);
    config.name = retrieved->state.metadata.vm_name;
    config.vcpus = static_cast<uint32_t>(retrieved->state.vcpus.size());
    files = std::move(retrieved->region_files);
    slot_kind = retrieved->guest_memfd_slot_kind;
  } else if (received) {
    layout = received->layout;
    files = std::move(received->region_files);
    slot_kind = received->guest_memfd_slot_kind;
  }
  if (config.vcpus == 0 || config.vcpus > kMaxVcpus)
    return fail(fresh ? fmt::format("--vcpus {} is out of range: use 1 to {}", config.vcpus, kMaxVcpus)
                      : fmt::format("{} vCPUs is out of range: use 1 to {}", config.vcpus, kMaxVcpus));
  std::optional<Kernel> kernel;
  if (fresh) {
    VMM_TRY_ASSIGN(planned, memory::MemoryLayout::plan(config.ram_size, config.shared_size, config.ram_backing));
    layout = std::move(planned);
    // The VMM reads the test guest's status structure at the start of the
    // shared region, whatever the guest: it must fit.
    constexpr uint64_t kMinShared =
        (sizeof(vmm_guest_shared) + memory::kPageSize - 1) / memory::kPageSize * memory::kPageSize;
    if (config.shared_size < kMinShared)
      return fail(fmt::format("--shared-memory {} is smaller than the test guest protocol's {} structure; use at "
                              "least {}", memory::format_size(config.shared_size), memory::format_size(kMinShared),
                              memory::format_size(kMinShared)));
    VMM_TRY_ASSIGN(read, read_kernel(config));
    kernel.emplace(std::move(read));
  } else {
    VMM_TRY(with_context(describe_memory(config, layout, files.size(), slot_kind),
                         retrieved ? "restore" : "prebuild"));
  }
  if (received && !received->cpuid.empty() && received->cpuid.size() != config.vcpus)
    return fail(fmt::format("got CPUID for {} vCPUs of {}", received->cpuid.size(), config.vcpus), EINVAL);

  // 2. The VM core: console, /dev/kvm, the VM, its memory.
  const auto started = steady_clock::now();
  VMM_TRY_ASSIGN(console, open_console(config));
  VMM_TRY_ASSIGN(host, open_host(config));
  std::optional<kvm::Vm> vm;
  if (retrieved && retrieved->vm_fd) {
    vm.emplace(std::move(retrieved->vm_fd), host.system.vcpu_mmap_size());
  } else {
    VMM_TRY_ASSIGN(created, host.system.create_vm());
    vm.emplace(std::move(created));
  }
  VMM_TRY(prepare_vm(*vm));
  std::optional<memory::GuestMemory> memory;
  if (fresh) {
    VMM_TRY_ASSIGN(created, memory::GuestMemory::create(*vm, layout));
    memory.emplace(std::move(created));
  } else {
    VMM_TRY_ASSIGN(attached, memory::GuestMemory::attach(*vm, layout, std::move(files), slot_kind));
    memory.emplace(std::move(attached));
  }
  uint32_t entry = 0;
  if (fresh) {
    VMM_TRY_ASSIGN(loaded, pvh::load(*memory, kernel->bytes, kernel->image, config.cmdline));
    entry = loaded;
  }
  if (received && received->prefault) {
    for (const auto& region : memory->regions()) {
      const auto begin = steady_clock::now();
      VMM_TRY(with_context(region->populate_page_tables(), "prefaulting memory region '" + region->spec().name + "'"));
      spdlog::debug("prefaulted the page tables of {} ({}) in {} us", region->spec().name,
                    memory::format_size(region->size()), duration_cast<microseconds>(steady_clock::now() - begin).count());
    }
  }
  VMM_TRY_ASSIGN(msrs, host.system.msrs_to_save());

  UniqueFd shutdown_event(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!shutdown_event) return fail_errno("cannot create the shutdown eventfd");
  std::unique_ptr<Machine> machine(new Machine(
      config, VmCore{std::move(host.system), host.caps, std::move(*vm), std::move(*memory), std::move(msrs)},
      std::move(shutdown_event)));

  // 3. The devices, on the core.
  Machine& m = *machine;
  VMM_TRY_ASSIGN(devices, DeviceSet::build(std::move(console), m.core_.vm, m.core_.memory, [&m](uint8_t code) {
    m.request_shutdown(fmt::format("the guest requested shutdown (exit code {})", code), true);
  }));
  m.devices_ = std::move(devices);

  // 4. The vCPUs: at the PVH entry for a new VM, else empty with their
  //    threads parked, so that load_state() runs each vCPU's ioctls on its
  //    own thread and resuming later is a message that cannot fail.
  uint64_t tsc_khz = 0;
  std::vector<kvm_cpuid_entry2> supported;
  if (fresh) {
    VMM_TRY_ASSIGN(cpuid, m.core_.system.supported_cpuid());
    supported = std::move(cpuid);
  }
  for (uint32_t id = 0; id < config.vcpus; ++id) {
    VMM_TRY_ASSIGN(vcpu, m.core_.vm.create_vcpu(id));
    if (fresh) {
      VMM_TRY(vcpu.set_cpuid(supported));
      VMM_TRY(set_pvh_entry_state(vcpu, entry));
      if (id != 0) {
        // PVH starts only the boot CPU; our test guest expects every vCPU at
        // the entry point, so the others are made runnable directly.
        VMM_TRY(vcpu.set_mp_state(kvm_mp_state{KVM_MP_STATE_RUNNABLE}));
      } else if (m.core_.caps.tsc_khz) {
        if (auto khz = vcpu.get_tsc_khz(); khz) tsc_khz = *khz;
      }
    } else if (received && id < received->cpuid.size() && !received->cpuid[id].empty()) {
      VMM_TRY(with_context(vcpu.preset_cpuid(received->cpuid[id]), fmt::format("presetting the CPUID of vCPU {}", id)));
    }
    m.vcpus_.add(std::move(vcpu), m);
  }
  if (fresh) {
    std::random_device entropy;
    const uint64_t seed = (uint64_t{entropy()} << 32) | entropy();
    m.devices_->guest().configure(config.vcpus, seed, tsc_khz);
    spdlog::debug("test guest seed 0x{:x}, TSC {} kHz", seed, tsc_khz);
    spdlog::debug("VM '{}' built in {} us: {} RAM in {}, {} shared memfd, {} vCPU(s), {}", config.name,
                  duration_cast<microseconds>(steady_clock::now() - started).count(),
                  memory::format_size(config.ram_size), memory::to_string(config.ram_backing),
                  memory::format_size(config.shared_size), config.vcpus, kernel->origin);
    return machine;
  }
  VMM_TRY(m.start(false));
  if (retrieved) VMM_TRY(m.load_state(retrieved->state));
  spdlog::debug("VM '{}' {} in {} us", config.name, retrieved ? "restored" : "prebuilt",
                duration_cast<microseconds>(steady_clock::now() - started).count());
  return machine;
}

}  // namespace vmm
