#include "update/restore.h"

#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <thread>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "base/memfd.h"
#include "kvm/vm.h"
#include "migration/state_blob.h"

namespace vmm {
namespace {

constexpr uint32_t kMsrTsc = 0x10;
// Far above any state this vmm writes (tens of KiB per vCPU).
constexpr size_t kMaxStateBytes = 256u << 20;

}  // namespace

Result<RetrievedVm> retrieve_vm(luo::Session& session, Fault fault) {
  RetrievedVm retrieved;
  // The state first: a corrupt one fails before anything else is retrieved
  // (a retrieved KVM VM is usable only by the process that retrieved it, so
  // a second `vmm restore` could not use it after this one gave up).
  VMM_TRY_ASSIGN(state_fd, with_context(session.retrieve(kStateToken), "retrieving the saved state (token 2)"));
  VMM_TRY_ASSIGN(blob, read_whole_file(state_fd.ref(), kMaxStateBytes, "the state memfd"));
  if (fault == Fault::corrupt_state) {
    // The private copy only: the memfd keeps the good blob for a retry.
    auto header = migration::read_header(blob);
    const size_t at = header ? header->header_size + header->payload_size / 2 : blob.size() / 2;
    if (at < blob.size()) blob[at] ^= 0x5a;
  }
  VMM_TRY_ASSIGN(state, with_context(migration::decode(blob), "the saved state is unusable"));
  const uint64_t vm_token = state.metadata.vm_luo_token;
  if (vm_token != 0 && vm_token != kVmToken)
    return fail(fmt::format("the saved state names VM token {}, but this vmm puts the VM under token {}", vm_token,
                            kVmToken), EINVAL);
  // Then the VM, before its guest_memfds (which are re-bound to it as they
  // are retrieved). Token 0: the kernel could not carry the VM fd (no KVM
  // LUO handler); the VM is built anew around the memfds.
  bool vm_usable = true;
  if (vm_token != 0) {
    VMM_TRY_ASSIGN(vm_fd, with_context(session.retrieve(vm_token), "retrieving the VM (token 1)"));
    // A VM an earlier `vmm restore` retrieved and then gave up is that
    // process's: LUO hands the same VM out again, and KVM refuses it here.
    VMM_TRY_ASSIGN(usable, with_context(kvm::Vm::usable_by_this_process(vm_fd.ref()), "checking the retrieved VM"));
    vm_usable = usable;
    if (vm_usable) retrieved.vm_fd = std::move(vm_fd);
  }
  if (!vm_usable) {
    for (const auto& ref : state.memory)
      if (ref.spec.backing == memory::Backing::guest_memfd)
        return fail(fmt::format("the session's VM was retrieved by an earlier `vmm restore` that gave up, and KVM "
                                "lets no other process use that VM; memory region '{}' is a guest_memfd, which binds "
                                "only to it, so this VM cannot be rebuilt here. Its memory stays in the session "
                                "(`vmm restore --discard` drops it)", ref.spec.name), EIO);
    spdlog::warn("vmm restore: the session's VM was retrieved by an earlier `vmm restore` that gave up, and KVM lets "
                 "no other process use it: building a new VM around the same memfds (KVM's VM-wide state comes "
                 "from the saved state)");
  }

  bool first_region = true;
  for (const auto& ref : state.memory) {
    uint64_t token = ref.luo_token;
    uint64_t region_vm_token = ref.vm_token;
    if (first_region && fault == Fault::wrong_token) token += 0x1000;
    if (first_region && fault == Fault::wrong_vm_token && ref.spec.backing == memory::Backing::guest_memfd)
      region_vm_token += 1;
    first_region = false;
    if (ref.spec.backing == memory::Backing::guest_memfd && vm_token == 0)
      return fail(fmt::format("memory region '{}' is a guest_memfd, but the session holds no VM to bind it to "
                              "(a guest_memfd binds only to the VM it was preserved with)", ref.spec.name), EINVAL);
    if (ref.spec.backing == memory::Backing::guest_memfd && region_vm_token != vm_token)
      return fail(fmt::format("memory region '{}' is a guest_memfd of the VM with token {}, but this "
                              "session's VM has token {}: refusing to bind it to the wrong VM",
                              ref.spec.name, region_vm_token, vm_token), EINVAL);
    VMM_TRY_ASSIGN(file, with_context(session.retrieve(token),
                                      fmt::format("retrieving memory region '{}' (token {})", ref.spec.name, token)));
    struct stat st{};
    if (::fstat(file.get(), &st) != 0) return fail_errno("cannot stat memory region '" + ref.spec.name + "'");
    if (static_cast<uint64_t>(st.st_size) != ref.spec.size)
      return fail(fmt::format("memory region '{}' is {} bytes but the saved state says {}", ref.spec.name,
                              st.st_size, ref.spec.size), EINVAL);
    retrieved.region_files.push_back(std::move(file));
  }
  retrieved.state = std::move(state);
  return retrieved;
}

Result<std::unique_ptr<luo::KernelBackend>> open_liveupdate(const std::atomic<bool>* cancelled,
                                                            std::chrono::milliseconds busy_wait,
                                                            const std::string& device, luo::KernelSyscalls syscalls) {
  using namespace std::chrono;
  const auto deadline = steady_clock::now() + busy_wait;
  while (true) {
    auto backend = luo::KernelBackend::open(device, syscalls);
    if (backend || backend.error().code != EBUSY || steady_clock::now() >= deadline || (cancelled && *cancelled))
      return backend;
    std::this_thread::sleep_for(milliseconds(50));
  }
}

uint64_t guest_tsc(const migration::SavedState& state) {
  if (state.vcpus.empty()) return 0;
  for (const auto& msr : state.vcpus.front().msrs)
    if (msr.index == kMsrTsc) return msr.data;
  return 0;
}

void advance_clocks(migration::SavedState& state, int64_t elapsed_ns) {
  if (elapsed_ns <= 0) return;
  for (auto& vcpu : state.vcpus) {
    const uint64_t ticks = static_cast<uint64_t>(
        static_cast<__int128>(elapsed_ns) * static_cast<__int128>(vcpu.tsc_khz) / 1'000'000);
    for (auto& msr : vcpu.msrs)
      if (msr.index == kMsrTsc) msr.data += ticks;
  }
  state.vm.clock.clock += static_cast<uint64_t>(elapsed_ns);
}

}  // namespace vmm
