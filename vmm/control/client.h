// A small synchronous client for the control socket, for vmmctl and tests:
// connect, negotiate, send a command, read its reply. Events that arrive
// while waiting for a reply are kept (take_events()) rather than mistaken for it.
#pragma once

#include <nlohmann/json.hpp>

#include <chrono>
#include <string>
#include <string_view>
#include <vector>

#include "base/result.h"
#include "base/unique_fd.h"
#include "vmm/control/handler.h"

namespace vmm::control {

class Client {
 public:
  static constexpr std::chrono::milliseconds kDefaultTimeout{10'000};

  // Connects and reads the greeting. Fails if the server turns the
  // connection away (e.g. too many clients) or says nothing within `timeout`.
  [[nodiscard]] static Result<Client> connect(const std::string& path,
                                              std::chrono::milliseconds timeout = kDefaultTimeout);

  Client(Client&&) noexcept = default;
  Client& operator=(Client&&) noexcept = default;

  // The {"QMP": {...}} greeting.
  [[nodiscard]] const nlohmann::json& greeting() const { return greeting_; }

  // Sends qmp_capabilities; required before any other command.
  [[nodiscard]] Result<void> negotiate();

  // Runs a command. The outer Result fails on transport problems (closed
  // connection, timeout, unparsable reply); the inner one is the server's
  // {"return": ...} or {"error": {...}}.
  [[nodiscard]] Result<CommandResult> execute(const std::string& command,
                                              const nlohmann::json& arguments = nlohmann::json::object());

  // Sends `request` as one line and returns the whole reply object.
  [[nodiscard]] Result<nlohmann::json> request(const nlohmann::json& request);
  // Sends `line` verbatim (a "\n" is appended) and returns the whole reply.
  [[nodiscard]] Result<nlohmann::json> request_line(std::string_view line);

  // Sends raw bytes, exactly as given.
  [[nodiscard]] Result<void> send_raw(std::string_view bytes);
  // The next message from the server, event or reply, parsed.
  [[nodiscard]] Result<nlohmann::json> read_message();
  // The next reply; events met on the way are kept for take_events().
  [[nodiscard]] Result<nlohmann::json> read_reply();
  // Waits for an event named `name` (any event when empty), first looking
  // among those already kept; returns it and forgets it.
  [[nodiscard]] Result<nlohmann::json> wait_event(const std::string& name, std::chrono::milliseconds timeout);

  // Events received so far and not yet taken, oldest first.
  [[nodiscard]] std::vector<nlohmann::json> take_events();

  // Descriptors the server sent (SCM_RIGHTS) and not yet taken, in the order
  // they came. A server attaches them to the reply that names them, so after
  // that reply they are all here.
  [[nodiscard]] std::vector<UniqueFd> take_received_fds();

  // How long each read or write may wait.
  void set_timeout(std::chrono::milliseconds timeout) { timeout_ = timeout; }
  [[nodiscard]] FdRef fd() const { return fd_.ref(); }

 private:
  using Clock = std::chrono::steady_clock;
  Client(UniqueFd fd, std::chrono::milliseconds timeout) : fd_(std::move(fd)), timeout_(timeout) {}
  [[nodiscard]] Result<std::string> read_line(Clock::time_point deadline);
  [[nodiscard]] Result<nlohmann::json> read_message(Clock::time_point deadline);

  UniqueFd fd_;
  std::chrono::milliseconds timeout_;
  std::string input_;
  nlohmann::json greeting_;
  std::vector<nlohmann::json> events_;
  std::vector<UniqueFd> received_fds_;
};

}  // namespace vmm::control
