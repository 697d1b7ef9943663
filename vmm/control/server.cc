#include "vmm/control/server.h"

#include "base/fd_passing.h"

#include <fcntl.h>
#include <poll.h>
#include <spdlog/spdlog.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <exception>
#include <optional>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#ifndef VMM_VERSION_MAJOR
#define VMM_VERSION_MAJOR 0
#define VMM_VERSION_MINOR 0
#define VMM_VERSION_MICRO 0
#endif

namespace vmm::control {
namespace {

using nlohmann::json;

constexpr std::size_t kReadChunkBytes = 16 * 1024;
// Stop reading requests while this much output is unread, so a client that
// pipelines commands without reading replies is slowed down, not dropped.
constexpr std::size_t kPauseReadingAboveBytes = 256 * 1024;

// Serializes a message as one line. Handler results might carry invalid UTF-8
// (e.g. a file name); replace it rather than throw on the client's thread.
std::string to_line(const json& message) {
  std::string line = message.dump(-1, ' ', false, json::error_handler_t::replace);
  line.push_back('\n');
  return line;
}

json error_reply(std::string_view error_class, std::string_view desc) {
  return json{{"error", {{"class", error_class}, {"desc", desc}}}};
}

// The longest error description taken from a parser message: it quotes the
// last token read, which can be a string as long as the line.
constexpr std::size_t kMaxParseErrorBytes = 200;

// nlohmann's what() is "[json.exception.parse_error.101] parse error at line
// 1, column 5: syntax error ..." (or "[json.exception.out_of_range.406]
// number overflow parsing '1e400'"); keep the part after the bracketed tag.
std::string describe_parse_error(const json::exception& error) {
  std::string_view what = error.what();
  if (auto tag_end = what.find("] "); tag_end != std::string_view::npos) what.remove_prefix(tag_end + 2);
  std::string desc = "JSON parse error";
  if (what.starts_with("parse error")) {
    what.remove_prefix(std::string_view("parse error").size());
  } else {
    desc += ": ";
  }
  if (what.size() > kMaxParseErrorBytes) {
    desc.append(what.substr(0, kMaxParseErrorBytes));
    desc += "... (truncated)";
  } else {
    desc.append(what);
  }
  return desc;
}

// Why `line` nests arrays and objects deeper than `max_depth`, if it does.
// A bracket counter that skips strings (and the escapes in them): exact for
// valid JSON, and whatever it says about invalid JSON, the parser then
// refuses that line anyway. It runs before parsing, so neither the parser nor
// any later copy, comparison or dump of the value recurses deeper.
std::optional<std::string> nesting_error(std::string_view line, std::size_t max_depth) {
  std::size_t depth = 0;
  bool in_string = false;
  for (std::size_t i = 0; i < line.size(); ++i) {
    const char c = line[i];
    if (in_string) {
      if (c == '\\') ++i;
      else if (c == '"') in_string = false;
      continue;
    }
    switch (c) {
      case '"': in_string = true; break;
      case '[':
      case '{':
        if (++depth > max_depth)
          return "request nests arrays and objects deeper than " + std::to_string(max_depth) +
                 " levels (at byte " + std::to_string(i) + ")";
        break;
      case ']':
      case '}':
        if (depth > 0) --depth;
        break;
      default: break;
    }
  }
  return std::nullopt;
}

bool is_blank(std::string_view line) {
  return line.find_first_not_of(" \t\r") == std::string_view::npos;
}

json wall_clock_timestamp() {
  timespec now{};
  clock_gettime(CLOCK_REALTIME, &now);
  return json{{"seconds", static_cast<std::int64_t>(now.tv_sec)},
              {"microseconds", static_cast<std::int64_t>(now.tv_nsec / 1000)}};
}

std::string directory_of(const std::string& path) {
  auto slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

Result<UniqueFd> make_eventfd(const char* what) {
  UniqueFd fd(eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK));
  if (!fd) return fail_errno(std::string("create ") + what + " eventfd");
  return fd;
}

void signal_eventfd(FdRef fd) {
  std::uint64_t one = 1;
  // Only fails if the counter would overflow, which leaves it readable anyway.
  [[maybe_unused]] auto written = ::write(fd.get(), &one, sizeof one);
}

void drain_eventfd(FdRef fd) {
  std::uint64_t count = 0;
  [[maybe_unused]] auto n = ::read(fd.get(), &count, sizeof count);
}

Result<void> set_listening_flags(FdRef fd) {
  // Non-blocking so a connection that vanishes between poll and accept
  // cannot wedge the accept thread.
  int status_flags = fcntl(fd.get(), F_GETFL);
  if (status_flags < 0 || fcntl(fd.get(), F_SETFL, status_flags | O_NONBLOCK) < 0)
    return fail_errno("make the control socket non-blocking");
  int fd_flags = fcntl(fd.get(), F_GETFD);
  if (fd_flags < 0 || fcntl(fd.get(), F_SETFD, fd_flags | FD_CLOEXEC) < 0)
    return fail_errno("set FD_CLOEXEC on the control socket");
  return {};
}

Result<sockaddr_un> unix_address(const std::string& path) {
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  if (path.empty()) return fail("control socket path is empty");
  if (path.find('\0') != std::string::npos) return fail("control socket path contains a NUL byte");
  if (path.size() >= sizeof(address.sun_path))
    return fail("control socket path " + path + " is too long (" + std::to_string(path.size()) +
                " bytes; a Unix socket path holds at most " +
                std::to_string(sizeof(address.sun_path) - 1) + ")");
  std::memcpy(address.sun_path, path.data(), path.size());
  return address;
}

// Why the socket file cannot be created at `path`, as bind(2) said (`code`).
Error bind_failure(const std::string& path, int code) {
  switch (code) {
    case EADDRINUSE:
      return Error{code, "control socket path " + path + " already exists (is another vmm running? remove it if stale)"};
    case ENOENT:
    case ENOTDIR:
      return Error{code, "control socket directory " + directory_of(path) + " does not exist (create it first)"};
    case EACCES:
      return Error{code, "cannot create control socket " + path + ": no write permission on " + directory_of(path)};
    default:
      return Error{code, "bind control socket " + path};
  }
}

// Creates and binds the socket file with mode 0600. The mode is set on the
// socket before bind (Linux gives the file the socket inode's mode, less the
// umask), so there is no moment when the path is accessible to others, and
// we never touch the process-wide umask.
Result<UniqueFd> bind_socket(const std::string& path, const sockaddr_un& address) {
  UniqueFd fd(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  if (!fd) return fail_errno("create control socket");
  if (fchmod(fd.get(), 0600) < 0) return fail_errno("set mode 0600 on control socket");
  if (::bind(fd.get(), reinterpret_cast<const sockaddr*>(&address), sizeof address) < 0)
    return std::unexpected(bind_failure(path, errno));
  return fd;
}

}  // namespace

json program_version() {
  return json{{"vmm", {{"major", VMM_VERSION_MAJOR}, {"minor", VMM_VERSION_MINOR}, {"micro", VMM_VERSION_MICRO}}},
              {"package", "vmm"}};
}

// One connected client: its socket, its read buffer, its unsent output and
// the thread that serves it.
class ClientSession {
 public:
  // `first_line` replaces the greeting for a connection handed over from a
  // previous vmm process, which was negotiated there already.
  ClientSession(Server& server, UniqueFd fd, UniqueFd wake_event, std::uint64_t id, pid_t peer_pid,
                std::optional<std::string> first_line = std::nullopt)
      : server_(server), fd_(std::move(fd)), wake_event_(std::move(wake_event)), id_(id),
        peer_pid_(peer_pid), first_line_(std::move(first_line)) {
    if (first_line_) negotiated_.store(true, std::memory_order_release);
  }

