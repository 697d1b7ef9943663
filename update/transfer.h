// The transfer live update's two processes and the messages between them.
//
// The old vmm starts the new binary (`vmm transfer-target`) while the guest
// still runs, and sends it the memory files over a SOCK_SEQPACKET channel
// (SCM_RIGHTS). The new process builds its VM, memslots and vCPUs on the same
// pages and says "ready". Only then does the old one pause the guest, save
// its state into a memfd both share, and send "state" with the control
// socket and the requesting client's connection. The new process loads the
// state, says "commit", resumes the guest and says "resumed"; only then does
// the old one tear its VM down (at idle priority) and exit.
//
//   old -> new  hello   {name, vcpus, regions[], cpuid[], prefault}
//                                                   fds: every region, state memfd
//   new -> old  ready   {pid, prebuild_us}          | error {message}
//   old -> new  state   {bytes, record, reply_id?, socket, connection, fault}
//                                                   fds: [listening socket] [connection]
//   new -> old  commit  {}                          | error {message}
//   new -> old  resumed {}
//
// "commit" is the point of no return. Before it the new process has not run
// the guest, answered a client or accepted a connection, so the old one can
// resume its own VM on any failure, including the new process dying (the
// channel reads EOF). After it the old one never touches the VM again.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <span>
#include <string>
#include <vector>

#include <linux/kvm.h>

#include <nlohmann/json.hpp>

#include "base/result.h"
#include "memory/layout.h"
#include "migration/fd_channel.h"

namespace vmm::transfer {

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
[[nodiscard]] Result<Message> receive(const migration::FdChannel& channel, const std::string& expected_kind,
                                      std::optional<std::chrono::milliseconds> timeout = std::nullopt);

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
  // Kills and reaps a target that never committed.
  ~Target();

  [[nodiscard]] const migration::FdChannel& channel() const { return channel_; }
  [[nodiscard]] pid_t pid() const { return pid_; }
  // After "commit" the new process owns the VM: never kill it.
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
