#include "update/transfer.h"

#include "base/memfd.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <spawn.h>
#include <sys/wait.h>

#include <cstdio>
#include <algorithm>
#include <cstring>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

extern char** environ;

namespace vmm::transfer {

using nlohmann::json;

namespace {

// Above this a body goes in a memfd: FdChannel's messages carry at most 64 KiB.
constexpr size_t kInlineBodyBytes = 48 * 1024;
// No message of ours comes near this; a peer that sends more is broken.
constexpr size_t kMaxBodyBytes = 16u << 20;

}  // namespace

Result<void> send(const migration::FdChannel& channel, const std::string& kind, json body,
                  std::span<const FdRef> fds) {
  body["kind"] = kind;
  std::string text = body.dump(-1, ' ', false, json::error_handler_t::replace);
  const std::string what = "sending '" + kind + "' to the other vmm";
  if (text.size() <= kInlineBodyBytes) return with_context(channel.send(text, fds), what);
  const auto* bytes = reinterpret_cast<const uint8_t*>(text.data());
  VMM_TRY_ASSIGN(memfd, with_context(sealed_memfd("vmm-transfer-body", {bytes, text.size()}), what));
  std::vector<FdRef> all(fds.begin(), fds.end());
  all.push_back(memfd.ref());
  const json envelope = {{"kind", kind}, {"body_in_memfd", true}};
  return with_context(channel.send(envelope.dump(), all), what);
}

Result<Message> receive(const migration::FdChannel& channel, const std::string& expected_kind,
                        std::optional<std::chrono::milliseconds> timeout, std::span<const std::string_view> skip,
                        const std::atomic<bool>* cancelled) {
  using namespace std::chrono;
  // No std::optional here: GCC 12 at -Os warns (maybe-uninitialized) on one.
  const bool bounded = timeout.has_value();
  const auto deadline = bounded ? steady_clock::now() + *timeout : steady_clock::time_point::max();
  while (true) {
    // Wait in slices, so a shutdown of this vmm is seen within 100 ms.
    std::optional<milliseconds> slice;
    if (cancelled) slice = milliseconds(100);
    if (bounded) {
      const auto left = std::max(milliseconds(0), duration_cast<milliseconds>(deadline - steady_clock::now()));
      slice = slice ? std::min(*slice, left) : left;
    }
    auto raw = channel.receive(slice);
    if (!raw) {
      if (raw.error().code == ECONNRESET)
        return fail("the other vmm process exited before sending '" + expected_kind + "'", ECONNRESET);
      if (raw.error().code == ETIMEDOUT) {
        if (cancelled && cancelled->load())
          return fail("stopped waiting for '" + expected_kind + "': this vmm is shutting down", ECANCELED);
        if (!bounded || steady_clock::now() < deadline) continue;
      }
      return std::unexpected(raw.error().with_context("waiting for '" + expected_kind + "'"));
    }
    Message message;
    message.body = json::parse(raw->payload, nullptr, false);
    message.fds = std::move(raw->fds);
    if (message.body.is_object() && message.body.value("body_in_memfd", false) && !message.fds.empty()) {
      VMM_TRY_ASSIGN(text, read_whole_file(message.fds.back().ref(), kMaxBodyBytes, "a large transfer message"));
      message.fds.pop_back();
      message.body = json::parse(text.begin(), text.end(), nullptr, false);
    }
    if (message.body.is_discarded() || !message.body.is_object() || !message.body.contains("kind") ||
        !message.body["kind"].is_string())
      return fail("a malformed message on the transfer channel (expected '" + expected_kind + "')", EPROTO);
    message.kind = message.body["kind"].get<std::string>();
    if (message.kind == "error") {
      const json& text = message.body.contains("message") ? message.body["message"] : json();
      return fail(text.is_string() ? text.get<std::string>() : "the other vmm reported an unnamed error", EIO);
    }
    if (message.kind != expected_kind && std::ranges::find(skip, message.kind) != skip.end()) continue;
    if (message.kind != expected_kind)
      return fail(fmt::format("expected '{}' on the transfer channel but got '{}'", expected_kind, message.kind),
                  EPROTO);
    return message;
  }
}

json layout_to_json(const memory::MemoryLayout& layout) {
  json regions = json::array();
  for (const auto& spec : layout.regions)
    regions.push_back({{"name", spec.name}, {"role", memory::to_string(spec.role)},
                       {"backing", memory::to_string(spec.backing)}, {"gpa", spec.gpa}, {"size", spec.size},
                       {"slot", spec.slot}});
  return regions;
}

Result<memory::MemoryLayout> layout_from_json(const json& regions) {
  memory::MemoryLayout layout;
  try {
    for (const auto& region : regions) {
      memory::RegionSpec spec;
      spec.name = region.at("name").get<std::string>();
      const auto role = region.at("role").get<std::string>();
      if (role == memory::to_string(memory::RegionRole::ram)) {
        spec.role = memory::RegionRole::ram;
      } else if (role == memory::to_string(memory::RegionRole::shared)) {
        spec.role = memory::RegionRole::shared;
      } else {
        return fail("memory region '" + spec.name + "' has an unknown role '" + role + "'", EPROTO);
      }
      auto backing = memory::backing_from_string(region.at("backing").get<std::string>());
      if (!backing) return fail("memory region '" + spec.name + "' has an unknown backing", EPROTO);
      spec.backing = *backing;
      spec.gpa = region.at("gpa").get<uint64_t>();
      spec.size = region.at("size").get<uint64_t>();
      spec.slot = region.at("slot").get<uint32_t>();
      layout.regions.push_back(std::move(spec));
    }
  } catch (const json::exception& e) {
    return fail(std::string("the memory layout sent by the old vmm is malformed: ") + e.what(), EPROTO);
  }
  return layout;
}

json cpuid_to_json(const std::vector<std::vector<kvm_cpuid_entry2>>& cpuid) {
  json out = json::array();
  for (const auto& entries : cpuid) {
    std::string text;
    text.reserve(entries.size() * sizeof(kvm_cpuid_entry2) * 2);
    const auto* bytes = reinterpret_cast<const uint8_t*>(entries.data());
    for (size_t i = 0; i < entries.size() * sizeof(kvm_cpuid_entry2); ++i) text += fmt::format("{:02x}", bytes[i]);
    out.push_back(std::move(text));
  }
  return out;
}

Result<std::vector<std::vector<kvm_cpuid_entry2>>> cpuid_from_json(const json& cpuid) {
  std::vector<std::vector<kvm_cpuid_entry2>> out;
  if (!cpuid.is_array()) return fail("the CPUID sent by the old vmm is not an array", EPROTO);
  for (const auto& text : cpuid) {
    if (!text.is_string()) return fail("the CPUID sent by the old vmm is malformed", EPROTO);
    const std::string& hex = text.get_ref<const std::string&>();
    if (hex.size() % (2 * sizeof(kvm_cpuid_entry2)) != 0)
      return fail("the CPUID sent by the old vmm is not whole entries", EPROTO);
    std::vector<kvm_cpuid_entry2> entries(hex.size() / (2 * sizeof(kvm_cpuid_entry2)));
    auto* bytes = reinterpret_cast<uint8_t*>(entries.data());
    for (size_t i = 0; i < hex.size() / 2; ++i) {
      unsigned value = 0;
      if (std::sscanf(hex.c_str() + 2 * i, "%2x", &value) != 1)
        return fail("the CPUID sent by the old vmm is not hex", EPROTO);
      bytes[i] = static_cast<uint8_t>(value);
    }
    out.push_back(std::move(entries));
  }
  return out;
}

Result<Target> Target::spawn(const std::string& binary, const std::vector<std::string>& args) {
  VMM_TRY_ASSIGN(ends, migration::FdChannel::pair());
  auto& [ours, theirs] = ends;
  const int child_fd = theirs.fd().get();

  std::vector<std::string> argv_storage{binary, "transfer-target", "--channel-fd", std::to_string(child_fd)};
  argv_storage.insert(argv_storage.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& arg : argv_storage) argv.push_back(arg.data());
  argv.push_back(nullptr);

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  // dup2 onto itself clears FD_CLOEXEC (glibc 2.29+): the channel is the only
  // descriptor the new process inherits besides stdin/stdout/stderr.
  posix_spawn_file_actions_adddup2(&actions, child_fd, child_fd);
  posix_spawnattr_t attributes;
  posix_spawnattr_init(&attributes);
  sigset_t none;
  sigemptyset(&none);
  posix_spawnattr_setsigmask(&attributes, &none);
  posix_spawnattr_setflags(&attributes, POSIX_SPAWN_SETSIGMASK);
  pid_t pid = -1;
  const int spawned = ::posix_spawn(&pid, binary.c_str(), &actions, &attributes, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attributes);
  if (spawned != 0)
    return fail(fmt::format("cannot start the new vmm '{}': {}", binary, std::strerror(spawned)), spawned);
  return Target(std::move(ours), pid);
}

Target::Target(Target&& other) noexcept
    : channel_(std::move(other.channel_)), pid_(std::exchange(other.pid_, -1)), committed_(other.committed_) {}

Target::~Target() { abort(); }

void Target::abort() {
  if (pid_ < 0 || committed_) return;
  ::kill(pid_, SIGKILL);
  int status = 0;
  while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
  }
  pid_ = -1;
}

}  // namespace vmm::transfer