  void start() { thread_ = std::thread([this] { run(); }); }
  void join() {
    if (thread_.joinable()) thread_.join();
  }
  [[nodiscard]] bool finished() const { return finished_.load(std::memory_order_acquire); }
  [[nodiscard]] bool negotiated() const { return negotiated_.load(std::memory_order_acquire); }
  [[nodiscard]] std::thread::id thread_id() const { return thread_.get_id(); }

  // Queues `line` after everything queued before it. Sends what the socket
  // takes right away and never waits: when the backlog would pass the limit,
  // the client is marked for disconnection instead. Any thread.
  bool enqueue(std::string_view line) {
    std::lock_guard lock(output_mutex_);
    if (output_closed_) return false;
    if (pending_output_.empty()) {
      if (!send_some_locked(line)) return false;
      if (line.empty()) return true;
    }
    if (pending_output_.size() + line.size() > server_.options_.max_pending_output_bytes) {
      output_failure_ = "client is not reading (" + std::to_string(pending_output_.size()) +
                        " bytes unsent)";
      output_closed_ = true;
      signal_eventfd(wake_event_.ref());
      return false;
    }
    pending_output_.append(line);
    // The client thread may be polling without POLLOUT; make it look again.
    signal_eventfd(wake_event_.ref());
    return true;
  }

