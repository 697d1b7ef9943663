// A fake kernel LUO for the agent's tests and fuzz target: sessions are
// pipes. The session fd is the write end (what the agent and the vmms hold);
// the fake keeps the read end, which sees POLLHUP once every descriptor of
// the session is closed: the moment the real kernel would unpreserve an
// outgoing session or finish an incoming one. Sessions are told apart by
// inode, so duplicates (the agent's dup, SCM_RIGHTS copies) are the same
// session, as in the kernel.
#pragma once

#include <fcntl.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <string>

#include "base/unique_fd.h"
#include "luo/kernel_backend.h"
#include "luo/uapi.h"

namespace vmm::testing {

struct FakeLuoKernel {
  struct FakeSession {
    std::string name;
    bool incoming = false;
    bool finished = false;
    UniqueFd watch;  // the pipe's read end
    std::set<uint64_t> tokens;
    std::map<uint64_t, UniqueFd> files;  // outgoing: what was preserved, by token
  };

  std::mutex mutex;
  bool device_missing = false;
  int device_opens = 0;
  int retrieve_session_calls = 0;
  // Sessions "from the previous kernel", by name, with their tokens.
  std::map<std::string, std::set<uint64_t>> incoming_available;
  // Their files where known (kexec_into); a token without one retrieves an
  // empty memfd.
  std::map<std::string, std::map<uint64_t, UniqueFd>> incoming_files;
  std::set<std::string> retrieved;
  std::map<ino_t, FakeSession> sessions;

  // Whether some descriptor of a session named `name` is still open.
  bool alive(const std::string& name) {
    std::lock_guard lock(mutex);
    for (const auto& [ino, session] : sessions) {
      if (session.name != name) continue;
      pollfd ready{session.watch.get(), POLLIN, 0};
      if (::poll(&ready, 1, 0) == 0) return true;  // POLLHUP: every write end is closed
    }
    return false;
  }

  // The kexec: every outgoing session some descriptor still holds crosses
  // into `next` (a fresh fake kernel), files and all; the rest is gone.
  void kexec_into(FakeLuoKernel& next) {
    std::lock_guard lock(mutex);
    for (auto& [ino, session] : sessions) {
      pollfd ready{session.watch.get(), POLLIN, 0};
      if (session.incoming || ::poll(&ready, 1, 0) != 0) continue;
      next.incoming_available[session.name] = session.tokens;
      for (auto& [token, file] : session.files) next.incoming_files[session.name][token] = std::move(file);
    }
  }

  static FakeLuoKernel*& current() {
    static FakeLuoKernel* kernel = nullptr;
    return kernel;
  }
  static luo::KernelSyscalls syscalls() { return luo::KernelSyscalls{&fake_open, &fake_ioctl}; }

 private:
  static ino_t inode(int fd) {
    struct stat st {};
    return ::fstat(fd, &st) == 0 ? st.st_ino : 0;
  }

  int new_session(const std::string& name, bool incoming) {
    int ends[2];
    if (::pipe2(ends, O_CLOEXEC) != 0) return -1;
    FakeSession session;
    session.name = name;
    session.incoming = incoming;
    session.watch.reset(ends[0]);
    sessions[inode(ends[1])] = std::move(session);
    return ends[1];
  }

  static int fake_open(const char*, int) {
    FakeLuoKernel& k = *current();
    std::lock_guard lock(k.mutex);
    if (k.device_missing) {
      errno = ENOENT;
      return -1;
    }
    ++k.device_opens;
    return ::memfd_create("fake-liveupdate", MFD_CLOEXEC);
  }

  static int fake_ioctl(int fd, unsigned long request, void* arg) {
    FakeLuoKernel& k = *current();
    std::lock_guard lock(k.mutex);
    switch (request) {
      case luo::uapi::kIoctlCreateSession: {
        auto* cmd = static_cast<luo::uapi::CreateSession*>(arg);
        const std::string name(reinterpret_cast<const char*>(cmd->name));
        for (const auto& [ino, session] : k.sessions) {
          pollfd ready{session.watch.get(), POLLIN, 0};
          if (session.name == name && !session.incoming && ::poll(&ready, 1, 0) == 0) {
            errno = EEXIST;
            return -1;
          }
        }
        cmd->fd = k.new_session(name, false);
        return cmd->fd < 0 ? -1 : 0;
      }
      case luo::uapi::kIoctlRetrieveSession: {
        auto* cmd = static_cast<luo::uapi::RetrieveSession*>(arg);
        const std::string name(reinterpret_cast<const char*>(cmd->name));
        ++k.retrieve_session_calls;
        if (!k.incoming_available.contains(name)) {
          errno = ENOENT;
          return -1;
        }
        if (!k.retrieved.insert(name).second) {
          errno = EINVAL;  // the kernel: one retrieve per session
          return -1;
        }
        cmd->fd = k.new_session(name, true);
        if (cmd->fd >= 0) k.sessions[inode(cmd->fd)].tokens = k.incoming_available[name];
        return cmd->fd < 0 ? -1 : 0;
      }
      default:
        break;
    }
    auto it = k.sessions.find(inode(fd));
    if (it == k.sessions.end()) {
      errno = ENOTTY;
      return -1;
    }
    FakeSession& session = it->second;
    switch (request) {
      case luo::uapi::kIoctlSessionPreserveFd: {
        auto* cmd = static_cast<luo::uapi::SessionPreserveFd*>(arg);
        if (session.incoming) {
          errno = EINVAL;
          return -1;
        }
        // Mainline: memfds only.
        char link[64] = {};
        const std::string path = "/proc/self/fd/" + std::to_string(cmd->fd);
        if (::readlink(path.c_str(), link, sizeof link - 1) < 0) {
          errno = EBADF;
          return -1;
        }
        if (std::strncmp(link, "/memfd:", 7) != 0) {
          errno = ENOENT;
          return -1;
        }
        if (!session.tokens.insert(cmd->token).second) {
          errno = EEXIST;
          return -1;
        }
        session.files[cmd->token].reset(::fcntl(cmd->fd, F_DUPFD_CLOEXEC, 0));
        return 0;
      }
      case luo::uapi::kIoctlSessionRetrieveFd: {
        auto* cmd = static_cast<luo::uapi::SessionRetrieveFd*>(arg);
        if (!session.incoming || session.finished || !session.tokens.contains(cmd->token)) {
          errno = ENOENT;
          return -1;
        }
        // The kernel's retrieved memfd is a new file around the same pages;
        // a new open of the kept one is as close as userspace gets.
        auto& files = k.incoming_files[session.name];
        if (auto file = files.find(cmd->token); file != files.end() && file->second) {
          const std::string path = "/proc/self/fd/" + std::to_string(file->second.get());
          cmd->fd = ::open(path.c_str(), O_RDWR | O_CLOEXEC);
        } else {
          cmd->fd = ::memfd_create("fake-retrieved", MFD_CLOEXEC);
        }
        return cmd->fd < 0 ? -1 : 0;
      }
      case luo::uapi::kIoctlSessionFinish:
        if (!session.incoming) {
          errno = EINVAL;
          return -1;
        }
        session.finished = true;
        return 0;
      default:
        errno = EINVAL;
        return -1;
    }
  }
};

}  // namespace vmm::testing
