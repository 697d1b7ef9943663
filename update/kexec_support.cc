#include "update/kexec_support.h"

#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstring>
#include <atomic>
#include <chrono>
#include <mutex>
#include <optional>
#include <utility>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "kvm/system.h"
#include "kvm/uapi.h"
#include "luo/kernel_backend.h"
#include "update/restore.h"
#include "update/session_source.h"

namespace vmm {
namespace {

using nlohmann::json;

constexpr uint64_t kProbeGuestMemfdBytes = 2u << 20;

LuoFileSupport try_preserve(luo::Session& session, FdRef fd, uint64_t token) {
  auto preserved = session.preserve(fd, token);
  if (preserved) return {true, 0, {}};
  return {false, preserved.error().code, preserved.error().describe()};
}

json file_json(const LuoFileSupport& file) {
  json out = {{"preservable", file.preservable}};
  if (!file.preservable) out["refusal"] = file.refusal;
  return out;
}

}  // namespace

json KexecSupport::to_json() const {
  json out = {{"liveupdate", liveupdate}, {"session_source", session_source}};
  if (!liveupdate) {
    out["unavailable"] = unavailable;
    return out;
  }
  out["memfd"] = file_json(memfd);
  out["vm_fd"] = file_json(vm_fd);
  out["guest_memfd"] = file_json(guest_memfd);
  // What a management tool decides on: which RAM backings survive a kexec.
  json backings = json::array();
  if (memfd.preservable) backings.push_back("memfd");
  if (guest_memfd.preservable && vm_fd.preservable) backings.push_back("guest_memfd");
  out["memory_backings"] = backings;
  return out;
}

Result<KexecSupport> probe_kexec_support(const std::string& kvm_device, std::chrono::milliseconds busy_wait,
                                         const std::atomic<bool>* cancelled) {
  return probe_kexec_support(session_source_options(), kvm_device, busy_wait, cancelled);
}

Result<KexecSupport> probe_kexec_support(const SessionSourceOptions& options, const std::string& kvm_device,
                                         std::chrono::milliseconds busy_wait, const std::atomic<bool>* cancelled) {
  KexecSupport support;
  const auto unavailable = [&] {
    support.unavailable = fmt::format("{} not found: this kernel lacks CONFIG_LIVEUPDATE or was booted without "
                                      "'kho=on liveupdate=on'",
                                      options.device);
    return support;
  };
  // An agent holds the device for us, wherever it is; without one the
  // device must be here.
  struct stat st {};
  const bool device_present = ::stat(options.device.c_str(), &st) == 0;
  if (!device_present && options.agent_socket.empty()) return unavailable();
  auto source = open_session_source(options, cancelled, busy_wait);
  if (!source && !device_present && source.error().code == ENOENT && !options.agent_required) return unavailable();
  if (!source) return std::unexpected(source.error());
  support.liveupdate = true;
  support.session_source = source->kind;
  // The pid keeps two vmms apart, the count two probes of one vmm (a
  // query-live-update while an update's prepare probes); the session goes
  // when `session` does, and with it everything preserved in it (an agent's
  // session is released then).
  static std::atomic<uint64_t> probes{0};
  VMM_TRY_ASSIGN(session, with_context(source->backend->create_session(
                                           fmt::format("vmm-probe-{}-{}", ::getpid(), probes.fetch_add(1))),
                                       "probing what this kernel's LUO preserves"));

  UniqueFd memfd(::memfd_create("vmm-luo-probe", MFD_CLOEXEC));
  if (!memfd || ::ftruncate(memfd.get(), 4096) != 0) return fail_errno("probing LUO: cannot create a memfd");
  support.memfd = try_preserve(*session, memfd.ref(), 1);

  VMM_TRY_ASSIGN(kvm, with_context(kvm::System::open(kvm_device), "probing LUO"));
  VMM_TRY_ASSIGN(vm, with_context(kvm.create_vm(), "probing LUO: a throwaway VM"));
  support.vm_fd = try_preserve(*session, vm.fd(), 2);
  auto guest_memfd = vm.create_guest_memfd(kProbeGuestMemfdBytes,
                                           kvm::uapi::kGuestMemfdFlagMmap | kvm::uapi::kGuestMemfdFlagInitShared);
  if (guest_memfd) {
    support.guest_memfd = try_preserve(*session, guest_memfd->fd(), 3);
  } else {
    support.guest_memfd = {false, guest_memfd.error().code,
                           "this host's KVM cannot create one: " + guest_memfd.error().describe()};
  }
  spdlog::info("luo: this kernel preserves memfd: {}, KVM VM fd: {}, guest_memfd: {}", support.memfd.preservable,
               support.vm_fd.preservable, support.guest_memfd.preservable);
  return support;
}

Result<KexecSupport> kexec_support(const std::string& kvm_device, std::chrono::milliseconds busy_wait,
                                   const std::atomic<bool>* cancelled) {
  static std::mutex mutex;
  static std::optional<KexecSupport> known;
  // Which source a kexec would take (the agent, or the device) is asked
  // again at most every 2 s: a coordinator polls query-live-update of every
  // VM many times a second, and each ask is a connection to the agent.
  static std::optional<std::pair<std::chrono::steady_clock::time_point, std::string>> source_asked;
  std::optional<KexecSupport> cached;
  bool ask_source = false;
  {
    std::lock_guard lock(mutex);
    cached = known;
    const auto now = std::chrono::steady_clock::now();
    ask_source = !source_asked || now - source_asked->first > std::chrono::seconds(2);
    if (cached && !ask_source) cached->session_source = source_asked->second;
  }
  if (cached) {
    // Asked outside the lock: the connection may take its time.
    if (ask_source) {
      cached->session_source = probe_session_source_kind(session_source_options());
      std::lock_guard lock(mutex);
      source_asked = {std::chrono::steady_clock::now(), cached->session_source};
    }
    return *cached;
  }
  // Probed outside the lock: it may wait for the device.
  VMM_TRY_ASSIGN(probed, probe_kexec_support(kvm_device, busy_wait, cancelled));
  std::lock_guard lock(mutex);
  if (probed.liveupdate) known = probed;
  return probed;
}

namespace {

// A refusal in a few words: the kernel's own text repeats the whole story.
std::string briefly(const LuoFileSupport& file) {
  if (file.preservable) return "preservable";
  if (file.error == ENOENT) return "no LUO handler";
  return file.error ? std::strerror(file.error) : file.refusal;
}

}  // namespace

Result<void> check_kexec_support(const KexecSupport& support, const Machine& machine) {
  if (!support.liveupdate) return fail(support.unavailable + "; a kexec now would lose the guest; use --mode exec", ENOENT);
  for (const auto& region : machine.memory().regions()) {
    const auto& spec = region->spec();
    if (spec.backing == memory::Backing::guest_memfd) {
      if (!support.guest_memfd.preservable || !support.vm_fd.preservable)
        return fail(fmt::format("memory region '{}' is a guest_memfd, and this kernel cannot carry a guest_memfd "
                                "and its VM across a kexec (guest_memfd: {}; KVM VM fd: {}; mainline Linux 7.x "
                                "lacks the KVM LUO series): its contents would be lost. Start the VM with "
                                "--memory-backing memfd, or boot a kernel with CONFIG_LIVEUPDATE_GUEST_MEMFD",
                                spec.name, briefly(support.guest_memfd), briefly(support.vm_fd)),
                    EOPNOTSUPP);
    } else if (!support.memfd.preservable) {
      return fail(fmt::format("memory region '{}' is a memfd, and this kernel cannot preserve a memfd ({}): "
                              "boot a kernel with CONFIG_LIVEUPDATE_MEMFD",
                              spec.name, briefly(support.memfd)),
                  EOPNOTSUPP);
    }
  }
  return {};
}

}  // namespace vmm