  // Sends `line` with `fds` on its first byte, now: the descriptors must
  // ride with this very reply, so earlier output still unsent, or a socket
  // that takes nothing right now, fails it (the client is not reading). What
  // the socket does not take of the rest of the line is queued as usual.
  Result<void> enqueue_with_fds(std::string_view line, const std::vector<UniqueFd>& fds) {
    std::lock_guard lock(output_mutex_);
    if (output_closed_) return fail("the connection is closing", EPIPE);
    if (!pending_output_.empty())
      return fail("earlier replies are still unsent (the client is not reading)", EAGAIN);
    std::vector<FdRef> refs;
    for (const auto& fd : fds) refs.push_back(fd.ref());
    VMM_TRY_ASSIGN(sent, send_with_fds(fd_.ref(), line, refs, MSG_DONTWAIT));
    std::string_view rest = line.substr(sent);
    if (!send_some_locked(rest)) return fail("the connection failed after the descriptors went out", EPIPE);
    pending_output_.append(rest);
    if (!rest.empty()) signal_eventfd(wake_event_.ref());
    return {};
  }

 private:
  enum class Next { keep_going, close };

  // Sends a prefix of `data`, advancing it past what was sent.
  bool send_some_locked(std::string_view& data) {
    while (!data.empty()) {
      ssize_t sent = ::send(fd_.get(), data.data(), data.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
      if (sent < 0) {
        if (errno == EINTR) continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) return true;
        output_failure_ = std::string("send failed: ") + std::strerror(errno);
        output_closed_ = true;
        signal_eventfd(wake_event_.ref());
        return false;
      }
      data.remove_prefix(static_cast<std::size_t>(sent));
    }
    return true;
  }

  void flush() {
    std::lock_guard lock(output_mutex_);
    if (output_closed_) return;
    std::string_view unsent = pending_output_;
    if (send_some_locked(unsent)) pending_output_.erase(0, pending_output_.size() - unsent.size());
  }

  [[nodiscard]] std::size_t pending_output_bytes() {
    std::lock_guard lock(output_mutex_);
    return pending_output_.size();
  }

  [[nodiscard]] std::optional<std::string> output_failure() {
    std::lock_guard lock(output_mutex_);
    if (!output_closed_) return std::nullopt;
    return output_failure_;
  }

  void reply(const json& message, const std::optional<json>& id) {
    if (!id) {
      enqueue(to_line(message));
      return;
    }
    json with_id = message;
    with_id["id"] = *id;
    enqueue(to_line(with_id));
  }

  void run() {
    spdlog::debug("control: client {} connected (pid {})", id_, peer_pid_);
    if (first_line_) {
      enqueue(*first_line_);
    } else {
      enqueue(to_line(json{{"QMP", {{"version", server_.options_.version}, {"capabilities", json::array()}}}}));
    }
    std::string reason = serve();
    spdlog::debug("control: client {} disconnected: {}", id_, reason);
    {
      // Close now rather than when the session is reaped, so the client sees
      // EOF at once; later events find output_closed_ and skip it.
      std::lock_guard lock(output_mutex_);
      output_closed_ = true;
      fd_.reset();
    }
    finished_.store(true, std::memory_order_release);
  }

  // Serves the client until it leaves, misbehaves or the server stops;
  // returns why it ended, for the log.
  std::string serve() {
    std::array<char, kReadChunkBytes> chunk{};
    while (true) {
      if (auto failure = output_failure()) return *failure;
      std::size_t unsent = pending_output_bytes();
      bool reading = unsent < kPauseReadingAboveBytes;
      std::array<pollfd, 3> fds{{
          {fd_.get(), static_cast<short>((reading ? POLLIN : 0) | (unsent > 0 ? POLLOUT : 0)), 0},
          {server_.stop_event_.get(), POLLIN, 0},
          {wake_event_.get(), POLLIN, 0},
      }};
      if (::poll(fds.data(), fds.size(), -1) < 0) {
        if (errno == EINTR) continue;
        return std::string("poll failed: ") + std::strerror(errno);
      }
      if (fds[1].revents != 0) return "server stopping";
      if (fds[2].revents != 0) drain_eventfd(wake_event_.ref());
      if (fds[0].revents & POLLOUT) flush();
      if (fds[0].revents & POLLNVAL) return "socket invalid";
      if (!reading) {
        if (fds[0].revents & (POLLHUP | POLLERR)) return "connection closed with replies unread";
        continue;
      }
      if ((fds[0].revents & (POLLIN | POLLHUP | POLLERR)) == 0) continue;

      ssize_t received = ::recv(fd_.get(), chunk.data(), chunk.size(), MSG_DONTWAIT);
      if (received < 0) {
        if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) continue;
        return std::string("recv failed: ") + std::strerror(errno);
      }
      if (received == 0) {
        // A partial last line is dropped unexecuted: the client never finished it.
        if (!input_.empty())
          return "end of stream in the middle of a line (" + std::to_string(input_.size()) +
                 " bytes discarded)";
        return "end of stream";
      }
      input_.append(chunk.data(), static_cast<std::size_t>(received));
      if (process_input() == Next::close) return close_reason_;
    }
  }

