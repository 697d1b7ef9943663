#include "update/fd_store.h"

#include <fcntl.h>
#include <systemd/sd-daemon.h>
#include <unistd.h>

#include <charconv>
#include <cstdlib>
#include <cstring>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "luo/file_kind.h"

namespace vmm {
namespace {

constexpr std::string_view kNamePrefix = "vmm.";
constexpr size_t kMaxFdNameLength = 255;

Result<UniqueFd> duplicate(FdRef fd) {
  UniqueFd copy(::fcntl(fd.get(), F_DUPFD_CLOEXEC, 3));
  if (!copy) return fail_errno(fmt::format("cannot duplicate fd {}", fd.get()));
  return copy;
}

std::string notify_error(int code, const std::string& what) {
  return code == 0 ? what + ": no $NOTIFY_SOCKET (the vmm does not run as a systemd service)" : what;
}

}  // namespace

FdStoreCalls real_fd_store_calls() {
  return FdStoreCalls{
      [](const char* state, const int* fds, unsigned n) {
        return ::sd_pid_notify_with_fds(0, 0, state, const_cast<int*>(fds), n);
      },
      [](uint64_t timeout_us) { return ::sd_notify_barrier(0, timeout_us); },
  };
}

FdStoreEnvironment fd_store_environment() {
  FdStoreEnvironment environment;
  const char* socket = std::getenv("NOTIFY_SOCKET");
  environment.notify_socket = socket && *socket;
  if (const char* max = std::getenv("FDSTORE")) {
    unsigned value = 0;
    const std::string_view text(max);
    auto [end, error] = std::from_chars(text.data(), text.data() + text.size(), value);
    if (error == std::errc() && end == text.data() + text.size()) environment.max_fds = value;
  }
  return environment;
}

Result<std::string> fd_store_name(std::string_view session, uint64_t token) {
  VMM_TRY(luo::validate_session_name(session));
  for (char c : session)
    if (c == ':' || c < 0x21 || c > 0x7e)
      return fail(fmt::format("the session name '{}' cannot name a file in systemd's fd store (fd names are "
                              "printable ASCII without ':' or spaces)", session), EINVAL);
  std::string name = fmt::format("{}{}.{}", kNamePrefix, session, token);
  if (name.size() > kMaxFdNameLength) return fail("fd store name too long: " + name, EINVAL);
  return name;
}

std::optional<StoredFileName> parse_fd_store_name(std::string_view name) {
  if (!name.starts_with(kNamePrefix)) return std::nullopt;
  name.remove_prefix(kNamePrefix.size());
  const size_t dot = name.rfind('.');
  if (dot == std::string_view::npos || dot == 0 || dot + 1 == name.size()) return std::nullopt;
  StoredFileName parsed;
  parsed.session = std::string(name.substr(0, dot));
  const std::string_view token = name.substr(dot + 1);
  auto [end, error] = std::from_chars(token.data(), token.data() + token.size(), parsed.token);
  if (error != std::errc() || end != token.data() + token.size()) return std::nullopt;
  if (!luo::validate_session_name(parsed.session)) return std::nullopt;
  return parsed;
}

// --- backend ---------------------------------------------------------------------

FdStoreBackend::FdStoreBackend(FdStoreEnvironment environment, FdStoreCalls calls)
    : environment_(environment), calls_(calls) {}

FdStoreBackend::FdStoreBackend(FdStoreEnvironment environment, FdStoreCalls calls,
                               std::vector<std::pair<std::string, UniqueFd>> passed)
    : environment_(environment), calls_(calls) {
  for (auto& [name, fd] : passed) {
    auto parsed = parse_fd_store_name(name);
    if (!parsed) {
      spdlog::warn("systemd fd store: ignoring the file '{}' systemd passed (not a vmm session's file)", name);
      continue;
    }
    auto& files = incoming_[parsed->session];
    if (files.contains(parsed->token)) {
      spdlog::warn("systemd fd store: '{}' was passed twice; keeping the first", name);
      continue;
    }
    files.emplace(parsed->token, std::move(fd));
  }
}

std::unique_ptr<FdStoreBackend> FdStoreBackend::from_environment() {
  std::vector<std::pair<std::string, UniqueFd>> passed;
  char** names = nullptr;
  // unset_environment=1: nothing this process starts sees them.
  const int count = ::sd_listen_fds_with_names(1, &names);
  if (count < 0) spdlog::warn("systemd fd store: cannot read $LISTEN_FDS: {}", std::strerror(-count));
  for (int i = 0; i < count; ++i) {
    const int fd = SD_LISTEN_FDS_START + i;
    ::fcntl(fd, F_SETFD, FD_CLOEXEC);
    passed.emplace_back(names && names[i] ? names[i] : "unknown", UniqueFd(fd));
  }
  if (names) {
    for (int i = 0; i < count; ++i) std::free(names[i]);
    std::free(names);
  }
  return std::make_unique<FdStoreBackend>(fd_store_environment(), real_fd_store_calls(), std::move(passed));
}

Result<std::unique_ptr<luo::Session>> FdStoreBackend::create_session(std::string_view name) {
  VMM_TRY(fd_store_name(name, 0));
  if (!environment_.notify_socket)
    return fail("systemd's fd store needs the vmm to run as a systemd service ($NOTIFY_SOCKET is not set)", ENOTSUP);
  if (environment_.max_fds == 0)
    return fail("the service has no fd store ($FDSTORE is not set): give its unit FileDescriptorStoreMax= (and "
                "FileDescriptorStorePreserve=yes, so the store outlives the stop)", ENOTSUP);
  return std::unique_ptr<luo::Session>(std::make_unique<FdStoreSession>(std::string(name), environment_, calls_));
}

Result<std::unique_ptr<luo::Session>> FdStoreBackend::retrieve_session(std::string_view name) {
  auto it = incoming_.find(std::string(name));
  if (it == incoming_.end())
    return fail(fmt::format("systemd passed no file of session '{}' (no $LISTEN_FDNAMES entry {}{}.N)", name,
                            kNamePrefix, name), ENOENT);
  auto session = std::make_unique<FdStoreSession>(std::string(name), calls_, std::move(it->second));
  incoming_.erase(it);
  return std::unique_ptr<luo::Session>(std::move(session));
}

bool FdStoreBackend::has_session(std::string_view name) const { return incoming_.contains(std::string(name)); }

// --- session ---------------------------------------------------------------------

FdStoreSession::FdStoreSession(std::string name, FdStoreEnvironment environment, FdStoreCalls calls)
    : name_(std::move(name)), environment_(environment), calls_(calls) {}

FdStoreSession::FdStoreSession(std::string name, FdStoreCalls calls, std::map<uint64_t, UniqueFd> files)
    : name_(std::move(name)), incoming_(true), calls_(calls), files_(std::move(files)) {}

Result<void> FdStoreSession::preserve(FdRef fd, uint64_t token) {
  if (incoming_) return fail("preserve: session '" + name_ + "' is incoming", EINVAL);
  if (files_.contains(token)) return fail(fmt::format("preserve: token {} is taken in session '{}'", token, name_), EEXIST);
  VMM_TRY_ASSIGN(info, luo::inspect_fd(fd));
  if (info.kind != luo::FileKind::memfd)
    return fail(fmt::format("systemd's fd store carries only memfds across a kexec, and fd {} ({}) is a {}: run the "
                            "VM with --memory-backing memfd",
                            fd.get(), info.link, luo::to_string(info.kind)),
                ENOENT);
  if (files_.size() >= environment_.max_fds)
    return fail(fmt::format("the service's fd store holds at most {} files (FileDescriptorStoreMax=), and this VM "
                            "needs more: raise it in the unit",
                            environment_.max_fds),
                ENOSPC);
  VMM_TRY_ASSIGN(copy, duplicate(fd));
  files_.emplace(token, std::move(copy));
  return {};
}

Result<UniqueFd> FdStoreSession::retrieve(uint64_t token) {
  if (!incoming_) return fail("retrieve: session '" + name_ + "' is outgoing", EINVAL);
  auto it = files_.find(token);
  if (it == files_.end())
    return fail(fmt::format("systemd passed no file {} of session '{}'", token, name_), ENOENT);
  return duplicate(it->second.ref());
}

Result<void> FdStoreSession::finish() {
  if (!incoming_ || finished_) return {};
  Error first;
  for (const auto& [token, fd] : files_) {
    VMM_TRY_ASSIGN(name, fd_store_name(name_, token));
    const int sent = calls_.notify_with_fds(fmt::format("FDSTOREREMOVE=1\nFDNAME={}", name).c_str(), nullptr, 0);
    if (sent <= 0 && first.message.empty())
      first = Error{-sent, notify_error(sent, "cannot take " + name + " out of systemd's fd store")};
  }
  finished_ = true;
  files_.clear();
  if (!first.message.empty()) return std::unexpected(first);
  return {};
}

Result<void> FdStoreSession::store(uint64_t timeout_us) {
  if (incoming_) return fail("store: session '" + name_ + "' is incoming", EINVAL);
  std::vector<std::string> names;
  for (const auto& [token, fd] : files_) {
    VMM_TRY_ASSIGN(name, fd_store_name(name_, token));
    names.push_back(std::move(name));
  }
  // The store keeps every fd under its name, duplicates too: whatever an
  // earlier stop left under these names goes first.
  for (const auto& name : names) {
    const int sent = calls_.notify_with_fds(fmt::format("FDSTOREREMOVE=1\nFDNAME={}", name).c_str(), nullptr, 0);
    if (sent <= 0) return std::unexpected(Error{-sent, notify_error(sent, "cannot clear " + name + " in systemd's fd store")});
  }
  size_t index = 0;
  for (const auto& [token, fd] : files_) {
    const int raw = fd.get();
    const std::string& name = names[index++];
    const int sent = calls_.notify_with_fds(fmt::format("FDSTORE=1\nFDNAME={}", name).c_str(), &raw, 1);
    if (sent <= 0) {
      // Half a VM in the store is worse than none: the next start would fail on it.
      for (size_t i = 0; i + 1 < index; ++i)
        calls_.notify_with_fds(fmt::format("FDSTOREREMOVE=1\nFDNAME={}", names[i]).c_str(), nullptr, 0);
      return std::unexpected(Error{-sent, notify_error(sent, "cannot put " + name + " into systemd's fd store")});
    }
  }
  // A datagram is not yet a stored fd: systemd takes them only as it reads
  // its notify socket, and the vmm exits right after this.
  const int done = calls_.barrier(timeout_us);
  if (done < 0) return fail("systemd did not confirm the fd store within the deadline (sd_notify_barrier)", -done);
  spdlog::info("systemd fd store: stored {} files of session '{}'", files_.size(), name_);
  return {};
}

}  // namespace vmm
