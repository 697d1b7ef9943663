// The control socket server: QMP-shaped JSON lines on a Unix stream socket.
//
// One accept thread and one thread per client. Each client is negotiated
// (qmp_capabilities) on its own; its commands go to the CommandHandler in
// order, on its own thread, so a slow command blocks only that client.
// Events go to every negotiated client without ever blocking the caller: a
// client that stops reading is disconnected once its backlog is full.
//
// The protocol is described in docs/control-protocol.md.
#pragma once

#include <nlohmann/json.hpp>
#include <sys/types.h>

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <list>
#include <memory>
#include <mutex>
#include <optional>
#include <stop_token>
#include <string>
#include <thread>

#include "base/result.h"
#include "base/unique_fd.h"
#include "vmm/control/handler.h"

namespace vmm::control {

// The greeting's "version" member for this build:
// {"vmm": {"major": M, "minor": m, "micro": u}, "package": "vmm"}.
[[nodiscard]] nlohmann::json program_version();

// Deepest nesting of arrays and objects a request may have (the request
// object itself is level 1). Checked before parsing, so nothing recurses
// deeper than this on a client's thread; a deeper request gets an error reply.
inline constexpr std::size_t kMaxRequestNesting = 64;

struct ServerOptions {
  // Longest accepted request line, not counting its "\n" or "\r\n". A longer
  // line gets an error reply and the connection is closed.
  std::size_t max_line_bytes = 64 * 1024;
  // Concurrent clients; one more gets an error line instead of the greeting.
  std::size_t max_clients = 16;
  // Output a client may leave unread (beyond what the kernel buffers) before
  // it is disconnected, so events never wait on a slow reader.
  std::size_t max_pending_output_bytes = 1024 * 1024;
  // The greeting's "version" member.
  nlohmann::json version = program_version();
};

class ClientSession;

class Server {
 public:
  // Creates the socket at `path` (mode 0600 from the start, never wider),
  // then serves it. Fails without touching anything if `path` already exists,
  // its directory does not exist, or it does not fit in sun_path.
  // `handler` must outlive the server.
  [[nodiscard]] static Result<std::unique_ptr<Server>> listen(const std::string& path,
                                                              CommandHandler& handler,
                                                              ServerOptions options = {});

  // What listen() would refuse, checked without creating anything: a path
  // too long, a directory that is not there or not writable, a path that
  // exists. A restore checks it before it takes the VM's session.
  [[nodiscard]] static Result<void> check_listen_path(const std::string& path);

  // Serves a socket that is already bound to `path` and listening, e.g. one
  // inherited across execve during a live update: clients that connect in
  // between wait in the listen backlog and are served here. Takes ownership
  // of the path too (stop() removes it).
  [[nodiscard]] static Result<std::unique_ptr<Server>> adopt(UniqueFd listening_fd,
                                                             const std::string& path,
                                                             CommandHandler& handler,
                                                             ServerOptions options = {});

  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;
  ~Server();  // stop()

  // Sends {"event": name, "data": data, "timestamp": {...}} to every
  // negotiated client. Thread-safe; never blocks on a client.
  void emit_event(const std::string& name, const nlohmann::json& data = nlohmann::json::object());

  // Disconnects every client, joins every thread, closes the socket and
  // removes its path (only if the path is still this server's socket).
  // Requests every running command's CommandContext::stop first, then waits
  // for them to return (their replies still go out). Idempotent.
  // Must not be called from inside CommandHandler::execute: it joins the
  // client threads, the caller's included.
  void stop();

  // Like stop(), but leaves the path in place and hands back the listening
  // socket for whoever takes it over (a new process after execve: clear
  // FD_CLOEXEC on it, pass it on, Server::adopt() it there; or adopt() it
  // again here if the handover fails). Connections made meanwhile wait in
  // the backlog. Returns an invalid fd if the server was already stopped.
  [[nodiscard]] UniqueFd detach();

  // Serves a client connection negotiated by a previous vmm process (handed
  // over across execve), sending `first_message` (the reply it is owed)
  // instead of the greeting. Closes it if the server is stopped.
  void adopt_client(UniqueFd connection, const nlohmann::json& first_message);

  // Stops accepting (joins the accept thread) but keeps serving connected
  // clients; new connections wait in the listen backlog. Unlike detach(),
  // safe to call from inside a command handler, e.g. just before a
  // live-update execve, so no connection is accepted and then lost with
  // this process. resume_accepting() undoes it (if the handover fails).
  void stop_accepting();
  [[nodiscard]] Result<void> resume_accepting();

  // The listening socket (for handover bookkeeping; still owned here).
  [[nodiscard]] FdRef listening_fd() const { return listen_fd_.ref(); }
  [[nodiscard]] const std::string& path() const { return path_; }
  // Clients currently connected (negotiated or not).
  [[nodiscard]] std::size_t client_count() const;

 private:
  friend class ClientSession;

  Server(UniqueFd listen_fd, std::string path, CommandHandler& handler, ServerOptions options);
  [[nodiscard]] Result<void> start();
  [[nodiscard]] Result<void> start_accepting();
  // stop() and detach(): returns the listening socket when !remove_path.
  [[nodiscard]] UniqueFd shut_down(bool remove_path);
  void accept_loop();
  void accept_one();
  // Joins and forgets clients whose threads have finished. Caller holds clients_mutex_.
  void reap_finished_clients_locked();
  void add_client_locked(UniqueFd fd, pid_t peer_pid, std::optional<std::string> first_line);
  void remove_path_if_ours();

  UniqueFd listen_fd_;
  std::string path_;
  // The socket file this server created or adopted; stop() removes the path
  // only while it still names this file.
  dev_t path_device_ = 0;
  ino_t path_inode_ = 0;
  CommandHandler& handler_;
  const ServerOptions options_;

  // Readable once shutdown starts; every thread polls it.
  UniqueFd stop_event_;
  // Readable to make the accept thread return without stopping the server.
  UniqueFd pause_accept_event_;
  std::atomic<bool> stopping_{false};
  // Handed to every command (CommandContext::stop); requested by shut_down().
  std::stop_source command_stop_;
  // Guards shut_down_, shutdown_complete_ and accept_thread_.
  std::mutex shutdown_mutex_;
  bool shut_down_ = false;
  bool shutdown_complete_ = false;
  std::condition_variable shutdown_complete_cv_;

  std::thread accept_thread_;
  mutable std::mutex clients_mutex_;
  std::list<std::shared_ptr<ClientSession>> clients_;
  std::uint64_t next_client_id_ = 1;
};

}  // namespace vmm::control