  // Runs every complete line in the buffer, in order.
  Next process_input() {
    const std::size_t max_line = server_.options_.max_line_bytes;
    std::size_t line_start = 0;
    while (!server_.stopping_.load(std::memory_order_relaxed)) {
      std::size_t newline = input_.find('\n', line_start);
      if (newline == std::string::npos) break;
      std::string_view line(input_.data() + line_start, newline - line_start);
      line_start = newline + 1;
      if (line.ends_with('\r')) line.remove_suffix(1);
      if (line.size() > max_line) return reject_long_line(line.size());
      handle_line(line);
      if (handed_over_.load()) {
        close_reason_ = "the connection was handed over to another vmm process";
        return Next::close;
      }
    }
    input_.erase(0, line_start);
    // +1: the line's '\r' may have arrived without its '\n'.
    if (input_.size() > max_line + 1) return reject_long_line(input_.size());
    return Next::keep_going;
  }

  // Replies, then closes: the rest of the line would have to be read (and
  // buffered or skipped) to find where the next request starts.
  Next reject_long_line(std::size_t seen_bytes) {
    std::string limit = std::to_string(server_.options_.max_line_bytes);
    reply(error_reply(kGenericError, "request line longer than " + limit +
                                         " bytes; closing the connection"),
          std::nullopt);
    close_reason_ = "request line over " + limit + " bytes (" + std::to_string(seen_bytes) + " seen)";
    return Next::close;
  }

  // Runs one request line. Whatever the line holds, the client gets an
  // error reply and the server keeps going: nothing a client sends may throw
  // out of here (an uncaught exception on this thread would abort the vmm).
  void handle_line(std::string_view line) {
    if (is_blank(line)) return;
    try {
      handle_request(line);
    } catch (const std::exception& error) {
      // json::exception included: a value of an unexpected type met after
      // the checks in handle_request (a bug here or in a handler's argument
      // checks, never the client's), or memory running out.
      spdlog::error("control: client {}: request failed: {}", id_, error.what());
      reply(error_reply(kGenericError, std::string("internal error handling the request: ") + error.what()),
            std::nullopt);
    } catch (...) {
      spdlog::error("control: client {}: request failed with a non-exception", id_);
      reply(error_reply(kGenericError, "internal error handling the request"), std::nullopt);
    }
  }

  void handle_request(std::string_view line) {
    if (auto too_deep = nesting_error(line, kMaxRequestNesting)) {
      spdlog::warn("control: client {}: {}", id_, *too_deep);
      reply(error_reply(kGenericError, *too_deep), std::nullopt);
      return;
    }
    json request;
    try {
      request = json::parse(line);
    } catch (const json::exception& error) {
      // parse_error, and out_of_range for a number no double holds (1e400).
      spdlog::warn("control: client {}: {}", id_, describe_parse_error(error));
      reply(error_reply(kGenericError, describe_parse_error(error)), std::nullopt);
      return;
    }
    if (!request.is_object()) {
      reply(error_reply(kGenericError, "expected a JSON object"), std::nullopt);
      return;
    }
    std::optional<json> id;
    if (auto it = request.find("id"); it != request.end()) id = *it;

    for (const auto& [key, value] : request.items()) {
      if (key != "execute" && key != "arguments" && key != "id") {
        reply(error_reply(kGenericError, "unknown member '" + key +
                                             "' (a request has 'execute', 'arguments' and 'id')"),
              id);
        return;
      }
    }
    auto execute = request.find("execute");
    if (execute == request.end()) {
      reply(error_reply(kGenericError, "missing member 'execute'"), id);
      return;
    }
    if (!execute->is_string()) {
      reply(error_reply(kGenericError, "member 'execute' must be a string"), id);
      return;
    }
    json arguments = json::object();
    if (auto it = request.find("arguments"); it != request.end()) {
      if (!it->is_object()) {
        reply(error_reply(kGenericError, "member 'arguments' must be an object"), id);
        return;
      }
      arguments = *it;
    }
    const std::string& command = execute->get_ref<const std::string&>();

    if (command == "qmp_capabilities") {
      negotiate(arguments, id);
      return;
    }
    if (!negotiated()) {
      reply(error_reply(kCommandNotFound, "Expecting capabilities negotiation with 'qmp_capabilities'"), id);
      return;
    }
    spdlog::debug("control: client {}: {}", id_, command);
    std::vector<UniqueFd> reply_fds;
    CommandResult result = run_handler(command, arguments, id, reply_fds);
    if (handed_over_.load()) return;  // another process answers on this connection now
    if (result && !reply_fds.empty()) {
      json message{{"return", std::move(*result)}};
      if (id) message["id"] = *id;
      if (auto sent = enqueue_with_fds(to_line(message), reply_fds); !sent) {
        spdlog::warn("control: client {}: {}: {}", id_, command, sent.error().describe());
        reply(error_reply(kGenericError, command + ": the reply's descriptors could not be sent: " +
                                             sent.error().describe()),
              id);
      }
    } else if (result) {
      reply(json{{"return", std::move(*result)}}, id);
    } else {
      spdlog::debug("control: client {}: {} failed: {}: {}", id_, command, result.error().error_class,
                    result.error().desc);
      reply(error_reply(result.error().error_class, result.error().desc), id);
    }
  }

