#include "vmm/control/client.h"

#include "base/fd_passing.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>

#include <array>
#include <cerrno>
#include <algorithm>
#include <cstring>
#include <utility>

namespace vmm::control {
namespace {

using nlohmann::json;

// Replies are small; this only stops a broken server from exhausting memory.
constexpr std::size_t kMaxReplyBytes = 64 * 1024 * 1024;

bool is_event(const json& message) { return message.is_object() && message.contains("event"); }

// object[key] when it is a string, else `fallback`: what a server sends is
// checked before it is read, so a malformed line cannot throw.
std::string string_member(const json& object, const char* key, std::string fallback) {
  if (!object.is_object()) return fallback;
  auto it = object.find(key);
  if (it == object.end() || !it->is_string()) return fallback;
  return it->get<std::string>();
}

std::string dump(const json& value) { return value.dump(-1, ' ', false, json::error_handler_t::replace); }

// Milliseconds left until `deadline`, for poll (0 once it has passed).
int remaining_ms(std::chrono::steady_clock::time_point deadline) {
  auto left = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
  if (left.count() <= 0) return 0;
  return static_cast<int>(std::min<long long>(left.count(), 1'000'000'000));
}

}  // namespace

Result<Client> Client::connect(const std::string& path, std::chrono::milliseconds timeout) {
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  if (path.empty() || path.size() >= sizeof(address.sun_path))
    return fail("control socket path '" + path + "' is empty or longer than " +
                std::to_string(sizeof(address.sun_path) - 1) + " bytes");
  std::memcpy(address.sun_path, path.data(), path.size());

  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!fd) return fail_errno("create socket");
  // Blocking connect: on a Unix socket it completes at once unless the
  // server's backlog is full, and then waiting is what we want.
  if (::connect(fd.get(), reinterpret_cast<const sockaddr*>(&address), sizeof address) < 0) {
    switch (errno) {
      case ENOENT:
        return fail_errno("no control socket at " + path + " (is the vmm running?)");
      case ECONNREFUSED:
        return fail_errno("nothing is listening on " + path + " (a stale socket?)");
      default:
        return fail_errno("connect to " + path);
    }
  }
  int flags = fcntl(fd.get(), F_GETFL);
  if (flags < 0 || fcntl(fd.get(), F_SETFL, flags | O_NONBLOCK) < 0) return fail_errno("make socket non-blocking");

  Client client(std::move(fd), timeout);
  VMM_TRY_ASSIGN(greeting, client.read_message(Clock::now() + timeout));
  if (greeting.is_object() && greeting.contains("error")) {
    std::string desc = string_member(greeting["error"], "desc", dump(greeting["error"]));
    return fail("the server at " + path + " refused the connection: " + desc);
  }
  if (!greeting.is_object() || !greeting.contains("QMP"))
    return fail("unexpected greeting from " + path + ": " + dump(greeting));
  client.greeting_ = std::move(greeting);
  return client;
}

Result<void> Client::negotiate() {
  VMM_TRY_ASSIGN(reply, request(json{{"execute", "qmp_capabilities"}}));
  if (!reply.is_object() || !reply.contains("return")) return fail("qmp_capabilities failed: " + dump(reply));
  return {};
}

Result<CommandResult> Client::execute(const std::string& command, const json& arguments) {
  json request_object{{"execute", command}};
  if (!arguments.is_null() && !arguments.empty()) request_object["arguments"] = arguments;
  VMM_TRY_ASSIGN(reply, request(request_object));
  if (!reply.is_object()) return fail("reply to " + command + " is not a JSON object: " + dump(reply));
  if (auto error = reply.find("error"); error != reply.end()) {
    CommandError command_error;
    command_error.error_class = string_member(*error, "class", kGenericError);
    command_error.desc = string_member(*error, "desc", dump(*error));
    return CommandResult(std::unexpect, std::move(command_error));
  }
  if (auto value = reply.find("return"); value != reply.end()) return CommandResult(std::move(*value));
  return fail("reply to " + command + " has neither 'return' nor 'error': " + dump(reply));
}

Result<json> Client::request(const json& request) {
  return request_line(request.dump(-1, ' ', false, json::error_handler_t::replace));
}

Result<json> Client::request_line(std::string_view line) {
  if (line.find('\n') != std::string_view::npos) return fail("a request must be a single line");
  std::string framed(line);
  framed.push_back('\n');
  VMM_TRY(send_raw(framed));
  return read_reply();
}

Result<void> Client::send_raw(std::string_view bytes) {
  const auto deadline = Clock::now() + timeout_;
  while (!bytes.empty()) {
    ssize_t sent = ::send(fd_.get(), bytes.data(), bytes.size(), MSG_NOSIGNAL);
    if (sent >= 0) {
      bytes.remove_prefix(static_cast<std::size_t>(sent));
      continue;
    }
    if (errno == EINTR) continue;
    if (errno != EAGAIN && errno != EWOULDBLOCK) return fail_errno("send to the control socket");
    pollfd writable{fd_.get(), POLLOUT, 0};
    int ready = ::poll(&writable, 1, remaining_ms(deadline));
    if (ready < 0 && errno != EINTR) return fail_errno("poll the control socket");
    if (ready == 0) return fail("timed out sending to the control socket");
  }
  return {};
}

Result<std::string> Client::read_line(Clock::time_point deadline) {
  std::size_t scanned = 0;
  while (true) {
    if (auto newline = input_.find('\n', scanned); newline != std::string::npos) {
      std::string line = input_.substr(0, newline);
      input_.erase(0, newline + 1);
      if (line.ends_with('\r')) line.pop_back();
      return line;
    }
    scanned = input_.size();
    if (input_.size() > kMaxReplyBytes) return fail("reply from the control socket is too long");
    std::array<char, 16 * 1024> chunk{};
    // recvmsg, not recv: descriptors a reply carries (the LUO agent's) would
    // otherwise be closed by the kernel unseen.
    auto received = receive_with_fds(fd_.ref(), chunk, received_fds_);
    if (received && *received > 0) {
      input_.append(chunk.data(), *received);
      continue;
    }
    if (received) return fail("the server closed the connection");
    const int code = received.error().code;
    if (code == EINTR) continue;
    if (code != EAGAIN && code != EWOULDBLOCK)
      return std::unexpected(received.error().with_context("read from the control socket"));
    pollfd readable{fd_.get(), POLLIN, 0};
    int ready = ::poll(&readable, 1, remaining_ms(deadline));
    if (ready < 0 && errno != EINTR) return fail_errno("poll the control socket");
    if (ready == 0) return fail("timed out waiting for the server");
  }
}

Result<json> Client::read_message(Clock::time_point deadline) {
  while (true) {
    VMM_TRY_ASSIGN(line, read_line(deadline));
    if (line.empty()) continue;
    json message = json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (message.is_discarded()) return fail("the server sent a line that is not JSON: " + line);
    return message;
  }
}

Result<json> Client::read_message() { return read_message(Clock::now() + timeout_); }

Result<json> Client::read_reply() {
  const auto deadline = Clock::now() + timeout_;
  while (true) {
    VMM_TRY_ASSIGN(message, read_message(deadline));
    if (!is_event(message)) return message;
    events_.push_back(std::move(message));
  }
}

Result<json> Client::wait_event(const std::string& name, std::chrono::milliseconds timeout) {
  auto matches = [&](const json& event) { return name.empty() || string_member(event, "event", "") == name; };
  for (auto it = events_.begin(); it != events_.end(); ++it) {
    if (matches(*it)) {
      json event = std::move(*it);
      events_.erase(it);
      return event;
    }
  }
  const auto deadline = Clock::now() + timeout;
  while (true) {
    auto message = read_message(deadline);
    if (!message) {
      if (Clock::now() >= deadline)
        return fail("timed out waiting for event " + (name.empty() ? std::string("(any)") : name));
      return std::unexpected(message.error());
    }
    if (is_event(*message) && matches(*message)) return std::move(*message);
    // Other events are kept; a stray reply has no one waiting for it.
    if (is_event(*message)) events_.push_back(std::move(*message));
  }
}

std::vector<json> Client::take_events() { return std::exchange(events_, {}); }

std::vector<UniqueFd> Client::take_received_fds() { return std::exchange(received_fds_, {}); }

}  // namespace vmm::control
