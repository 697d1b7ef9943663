// What this kernel's Live Update Orchestrator can carry across a kexec.
//
// Mainline Linux 7.x preserves memfds only: a KVM VM fd and a guest_memfd
// have no LUO handler there (the KVM LUO series is not merged), and that
// series adds no uAPI to ask. The only answer is a PRESERVE_FD that does or
// does not fail with ENOENT, so the probe tries one of each kind of file with
// throwaway files in a throwaway session, which it then drops: nothing of the
// running VM is touched, and nothing stays preserved.
#pragma once

#include <atomic>
#include <string>

#include <nlohmann/json.hpp>

#include "base/result.h"
#include "machine/machine.h"
#include "update/session_source.h"

namespace vmm {

struct LuoFileSupport {
  bool preservable = false;
  int error = 0;        // the refused PRESERVE_FD's errno (ENOENT: no handler)
  std::string refusal;  // why not (the kernel's error), when not
};

struct KexecSupport {
  bool liveupdate = false;  // /dev/liveupdate exists and opened
  std::string unavailable;  // why there is no kexec live update at all
  LuoFileSupport memfd, vm_fd, guest_memfd;
  // Where the sessions come from: "agent" (the LUO session agent) or
  // "device" (/dev/liveupdate, opened by this vmm); update/session_source.h.
  std::string session_source = "device";

  [[nodiscard]] nlohmann::json to_json() const;
};

// Probes the running kernel, through the LUO agent when one answers, else
// by opening /dev/liveupdate only for the probe (it is single-open), waiting
// up to `busy_wait` while another vmm holds it. An
// absent device is a result (liveupdate false), not an error; a device busy
// past the wait, or a probe that could not run, is an error.
[[nodiscard]] Result<KexecSupport> probe_kexec_support(const std::string& kvm_device,
                                                       std::chrono::milliseconds busy_wait,
                                                       const std::atomic<bool>* cancelled = nullptr);
// The same with the session source given (tests: a fake kernel behind it).
[[nodiscard]] Result<KexecSupport> probe_kexec_support(const SessionSourceOptions& options,
                                                       const std::string& kvm_device,
                                                       std::chrono::milliseconds busy_wait,
                                                       const std::atomic<bool>* cancelled = nullptr);

// The probe, run once per process: the kernel does not change under a
// running vmm. Failed probes are not kept. The session source can change
// (an agent started or stopped): it is looked at again on every call.
[[nodiscard]] Result<KexecSupport> kexec_support(const std::string& kvm_device, std::chrono::milliseconds busy_wait,
                                                 const std::atomic<bool>* cancelled = nullptr);

// Whether `machine` can go through a kexec on this kernel, before anything is
// paused or preserved: every memory region's kind must be preservable, and a
// guest_memfd also needs its VM fd. The error names the cause and the fix.
[[nodiscard]] Result<void> check_kexec_support(const KexecSupport& support, const Machine& machine);

}  // namespace vmm