  void negotiate(const json& arguments, const std::optional<json>& id) {
    if (negotiated()) {
      reply(error_reply(kCommandNotFound, "Capabilities negotiation is already complete, command ignored"), id);
      return;
    }
    // QMP's optional {"enable": [...]}: this server offers no capabilities.
    for (const auto& [key, value] : arguments.items()) {
      if (key != "enable") {
        reply(error_reply(kGenericError, "qmp_capabilities: unknown argument '" + key + "'"), id);
        return;
      }
      if (!value.is_array()) {
        reply(error_reply(kGenericError, "qmp_capabilities: argument 'enable' must be an array"), id);
        return;
      }
      if (!value.empty()) {
        reply(error_reply(kGenericError, "qmp_capabilities: capability " +
                                             value.front().dump(-1, ' ', false, json::error_handler_t::replace) +
                                             " is not available (this server offers none)"),
              id);
        return;
      }
    }
    // Set before the reply goes out: once the client sees it, events flow.
    negotiated_.store(true, std::memory_order_release);
    reply(json{{"return", json::object()}}, id);
  }

  CommandResult run_handler(const std::string& command, const json& arguments, const std::optional<json>& id,
                            std::vector<UniqueFd>& reply_fds) {
    // A throwing handler must not take the VMM down with std::terminate.
    try {
      return server_.handler_.execute(command, arguments,
                                      CommandContext{fd_.get(), id, &handed_over_, server_.command_stop_.get_token(),
                                                     peer_pid_, &reply_fds});
    } catch (const std::exception& error) {
      spdlog::error("control: client {}: {} threw: {}", id_, command, error.what());
      return std::unexpected(CommandError{kGenericError, "internal error in " + command + ": " + error.what()});
    } catch (...) {
      spdlog::error("control: client {}: {} threw a non-exception", id_, command);
      return std::unexpected(CommandError{kGenericError, "internal error in " + command});
    }
  }

  Server& server_;
  UniqueFd fd_;  // closed by run() when the session ends; guarded by output_mutex_ then
  UniqueFd wake_event_;
  const std::uint64_t id_;
  const pid_t peer_pid_;
  const std::optional<std::string> first_line_;
  std::thread thread_;
  std::atomic<bool> finished_{false};
  std::atomic<bool> negotiated_{false};
  std::atomic<bool> handed_over_{false};

  std::string input_;  // the client thread's only
  std::string close_reason_;

