// The seam between the control socket (QMP framing, negotiation, clients) and
// the VMM that carries out commands.
#pragma once

#include <nlohmann/json.hpp>
#include <sys/types.h>

#include <atomic>
#include <expected>
#include <optional>
#include <stop_token>
#include <string>
#include <vector>

#include "base/unique_fd.h"

namespace vmm::control {

// QMP error classes.
inline constexpr const char* kGenericError = "GenericError";
inline constexpr const char* kCommandNotFound = "CommandNotFound";

struct CommandError {
  std::string error_class = kGenericError;
  std::string desc;
};

using CommandResult = std::expected<nlohmann::json, CommandError>;

// Who asked: the client's connection and the request's "id". A command that
// outlives this process (live-update execs a new vmm) hands the connection on
// so the new process can send the reply.
struct CommandContext {
  int connection_fd = -1;
  std::optional<nlohmann::json> id;
  // Set by a command that handed the connection to another process (a
  // transfer live update): the server then neither replies on it nor reads
  // from it again, and closes its own copy.
  std::atomic<bool>* handed_over = nullptr;
  // Requested when the server stops (Server::stop(), detach(), the
  // destructor): a command that waits (guest-verify waits up to an hour for
  // the guest) must give up then and return an error saying the vmm is
  // shutting down, because stop() waits for every running command to return.
  // Default-constructed (never requested) outside a server.
  std::stop_token stop;
  // The client's process (SO_PEERCRED when it connected); 0 when unknown.
  pid_t peer_pid = 0;
  // Descriptors to hand the client with a successful reply (SCM_RIGHTS on
  // the reply line's first byte; the LUO agent's session fds). Set by the
  // server for each command; the server closes its copies once sent, and
  // drops them unsent with an error reply. Null outside a server.
  std::vector<UniqueFd>* reply_fds = nullptr;
};

class CommandHandler {
 public:
  virtual ~CommandHandler() = default;
  // Runs one command (never "qmp_capabilities", which the server handles).
  // `arguments` is always a JSON object (empty when the client sent none).
  // Called from a client's thread; may block (guest-verify waits for the
  // guest), but only until context.stop is requested; may be called
  // concurrently from several clients.
  // Must not call Server::stop() or detach(): they join every client thread,
  // this one included (signal another thread instead); stop_accepting() and
  // resume_accepting() are fine.
  // Unknown commands return kCommandNotFound; bad arguments a GenericError
  // whose desc names the argument and the expected type.
  virtual CommandResult execute(const std::string& command, const nlohmann::json& arguments) = 0;
  // With the caller's context; by default the context is not needed.
  virtual CommandResult execute(const std::string& command, const nlohmann::json& arguments,
                                const CommandContext& context) {
    (void)context;
    return execute(command, arguments);
  }
};

}  // namespace vmm::control
