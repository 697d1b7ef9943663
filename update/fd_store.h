// systemd's file descriptor store as a session backend: the files a session
// preserves go into the service's fd store (sd_pid_notify_with_fds,
// "FDSTORE=1", one FDNAME per file), and come back to the service's next
// start as $LISTEN_FDS / $LISTEN_FDNAMES. With FileDescriptorStorePreserve=yes
// the store outlives a stop or restart of the service, and systemd v261+
// carries its memfds across `systemctl kexec` through the kernel's LUO
// (docs/host-update.md). The vmm never opens /dev/liveupdate for it.
//
// A file is stored as "vmm.SESSION.TOKEN" (fd names are printable ASCII
// without ':', at most 255 bytes). Only memfds are accepted: a guest_memfd or
// a KVM VM fd would not cross a kexec in the fd store (systemd drops what LUO
// refuses, and the VM fd would belong to PID 1 after the retrieve).
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "base/result.h"
#include "base/unique_fd.h"
#include "luo/session.h"

namespace vmm {

// The service manager's side, as a few calls: the real libsystemd ones, or a
// test's.
struct FdStoreCalls {
  // sd_pid_notify_with_fds(0, 0, state, fds, n): < 0 is -errno, 0 means no
  // $NOTIFY_SOCKET.
  int (*notify_with_fds)(const char* state, const int* fds, unsigned n) = nullptr;
  // sd_notify_barrier(0, timeout_us): every message before it was processed.
  int (*barrier)(uint64_t timeout_us) = nullptr;
};
[[nodiscard]] FdStoreCalls real_fd_store_calls();

// What this process may store: $NOTIFY_SOCKET and $FDSTORE (the unit's
// FileDescriptorStoreMax=, which systemd v254+ passes to the service).
struct FdStoreEnvironment {
  bool notify_socket = false;
  unsigned max_fds = 0;  // 0: the unit has no fd store
};
[[nodiscard]] FdStoreEnvironment fd_store_environment();

// The fd name of a session's file, and back.
[[nodiscard]] Result<std::string> fd_store_name(std::string_view session, uint64_t token);
struct StoredFileName {
  std::string session;
  uint64_t token = 0;
};
[[nodiscard]] std::optional<StoredFileName> parse_fd_store_name(std::string_view name);

class FdStoreBackend final : public luo::Backend {
 public:
  // Outgoing sessions only: what the service may store.
  FdStoreBackend(FdStoreEnvironment environment, FdStoreCalls calls);
  // Incoming: the files systemd passed this process, by name (what
  // sd_listen_fds_with_names gives); names that are not a session's file
  // are closed with a warning.
  FdStoreBackend(FdStoreEnvironment environment, FdStoreCalls calls,
                 std::vector<std::pair<std::string, UniqueFd>> passed);
  // Takes $LISTEN_FDS / $LISTEN_FDNAMES (and unsets them).
  [[nodiscard]] static std::unique_ptr<FdStoreBackend> from_environment();

  [[nodiscard]] std::string_view kind() const override { return "systemd fd store"; }
  // Fails unless the service has an fd store; the files go into it only
  // when the session is stored (FdStoreSession::store).
  [[nodiscard]] Result<std::unique_ptr<luo::Session>> create_session(std::string_view name) override;
  // ENOENT when systemd passed no file of that session.
  [[nodiscard]] Result<std::unique_ptr<luo::Session>> retrieve_session(std::string_view name) override;
  // Whether systemd passed files of session `name`.
  [[nodiscard]] bool has_session(std::string_view name) const;

 private:
  FdStoreEnvironment environment_;
  FdStoreCalls calls_;
  std::map<std::string, std::map<uint64_t, UniqueFd>> incoming_;
};

// An outgoing session of the fd store backend.
class FdStoreSession final : public luo::Session {
 public:
  FdStoreSession(std::string name, FdStoreEnvironment environment, FdStoreCalls calls);
  // Incoming: the files systemd passed, by token.
  FdStoreSession(std::string name, FdStoreCalls calls, std::map<uint64_t, UniqueFd> files);

  [[nodiscard]] const std::string& name() const override { return name_; }
  [[nodiscard]] bool incoming() const override { return incoming_; }
  // Outgoing: keeps a duplicate of a memfd (anything else: ENOENT, as LUO
  // says for a file without a handler) until store().
  [[nodiscard]] Result<void> preserve(FdRef fd, uint64_t token) override;
  // Incoming: a duplicate of the file stored under `token`.
  [[nodiscard]] Result<UniqueFd> retrieve(uint64_t token) override;
  // Incoming: takes the session's files out of the store (FDSTOREREMOVE), so
  // that a later start does not restore this state again. Idempotent.
  [[nodiscard]] Result<void> finish() override;
  // Outgoing: hands every preserved file to the store and waits until
  // systemd has taken them (sd_notify_barrier, at most `timeout_us`).
  [[nodiscard]] Result<void> store(uint64_t timeout_us);

 private:
  std::string name_;
  bool incoming_ = false;
  bool finished_ = false;
  FdStoreEnvironment environment_;
  FdStoreCalls calls_;
  std::map<uint64_t, UniqueFd> files_;
};

}  // namespace vmm
