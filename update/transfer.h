// The transfer live update's two processes and the messages between them.
//
// The old vmm starts the new binary (`vmm transfer-target`) while the guest
// still runs, and sends it the memory files over a SOCK_SEQPACKET channel
// (SCM_RIGHTS). The new process builds its VM, memslots and vCPUs on the same
// pages and says "ready"; it fills its page tables for guest RAM in the
// background and says "prefaulted" when done (the old one waits for that
// within a budget that grows with RAM, and goes ahead without it after). Then
// the old one pauses the guest, saves its state into a memfd both share, and
// sends "state" with the handover record (handover_record.h), the control
// socket and the requesting client's connection. The new process loads the
// state and says "loaded". The old one alone decides: "go" (the new process
// resumes the guest and says "resumed") or "abort" (the new process exits
// without ever running the guest, and the old one resumes its own).
//
//   old -> new  hello      {name, vcpus, regions[], cpuid[], prefault}
//                                             fds: every region, the state memfd
//   new -> old  ready      {pid, prebuild_us} | error {message}
//   new -> old  prefaulted {us}               (optional, any time after ready)
//   old -> new  state      {}                 fds: [listening socket] [connection] record memfd
//   new -> old  loaded     {}                 | error {message}
//   old -> new  go {}      | abort {reason}
//   new -> old  resumed    {}
//
// "go" is the point of no return, and only the old process can say it: a
// "loaded" that arrives after the old one gave up meets an "abort" (or a
// closed channel), so exactly one process ever runs the guest. Before "go"
// the new process has not run the guest, answered a client or accepted a
// connection. After it the old one never touches the VM again.
//
// A body too large for one message (a VM with many vCPUs has a large CPUID;
// a client's request id may be long) travels in a memfd attached to the
// message, transparently to send() and receive().
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include <linux/kvm.h>

#include <nlohmann/json.hpp>

#include "base/result.h"
#include "base/unique_fd.h"
#include "memory/layout.h"
#include "migration/fd_channel.h"

namespace vmm::transfer {

// The message protocol above; both sides must speak the same.
inline constexpr uint32_t kProtocolVersion = 2;

// One message: its kind, a JSON body and the descriptors that came with it.
struct Message {
  std::string kind;
  nlohmann::json body;
  std::vector<UniqueFd> fds;
};

[[nodiscard]] Result<void> send(const migration::FdChannel& channel, const std::string& kind,
                                nlohmann::json body = nlohmann::json::object(), std::span<const FdRef> fds = {});
// The next message. An "error" message from the peer comes back as an
// error carrying its text; so does a closed channel.
// Messages of a kind in `skip` (e.g. a late "prefaulted") are read and dropped.
// `cancelled`, when given, is checked every 100 ms: waiting stops with ECANCELED.
[[nodiscard]] Result<Message> receive(const migration::FdChannel& channel, const std::string& expected_kind,
                                      std::optional<std::chrono::milliseconds> timeout = std::nullopt,
                                      std::span<const std::string_view> skip = {},
                                      const std::atomic<bool>* cancelled = nullptr);

[[nodiscard]] nlohmann::json layout_to_json(const memory::MemoryLayout& layout);
[[nodiscard]] Result<memory::MemoryLayout> layout_from_json(const nlohmann::json& regions);
// Each vCPU's CPUID entries, as hex strings of the raw kvm_cpuid_entry2s.
[[nodiscard]] nlohmann::json cpuid_to_json(const std::vector<std::vector<kvm_cpuid_entry2>>& cpuid);
[[nodiscard]] Result<std::vector<std::vector<kvm_cpuid_entry2>>> cpuid_from_json(const nlohmann::json& cpuid);

// The old process's handle on the new one.
class Target {
 public:
  // Starts `binary transfer-target --channel-fd N ARGS...` with the signal
  // mask cleared and only the channel inherited.
  [[nodiscard]] static Result<Target> spawn(const std::string& binary, const std::vector<std::string>& args);
  Target(Target&& other) noexcept;
  Target& operator=(Target&&) = delete;
  // Kills and reaps a target that was never told "go".
  ~Target();

  [[nodiscard]] const migration::FdChannel& channel() const { return channel_; }
  [[nodiscard]] pid_t pid() const { return pid_; }
  // After "go" the new process owns the VM: never kill it.
  void committed() { committed_ = true; }
  // SIGKILL and reap (unless committed); safe to call twice.
  void abort();

 private:
  Target(migration::FdChannel channel, pid_t pid) : channel_(std::move(channel)), pid_(pid) {}
  migration::FdChannel channel_;
  pid_t pid_ = -1;
  bool committed_ = false;
};

}  // namespace vmm::transfer