  std::mutex output_mutex_;
  std::string pending_output_;
  bool output_closed_ = false;
  std::string output_failure_;
};

Server::Server(UniqueFd listen_fd, std::string path, CommandHandler& handler, ServerOptions options)
    : listen_fd_(std::move(listen_fd)), path_(std::move(path)), handler_(handler),
      options_(std::move(options)) {}

Server::~Server() { stop(); }

Result<std::unique_ptr<Server>> Server::listen(const std::string& path, CommandHandler& handler,
                                               ServerOptions options) {
  VMM_TRY_ASSIGN(address, unix_address(path));
  VMM_TRY_ASSIGN(fd, bind_socket(path, address));
  struct stat file{};
  if (::stat(path.c_str(), &file) < 0) {
    auto error = fail_errno("stat control socket " + path);
    ::unlink(path.c_str());
    return error;
  }
  // From here on the path is ours: the server's stop() removes it, on
  // failure too.
  std::unique_ptr<Server> server(new Server(std::move(fd), path, handler, std::move(options)));
  server->path_device_ = file.st_dev;
  server->path_inode_ = file.st_ino;
  // The mode can only be narrower than 0600 here (a umask taking owner bits);
  // restore the owner's access, which widens nothing for anyone else.
  if ((file.st_mode & 07777) != 0600 && ::chmod(path.c_str(), 0600) < 0) {
    auto error = fail_errno("chmod 0600 control socket " + path);
    server->stop();
    return error;
  }
  if (::listen(server->listen_fd_.get(), SOMAXCONN) < 0) {
    auto error = fail_errno("listen on control socket " + path);
    server->stop();
    return error;
  }
  if (auto started = server->start(); !started) {
    server->stop();
    return std::unexpected(started.error());
  }
  spdlog::info("control: listening on {}", path);
  return server;
}

Result<void> Server::check_listen_path(const std::string& path) {
  VMM_TRY(unix_address(path));
  struct stat file{};
  if (::lstat(path.c_str(), &file) == 0) return std::unexpected(bind_failure(path, EADDRINUSE));
  const std::string directory = directory_of(path);
  if (::stat(directory.c_str(), &file) != 0) return std::unexpected(bind_failure(path, errno));
  if (!S_ISDIR(file.st_mode)) return std::unexpected(bind_failure(path, ENOTDIR));
  if (::access(directory.c_str(), W_OK | X_OK) != 0) return std::unexpected(bind_failure(path, errno));
  return {};
}

Result<std::unique_ptr<Server>> Server::adopt(UniqueFd listening_fd, const std::string& path,
                                              CommandHandler& handler, ServerOptions options) {
  if (!listening_fd) return fail("adopt control socket " + path + ": no file descriptor");
  const std::string fd_name = "inherited control socket fd " + std::to_string(listening_fd.get());
  int value = 0;
  socklen_t length = sizeof value;
  if (getsockopt(listening_fd.get(), SOL_SOCKET, SO_DOMAIN, &value, &length) < 0)
    return fail_errno(fd_name + " is not a socket");
  if (value != AF_UNIX) return fail(fd_name + " is not a Unix socket");
  length = sizeof value;
  if (getsockopt(listening_fd.get(), SOL_SOCKET, SO_TYPE, &value, &length) < 0 || value != SOCK_STREAM)
    return fail(fd_name + " is not a stream socket");
  length = sizeof value;
  if (getsockopt(listening_fd.get(), SOL_SOCKET, SO_ACCEPTCONN, &value, &length) < 0 || value == 0)
    return fail(fd_name + " is not listening");

  // The path we will serve, and later remove, must be the one it is bound to.
  VMM_TRY_ASSIGN(expected_address, unix_address(path));
  sockaddr_un bound{};
  socklen_t bound_length = sizeof bound;
  if (getsockname(listening_fd.get(), reinterpret_cast<sockaddr*>(&bound), &bound_length) < 0)
    return fail_errno("getsockname on " + fd_name);
  std::size_t path_bytes = bound_length > offsetof(sockaddr_un, sun_path)
                               ? bound_length - offsetof(sockaddr_un, sun_path)
                               : 0;
  std::string bound_path(bound.sun_path, strnlen(bound.sun_path, path_bytes));
  if (bound_path != expected_address.sun_path)
    return fail(fd_name + " is bound to '" + bound_path + "', not " + path);

  struct stat file{};
  if (::stat(path.c_str(), &file) < 0) return fail_errno("control socket path " + path + " (of " + fd_name + ")");
  if (!S_ISSOCK(file.st_mode)) return fail("control socket path " + path + " is no longer a socket");
  VMM_TRY(set_listening_flags(listening_fd.ref()));

  std::unique_ptr<Server> server(new Server(std::move(listening_fd), path, handler, std::move(options)));
  server->path_device_ = file.st_dev;
  server->path_inode_ = file.st_ino;
  if (auto started = server->start(); !started) {
    // The path stays: it was handed to us and may still be someone's.
    [[maybe_unused]] UniqueFd closed = server->shut_down(false);
    return std::unexpected(started.error());
  }
  spdlog::info("control: serving inherited socket {} (fd {})", path, server->listen_fd_.get());
  return server;
}

Result<void> Server::start() {
  VMM_TRY_ASSIGN(stop_event, make_eventfd("control stop"));
  stop_event_ = std::move(stop_event);
  VMM_TRY_ASSIGN(pause_accept_event, make_eventfd("control accept pause"));
  pause_accept_event_ = std::move(pause_accept_event);
  return start_accepting();
}

Result<void> Server::start_accepting() {
  try {
    accept_thread_ = std::thread([this] { accept_loop(); });
  } catch (const std::system_error& error) {
    return fail("start control accept thread: " + std::string(error.what()), error.code().value());
  }
  return {};
}

void Server::stop() { [[maybe_unused]] UniqueFd closed = shut_down(true); }

void Server::stop_accepting() {
  std::lock_guard lock(shutdown_mutex_);
  if (shut_down_ || !accept_thread_.joinable()) return;
  signal_eventfd(pause_accept_event_.ref());
  accept_thread_.join();
  drain_eventfd(pause_accept_event_.ref());
  spdlog::info("control: no longer accepting on {}; new connections wait in the backlog", path_);
}

Result<void> Server::resume_accepting() {
  std::lock_guard lock(shutdown_mutex_);
  if (shut_down_) return fail("control server for " + path_ + " is stopped");
  if (accept_thread_.joinable()) return {};
  VMM_TRY(start_accepting());
  spdlog::info("control: accepting on {} again", path_);
  return {};
}

UniqueFd Server::detach() { return shut_down(false); }

UniqueFd Server::shut_down(bool remove_path) {
  const auto self = std::this_thread::get_id();
  std::thread accept_thread;
  {
    // Not held while joining: a handler that is still running may need it
    // (stop_accepting(), adopt_client()); it only guards the state change.
    std::unique_lock lock(shutdown_mutex_);
    if (shut_down_) {
      // Idempotent, and synchronous for every caller.
      shutdown_complete_cv_.wait(lock, [this] { return shutdown_complete_; });
      return {};
    }
    shut_down_ = true;
    stopping_.store(true);
    if (accept_thread_.get_id() == self) {
      spdlog::critical("control: Server::stop()/detach() called from the server's own accept thread");
      std::abort();
    }
    if (stop_event_) signal_eventfd(stop_event_.ref());
    // Running commands give up their waits; stop() then joins their threads.
    command_stop_.request_stop();
    accept_thread = std::move(accept_thread_);
  }
  // Joined before the clients are collected: it is the only other thread
  // that adds clients (adopt_client() checks shut_down_ first).
  if (accept_thread.joinable()) accept_thread.join();
  std::list<std::shared_ptr<ClientSession>> clients;
  {
    std::lock_guard clients_lock(clients_mutex_);
    clients.swap(clients_);
  }
  for (auto& client : clients) {
    if (client->thread_id() == self) {
      // Joining our own thread would deadlock: a handler called stop() (see server.h).
      spdlog::critical("control: Server::stop()/detach() called from inside a command handler");
      std::abort();
    }
  }
  for (auto& client : clients) client->join();
  UniqueFd handed_over;
  if (remove_path) {
    remove_path_if_ours();
    listen_fd_.reset();
    spdlog::info("control: stopped serving {}", path_);
  } else {
    spdlog::info("control: detached from {} (fd {}) for handover", path_, listen_fd_.get());
    handed_over = std::move(listen_fd_);
  }
  {
    std::lock_guard lock(shutdown_mutex_);
    shutdown_complete_ = true;
  }
  shutdown_complete_cv_.notify_all();
  return handed_over;
}

void Server::remove_path_if_ours() {
  struct stat file{};
  if (::lstat(path_.c_str(), &file) < 0) {
    if (errno != ENOENT) spdlog::warn("control: cannot stat {}: {}", path_, std::strerror(errno));
    return;
  }
  if (file.st_dev != path_device_ || file.st_ino != path_inode_) {
    spdlog::warn("control: {} is no longer this server's socket; leaving it", path_);
    return;
  }
  if (::unlink(path_.c_str()) < 0) spdlog::warn("control: remove {}: {}", path_, std::strerror(errno));
}

void Server::accept_loop() {
  while (true) {
    std::array<pollfd, 3> fds{{{listen_fd_.get(), POLLIN, 0},
                               {stop_event_.get(), POLLIN, 0},
                               {pause_accept_event_.get(), POLLIN, 0}}};
    if (::poll(fds.data(), fds.size(), -1) < 0) {
      if (errno == EINTR) continue;
      spdlog::error("control: poll on {} failed: {}; no longer accepting", path_, std::strerror(errno));
      return;
    }
    if (fds[1].revents != 0 || fds[2].revents != 0) return;
    if (fds[0].revents & (POLLERR | POLLNVAL)) {
      spdlog::error("control: listening socket {} failed; no longer accepting", path_);
      return;
    }
    if (fds[0].revents & POLLIN) accept_one();
  }
}

void Server::accept_one() {
  UniqueFd fd(::accept4(listen_fd_.get(), nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK));
  if (!fd) {
    int accept_errno = errno;
    if (accept_errno == EAGAIN || accept_errno == EWOULDBLOCK || accept_errno == EINTR ||
        accept_errno == ECONNABORTED)
      return;
    spdlog::warn("control: accept on {}: {}", path_, std::strerror(accept_errno));
    // Out of descriptors or memory: back off instead of spinning on poll.
    pollfd stop{stop_event_.get(), POLLIN, 0};
    ::poll(&stop, 1, 100);
    return;
  }
  ucred peer{};
  socklen_t peer_length = sizeof peer;
  if (getsockopt(fd.get(), SOL_SOCKET, SO_PEERCRED, &peer, &peer_length) < 0) peer.pid = 0;

  std::lock_guard lock(clients_mutex_);
  reap_finished_clients_locked();
  if (clients_.size() >= options_.max_clients) {
    spdlog::warn("control: refusing a client (pid {}): already {} clients", peer.pid, clients_.size());
    std::string line = to_line(error_reply(kGenericError, "too many clients (limit " +
                                                              std::to_string(options_.max_clients) +
                                                              "); try again later"));
    [[maybe_unused]] auto sent = ::send(fd.get(), line.data(), line.size(), MSG_DONTWAIT | MSG_NOSIGNAL);
    return;
  }
  add_client_locked(std::move(fd), peer.pid, std::nullopt);
}

void Server::add_client_locked(UniqueFd fd, pid_t peer_pid, std::optional<std::string> first_line) {
  auto wake_event = make_eventfd("control client wake");
  if (!wake_event) {
    spdlog::warn("control: dropping a client: {}", wake_event.error().describe());
    return;
  }
  auto client = std::make_shared<ClientSession>(*this, std::move(fd), std::move(*wake_event),
                                                next_client_id_++, peer_pid, std::move(first_line));
  try {
    client->start();
  } catch (const std::system_error& error) {
    spdlog::warn("control: dropping a client: cannot start its thread: {}", error.what());
    return;
  }
  clients_.push_back(std::move(client));
}

void Server::adopt_client(UniqueFd connection, const nlohmann::json& first_message) {
  // The session polls and sends without blocking, and the descriptor must
  // not leak into a later exec: set both, whatever the previous owner did.
  int status_flags = fcntl(connection.get(), F_GETFL);
  int fd_flags = fcntl(connection.get(), F_GETFD);
  if (status_flags < 0 || fd_flags < 0 || fcntl(connection.get(), F_SETFL, status_flags | O_NONBLOCK) < 0 ||
      fcntl(connection.get(), F_SETFD, fd_flags | FD_CLOEXEC) < 0) {
    spdlog::warn("control: cannot adopt client connection fd {}: {}", connection.get(), std::strerror(errno));
    return;
  }
  // Under shutdown_mutex_: a session started after stop() joined the others
  // would never be joined.
  std::lock_guard shutdown_lock(shutdown_mutex_);
  if (shut_down_) {
    spdlog::warn("control: server stopped; closing handed-over client connection");
    return;
  }
  std::lock_guard lock(clients_mutex_);
  reap_finished_clients_locked();
  add_client_locked(std::move(connection), 0, to_line(first_message));
}

void Server::reap_finished_clients_locked() {
  for (auto it = clients_.begin(); it != clients_.end();) {
    if ((*it)->finished()) {
      (*it)->join();
      it = clients_.erase(it);
    } else {
      ++it;
    }
  }
}

std::size_t Server::client_count() const {
  std::lock_guard lock(clients_mutex_);
  std::size_t count = 0;
  for (const auto& client : clients_)
    if (!client->finished()) ++count;
  return count;
}

void Server::emit_event(const std::string& name, const nlohmann::json& data) {
  if (stopping_.load(std::memory_order_relaxed)) return;
  json event{{"event", name},
             {"data", data.is_null() ? json::object() : data},
             {"timestamp", wall_clock_timestamp()}};
  std::string line = to_line(event);
  spdlog::debug("control: event {}", name);
  std::lock_guard lock(clients_mutex_);
  for (const auto& client : clients_)
    if (client->negotiated() && !client->finished()) client->enqueue(line);
}

}  // namespace vmm::control
