#include "update/session_holder.h"

#include <poll.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <thread>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

namespace vmm {
namespace {

constexpr char kTake = 't';
constexpr char kTaken = 'k';  // the client has the fd: the holders may go

// An abstract socket: no file to clean up, gone with the last holder.
sockaddr_un holder_address(const std::string& name, socklen_t* length) {
  sockaddr_un address{};
  address.sun_family = AF_UNIX;
  const std::string path = "vmm-luo-session-holder/" + name;
  const size_t n = std::min(path.size(), sizeof(address.sun_path) - 1);
  std::memcpy(address.sun_path + 1, path.data(), n);  // sun_path[0] = 0: abstract
  *length = static_cast<socklen_t>(offsetof(sockaddr_un, sun_path) + 1 + n);
  return address;
}

enum class HoldEnd { taken, elsewhere, signal };

// One byte and room for one descriptor, as sendmsg/recvmsg take them. No
// allocation: the twin uses it right after fork().
struct OneFdMessage {
  char control[CMSG_SPACE(sizeof(int))] = {};
  char byte = 0;
  iovec iov{&byte, 1};
  msghdr header{};

  explicit OneFdMessage(char value) : byte(value) {
    header.msg_iov = &iov;
    header.msg_iovlen = 1;
    header.msg_control = control;
    header.msg_controllen = sizeof(control);
  }
  OneFdMessage(const OneFdMessage&) = delete;
  OneFdMessage& operator=(const OneFdMessage&) = delete;
};

// One holder's loop. Only system calls, no allocation and no logging: the
// twin runs it right after fork() in a process that may have had threads.
HoldEnd serve(int listener, int done, int session, int signals) {
  while (true) {
    pollfd fds[3] = {{listener, POLLIN, 0}, {done, POLLIN, 0}, {signals, POLLIN, 0}};
    if (::poll(fds, signals >= 0 ? 3 : 2, -1) < 0) {
      if (errno == EINTR) continue;
      return HoldEnd::signal;
    }
    if (fds[1].revents & POLLIN) return HoldEnd::elsewhere;  // the other holder handed it over
    if (signals >= 0 && (fds[2].revents & POLLIN)) return HoldEnd::signal;
    if (!(fds[0].revents & POLLIN)) continue;
    const int client = ::accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
    if (client < 0) continue;
    ucred peer{};
    socklen_t peer_length = sizeof(peer);
    const bool allowed = ::getsockopt(client, SOL_SOCKET, SO_PEERCRED, &peer, &peer_length) == 0 &&
                         (peer.uid == 0 || peer.uid == ::geteuid());
    timeval timeout{5, 0};
    ::setsockopt(client, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
    char request = 0;
    if (!allowed || ::read(client, &request, 1) != 1) {
      ::close(client);
      continue;
    }
    if (request != kTake) {
      ::close(client);
      continue;
    }
    OneFdMessage message(kTake);
    cmsghdr* header = CMSG_FIRSTHDR(&message.header);
    header->cmsg_level = SOL_SOCKET;
    header->cmsg_type = SCM_RIGHTS;
    header->cmsg_len = CMSG_LEN(sizeof(int));
    std::memcpy(CMSG_DATA(header), &session, sizeof(int));
    char ack = 0;
    // Held on until the client says it has its own reference: a client that
    // dies midway leaves the session here.
    if (::sendmsg(client, &message.header, MSG_NOSIGNAL) == 1 && ::read(client, &ack, 1) == 1 && ack == kTaken) {
      const uint64_t one = 1;
      [[maybe_unused]] ssize_t w = ::write(done, &one, sizeof(one));
      ::close(client);
      return HoldEnd::taken;
    }
    ::close(client);
  }
}

}  // namespace

int hold_session(FdRef session, const std::string& name) {
  socklen_t length = 0;
  const sockaddr_un address = holder_address(name, &length);
  // Non-blocking: both holders wake for one connection, and the one that
  // loses the accept must get back to watching `done`.
  UniqueFd listener(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0));
  UniqueFd done(::eventfd(0, EFD_CLOEXEC));
  sigset_t stop;
  sigemptyset(&stop);
  sigaddset(&stop, SIGINT);
  sigaddset(&stop, SIGTERM);
  UniqueFd signals(::signalfd(-1, &stop, SFD_CLOEXEC));
  // The holders of an earlier attempt may still be on their way out.
  bool bound = false;
  for (int attempt = 0; listener && attempt < 40 && !bound; ++attempt) {
    bound = ::bind(listener.get(), reinterpret_cast<const sockaddr*>(&address), length) == 0;
    if (!bound) std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  if (!bound || ::listen(listener.get(), 4) != 0 || !done || !signals) {
    spdlog::error("cannot serve the unfinished LUO session '{}' to a later restore ({}); holding it in pid {} only: "
                  "SIGTERM discards it",
                  name, std::strerror(errno), ::getpid());
    signalfd_siginfo info{};
    [[maybe_unused]] ssize_t n = signals ? ::read(signals.get(), &info, sizeof(info)) : 0;
    if (!signals) ::pause();
    return 1;
  }
  const pid_t twin = ::fork();
  if (twin == 0) {
    // The twin dies on SIGINT/SIGTERM like any process; its parent's blocked
    // mask must not make it unkillable but by SIGKILL.
    ::sigprocmask(SIG_UNBLOCK, &stop, nullptr);
    serve(listener.get(), done.get(), session.get(), -1);
    ::_exit(0);
  }
  if (twin < 0) spdlog::error("cannot fork a second holder: {}", std::strerror(errno));
  spdlog::error("holding the unfinished LUO session '{}' so the guest's memory is kept: session-holders={}{}{}. "
                "`vmm restore --session {}` takes it over; `vmm restore --session {} --discard` drops it. Stopping "
                "one holder loses nothing; stopping all of them loses the guest's memory",
                name, ::getpid(), twin > 0 ? "," : "", twin > 0 ? std::to_string(twin) : std::string(), name, name);
  const HoldEnd end = serve(listener.get(), done.get(), session.get(), signals.get());
  switch (end) {
    case HoldEnd::taken:
    case HoldEnd::elsewhere:
      spdlog::info("the LUO session '{}' went to a new `vmm restore`; this holder exits", name);
      return 0;
    case HoldEnd::signal:
      break;
  }
  const bool twin_alive = twin > 0 && ::waitpid(twin, nullptr, WNOHANG) == 0;
  if (twin_alive) {
    spdlog::warn("stopped by a signal; pid {} still holds the LUO session '{}'", twin, name);
  } else {
    spdlog::error("stopped by a signal, and no other holder is left: the LUO session '{}' and the guest's memory "
                  "are discarded", name);
  }
  return 1;
}

Result<UniqueFd> take_held_session(const std::string& name) {
  socklen_t length = 0;
  const sockaddr_un address = holder_address(name, &length);
  UniqueFd socket(::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0));
  if (!socket) return fail_errno("cannot create a socket");
  if (::connect(socket.get(), reinterpret_cast<const sockaddr*>(&address), length) != 0)
    return fail(fmt::format("no process holds the LUO session '{}' (no holder answers: {})", name,
                            std::strerror(errno)),
                ENOENT);
  timeval timeout{10, 0};
  ::setsockopt(socket.get(), SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
  if (::write(socket.get(), &kTake, 1) != 1) return fail_errno("cannot ask the session's holder");
  OneFdMessage message(0);
  if (::recvmsg(socket.get(), &message.header, MSG_CMSG_CLOEXEC) != 1)
    return fail_errno(fmt::format("the holder of the LUO session '{}' did not answer", name));
  cmsghdr* header = CMSG_FIRSTHDR(&message.header);
  if (message.byte != kTake || !header || header->cmsg_type != SCM_RIGHTS || header->cmsg_len != CMSG_LEN(sizeof(int)))
    return fail(fmt::format("the holder of the LUO session '{}' sent no session", name), EPROTO);
  int fd = -1;
  std::memcpy(&fd, CMSG_DATA(header), sizeof(int));
  UniqueFd session(fd);
  if (::write(socket.get(), &kTaken, 1) != 1) return fail_errno("cannot confirm the session to its holder");
  return session;
}

}  // namespace vmm
