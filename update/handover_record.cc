#include "update/handover_record.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>

#include <fmt/format.h>

#include "base/memfd.h"
#include "migration/state_blob.h"
#include "update/versions.h"

extern char** environ;

namespace vmm {
namespace {

using nlohmann::json;
using namespace std::chrono;

void put_u16(std::vector<uint8_t>& out, size_t at, uint16_t v) { std::memcpy(out.data() + at, &v, sizeof v); }
void put_u32(std::vector<uint8_t>& out, size_t at, uint32_t v) { std::memcpy(out.data() + at, &v, sizeof v); }
uint16_t get_u16(std::span<const uint8_t> in, size_t at) {
  uint16_t v;
  std::memcpy(&v, in.data() + at, sizeof v);
  return v;
}
uint32_t get_u32(std::span<const uint8_t> in, size_t at) {
  uint32_t v;
  std::memcpy(&v, in.data() + at, sizeof v);
  return v;
}

json position(const std::optional<size_t>& slot) { return slot ? json(*slot) : json(nullptr); }

// A descriptor position in the body: absent/null, or an index into the table.
Result<std::optional<size_t>> read_position(const json& body, const char* key, size_t fd_count, bool counted) {
  if (!body.contains(key) || body[key].is_null()) return std::optional<size_t>{};
  if (!body[key].is_number_unsigned())
    return fail(fmt::format("the handover record's '{}' is not a descriptor position", key), EPROTO);
  const auto slot = body[key].get<uint64_t>();
  if (counted && slot >= fd_count)
    return fail(fmt::format("the handover record's '{}' names descriptor {} of {}", key, slot, fd_count), EPROTO);
  return std::optional<size_t>(static_cast<size_t>(slot));
}

Result<std::string> read_string(const json& body, const char* key, bool required) {
  if (!body.contains(key)) {
    if (required) return fail(fmt::format("the handover record lacks '{}'", key), EPROTO);
    return std::string();
  }
  if (!body[key].is_string()) return fail(fmt::format("the handover record's '{}' is not a string", key), EPROTO);
  return body[key].get<std::string>();
}

}  // namespace

std::vector<uint8_t> encode(const HandoverRecord& record) {
  json body = {{"mode", record.mode},
               {"session", record.session},
               {"launch",
                {{"control_socket", record.launch.control_socket_path},
                 {"console", record.launch.console},
                 {"log_level", record.launch.log_level},
                 {"kvm_device", record.launch.kvm_device},
                 {"on_sigterm", record.launch.on_sigterm}}},
               {"luo_manifest", position(record.luo_manifest)},
               {"listening_socket", position(record.listening_socket)},
               {"connection", position(record.connection)},
               {"reply_id", record.reply_id},
               {"record", record.record.to_carried_json()},
               {"state_bytes", record.state_bytes}};
  if (!record.previous_failure.empty()) body["previous_failure"] = record.previous_failure;
  if (fault_injection_built() && record.fault != Fault::none) body["x-inject"] = to_string(record.fault);
  const std::string text = body.dump(-1, ' ', false, json::error_handler_t::replace);

  const size_t table = record.fds.size() * sizeof(int32_t);
  std::vector<uint8_t> out(kHandoverHeaderSize + table + text.size());
  std::memcpy(out.data(), kHandoverMagic.data(), kHandoverMagic.size());
  const FormatVersion version = this_binary_versions().handover;
  put_u16(out, 8, static_cast<uint16_t>(version.major));
  put_u16(out, 10, static_cast<uint16_t>(version.minor));
  put_u32(out, 12, kHandoverHeaderSize);
  put_u32(out, 16, static_cast<uint32_t>(record.fds.size()));
  put_u32(out, 20, static_cast<uint32_t>(text.size()));
  for (size_t i = 0; i < record.fds.size(); ++i) {
    const int32_t fd = record.fds[i];
    std::memcpy(out.data() + kHandoverHeaderSize + i * sizeof fd, &fd, sizeof fd);
  }
  std::memcpy(out.data() + kHandoverHeaderSize + table, text.data(), text.size());
  const uint32_t crc = migration::crc32c(std::span<const uint8_t>(out).subspan(kHandoverHeaderSize));
  put_u32(out, 24, crc);
  return out;
}

std::optional<int> rollback_fd_of(std::span<const uint8_t> bytes) {
  if (bytes.size() < 20 || !std::equal(kHandoverMagic.begin(), kHandoverMagic.end(), bytes.begin())) return {};
  const uint32_t header_size = get_u32(bytes, 12);
  const uint32_t fd_count = get_u32(bytes, 16);
  if (fd_count == 0 || header_size < 20 || header_size > bytes.size() || bytes.size() - header_size < sizeof(int32_t))
    return {};
  int32_t fd;
  std::memcpy(&fd, bytes.data() + header_size, sizeof fd);
  if (fd < 0) return {};
  return fd;
}

Result<HandoverRecord> decode_handover(std::span<const uint8_t> bytes) {
  if (bytes.size() < kHandoverHeaderSize)
    return fail(fmt::format("the handover record is {} bytes, shorter than its {}-byte header", bytes.size(),
                            kHandoverHeaderSize), EPROTO);
  if (!std::equal(kHandoverMagic.begin(), kHandoverMagic.end(), bytes.begin()))
    return fail("this is not a vmm handover record (bad magic)", EPROTO);
  const FormatVersion ours = this_binary_versions().handover;
  const uint16_t major = get_u16(bytes, 8);
  const uint16_t minor = get_u16(bytes, 10);
  if (major != ours.major)
    return fail(fmt::format("the handover record is version {}.{} but this vmm reads only major version {}: "
                            "update with a vmm binary of the same handover major version",
                            major, minor, ours.major), EPROTONOSUPPORT);
  const uint32_t header_size = get_u32(bytes, 12);
  const uint32_t fd_count = get_u32(bytes, 16);
  const uint32_t body_size = get_u32(bytes, 20);
  if (header_size < kHandoverHeaderSize || header_size > bytes.size())
    return fail(fmt::format("the handover record's header size {} is impossible", header_size), EPROTO);
  if (fd_count > kMaxHandoverFds)
    return fail(fmt::format("the handover record names {} descriptors, more than {}", fd_count, kMaxHandoverFds),
                EPROTO);
  const uint64_t expected = uint64_t{header_size} + uint64_t{fd_count} * sizeof(int32_t) + body_size;
  if (expected != bytes.size())
    return fail(fmt::format("the handover record should be {} bytes by its header but is {}", expected, bytes.size()),
                EPROTO);
  const auto covered = bytes.subspan(header_size);
  if (migration::crc32c(covered) != get_u32(bytes, 24))
    return fail("the handover record's checksum does not match: it is damaged", EPROTO);

  HandoverRecord record;
  for (uint32_t i = 0; i < fd_count; ++i) {
    int32_t fd;
    std::memcpy(&fd, covered.data() + i * sizeof fd, sizeof fd);
    record.fds.push_back(fd);
  }
  const auto* text = reinterpret_cast<const char*>(covered.data() + fd_count * sizeof(int32_t));
  const json body = json::parse(text, text + body_size, nullptr, false);
  if (body.is_discarded() || !body.is_object()) return fail("the handover record's body is not a JSON object", EPROTO);

  VMM_TRY_ASSIGN(mode, read_string(body, "mode", true));
  if (mode != "exec" && mode != "kexec" && mode != "transfer" && mode != "fdstore")
    return fail(fmt::format("the handover record's mode '{}' is unknown", mode), EPROTO);
  record.mode = mode;
  VMM_TRY_ASSIGN(session, read_string(body, "session", false));
  record.session = session;
  if (body.contains("launch")) {
    const json& launch = body["launch"];
    if (!launch.is_object()) return fail("the handover record's 'launch' is not an object", EPROTO);
    VMM_TRY_ASSIGN(socket, read_string(launch, "control_socket", false));
    VMM_TRY_ASSIGN(console, read_string(launch, "console", false));
    VMM_TRY_ASSIGN(level, read_string(launch, "log_level", false));
    VMM_TRY_ASSIGN(kvm, read_string(launch, "kvm_device", false));
    // Added in 0.1: an older record has none (its vmm stopped on SIGTERM).
    VMM_TRY_ASSIGN(on_sigterm, read_string(launch, "on_sigterm", false));
    if (!on_sigterm.empty() && on_sigterm != "stop" && on_sigterm != "fd-store")
      return fail(fmt::format("the handover record's launch.on_sigterm '{}' is unknown", on_sigterm), EPROTO);
    record.launch.control_socket_path = socket;
    if (!console.empty()) record.launch.console = console;
    if (!level.empty()) record.launch.log_level = level;
    if (!kvm.empty()) record.launch.kvm_device = kvm;
    if (!on_sigterm.empty()) record.launch.on_sigterm = on_sigterm;
  }
  // Exec counts positions against the table; transfer against the message's descriptors (checked there).
  const bool counted = mode == "exec";
  VMM_TRY_ASSIGN(manifest, read_position(body, "luo_manifest", fd_count, counted));
  VMM_TRY_ASSIGN(listening, read_position(body, "listening_socket", fd_count, counted));
  VMM_TRY_ASSIGN(connection, read_position(body, "connection", fd_count, counted));
  record.luo_manifest = manifest;
  record.listening_socket = listening;
  record.connection = connection;
  record.reply_id = body.contains("reply_id") ? body["reply_id"] : json(nullptr);
  if (body.contains("record")) {
    VMM_TRY_ASSIGN(carried, with_context(UpdateRecord::from_json(body["record"]), "in the handover record"));
    record.record = std::move(carried);
  }
  VMM_TRY_ASSIGN(failure, read_string(body, "previous_failure", false));
  record.previous_failure = failure;
  if (body.contains("state_bytes")) {
    if (!body["state_bytes"].is_number_unsigned())
      return fail("the handover record's 'state_bytes' is not a size", EPROTO);
    record.state_bytes = body["state_bytes"].get<size_t>();
  }
  if (body.contains("x-inject")) {
    if (!fault_injection_built()) return fail("the handover record asks for a test fault, which this vmm does not inject", EPROTO);
    VMM_TRY_ASSIGN(name, read_string(body, "x-inject", true));
    VMM_TRY_ASSIGN(fault, fault_from_string(name));
    record.fault = fault;
  }
  return record;
}

Result<UniqueFd> write_handover_memfd(const HandoverRecord& record) {
  const std::vector<uint8_t> bytes = encode(record);
  return sealed_memfd("vmm-handover", bytes);
}

Result<std::vector<uint8_t>> read_handover_memfd(FdRef fd) {
  return read_whole_file(fd, kMaxHandoverBytes, "the handover record");
}

// --- versions ---------------------------------------------------------------

json HandoverVersions::to_json() const {
  auto format = [](const FormatVersion& v) { return json{{"major", v.major}, {"minor", v.minor}}; };
  return {{"program", program},     {"handover", format(handover)}, {"state", format(state)},
          {"luo_manifest", luo_manifest}, {"transfer", transfer}};
}

Result<HandoverVersions> HandoverVersions::from_json(const json& in) {
  if (!in.is_object()) return fail("the handover versions are not a JSON object", EPROTO);
  HandoverVersions out;
  auto format = [&](const char* key) -> Result<FormatVersion> {
    if (!in.contains(key) || !in[key].is_object() || !in[key].contains("major") ||
        !in[key]["major"].is_number_unsigned() || !in[key].contains("minor") || !in[key]["minor"].is_number_unsigned())
      return fail(fmt::format("the handover versions lack '{}'", key), EPROTO);
    return FormatVersion{in[key]["major"].get<uint32_t>(), in[key]["minor"].get<uint32_t>()};
  };
  VMM_TRY_ASSIGN(handover, format("handover"));
  VMM_TRY_ASSIGN(state, format("state"));
  out.handover = handover;
  out.state = state;
  for (const char* key : {"luo_manifest", "transfer"})
    if (!in.contains(key) || !in[key].is_number_unsigned())
      return fail(fmt::format("the handover versions lack '{}'", key), EPROTO);
  out.luo_manifest = in["luo_manifest"].get<uint32_t>();
  out.transfer = in["transfer"].get<uint32_t>();
  if (in.contains("program") && in["program"].is_string()) out.program = in["program"].get<std::string>();
  return out;
}

Result<void> check_compatible(const HandoverVersions& ours, const HandoverVersions& theirs, std::string_view mode) {
  std::vector<std::string> mismatches;
  if (ours.handover.major != theirs.handover.major)
    mismatches.push_back(fmt::format("handover record {} here, {} there", ours.handover.major, theirs.handover.major));
  if (ours.state.major != theirs.state.major)
    mismatches.push_back(fmt::format("saved state {} here, {} there", ours.state.major, theirs.state.major));
  if (mode == "exec" && ours.luo_manifest != theirs.luo_manifest)
    mismatches.push_back(fmt::format("LUO manifest {} here, {} there", ours.luo_manifest, theirs.luo_manifest));
  if (mode == "transfer" && ours.transfer != theirs.transfer)
    mismatches.push_back(fmt::format("transfer protocol {} here, {} there", ours.transfer, theirs.transfer));
  if (mismatches.empty()) return {};
  std::string list;
  for (const auto& m : mismatches) list += (list.empty() ? "" : "; ") + m;
  return fail(fmt::format("the new vmm (version {}) speaks other handover formats ({}): it could not take this VM "
                          "over. Update through an intermediate vmm that speaks both, or restart the VM",
                          theirs.program.empty() ? "unknown" : theirs.program, list),
              EPROTONOSUPPORT);
}

Result<HandoverVersions> query_versions(const std::string& binary, milliseconds timeout) {
  int pipe_fds[2];
  if (::pipe2(pipe_fds, O_CLOEXEC) != 0) return fail_errno("cannot create a pipe to ask the new vmm its versions");
  UniqueFd read_end(pipe_fds[0]), write_end(pipe_fds[1]);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, write_end.get(), STDOUT_FILENO);
  posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  posix_spawnattr_t attributes;
  posix_spawnattr_init(&attributes);
  sigset_t none;
  sigemptyset(&none);
  posix_spawnattr_setsigmask(&attributes, &none);
  posix_spawnattr_setflags(&attributes, POSIX_SPAWN_SETSIGMASK);
  std::string argv0 = binary, command = "handover-info";
  char* argv[] = {argv0.data(), command.data(), nullptr};
  pid_t pid = -1;
  const int spawned = ::posix_spawn(&pid, binary.c_str(), &actions, &attributes, argv, environ);
  posix_spawn_file_actions_destroy(&actions);
  posix_spawnattr_destroy(&attributes);
  if (spawned != 0) return fail(fmt::format("cannot run the new vmm '{}'", binary), spawned);
  write_end.reset();

  std::string output;
  const auto deadline = steady_clock::now() + timeout;
  bool timed_out = false;
  while (output.size() < 64 * 1024) {
    const auto left = duration_cast<milliseconds>(deadline - steady_clock::now()).count();
    if (left <= 0) {
      timed_out = true;
      break;
    }
    pollfd pfd{read_end.get(), POLLIN, 0};
    const int ready = ::poll(&pfd, 1, static_cast<int>(left));
    if (ready < 0 && errno == EINTR) continue;
    if (ready <= 0) {
      timed_out = ready == 0;
      break;
    }
    char buffer[4096];
    const ssize_t n = ::read(read_end.get(), buffer, sizeof buffer);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    output.append(buffer, static_cast<size_t>(n));
  }
  if (timed_out) ::kill(pid, SIGKILL);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0 && errno == EINTR) {
  }
  const std::string what = fmt::format("'{}' is not a vmm that can take this VM over", binary);
  if (timed_out) return fail(fmt::format("{}: `handover-info` did not answer within {} ms", what, timeout.count()), ETIMEDOUT);
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
    return fail(fmt::format("{}: `{} handover-info` {} {}", what, binary,
                            WIFEXITED(status) ? "exited with status" : "was killed by signal",
                            WIFEXITED(status) ? WEXITSTATUS(status) : WTERMSIG(status)), ENOEXEC);
  const json answer = json::parse(output, nullptr, false);
  if (answer.is_discarded())
    return fail(fmt::format("{}: `handover-info` printed no handover versions", what), ENOEXEC);
  return with_context(HandoverVersions::from_json(answer), what);
}

}  // namespace vmm
