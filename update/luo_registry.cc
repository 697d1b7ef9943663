#include "update/luo_registry.h"

#include <cstring>
#include <set>

#include <fmt/format.h>

#include "luo/session.h"
#include "migration/state_blob.h"

namespace vmm {
namespace {

using nlohmann::json;

template <typename T>
void put(std::vector<uint8_t>& out, size_t at, T value) {
  std::memcpy(out.data() + at, &value, sizeof value);
}

template <typename T>
T get(std::span<const uint8_t> in, size_t at) {
  T value;
  std::memcpy(&value, in.data() + at, sizeof value);
  return value;
}

std::unexpected<Error> refuse(const std::string& why) {
  return fail(fmt::format("the LUO agent's registry is unusable ({}): no VM is restored from it; its session '{}' "
                          "stays held by the agent for inspection, and each VM can still be restored by hand with "
                          "`vmm restore --session NAME`",
                          why, kRegistrySessionName),
              EPROTO);
}

}  // namespace

Result<std::vector<std::string>> parse_restore_args(const json& args) {
  if (!args.is_array()) return fail("restore.args must be an array of strings", EINVAL);
  if (args.size() > kMaxRestoreArgs)
    return fail(fmt::format("restore.args has {} arguments, more than the {} allowed", args.size(), kMaxRestoreArgs),
                EINVAL);
  std::vector<std::string> out;
  for (size_t i = 0; i < args.size(); ++i) {
    if (!args[i].is_string()) return fail(fmt::format("restore.args[{}] must be a string", i), EINVAL);
    std::string arg = args[i].get<std::string>();
    if (arg.size() > kMaxRestoreArgBytes)
      return fail(fmt::format("restore.args[{}] is {} bytes, more than the {} allowed", i, arg.size(),
                              kMaxRestoreArgBytes),
                  EINVAL);
    if (arg.find('\0') != std::string::npos)
      return fail(fmt::format("restore.args[{}] contains a NUL byte: it cannot be a program argument", i), EINVAL);
    // The agent adds these itself: a second one would restore another
    // session than the one the entry is for, or ask another agent.
    for (const char* own : {"--session", "--luo-agent"}) {
      if (arg == own || arg.starts_with(std::string(own) + "="))
        return fail(fmt::format("restore.args[{}] is '{}': leave {} out, the agent passes it itself", i, arg, own),
                    EINVAL);
    }
    out.push_back(std::move(arg));
  }
  return out;
}

std::vector<uint8_t> encode_registry(const Registry& registry) {
  json sessions = json::array();
  for (const RegistryEntry& entry : registry.entries)
    sessions.push_back(json{{"name", entry.name}, {"restore_args", entry.restore_args}});
  const std::string payload =
      json{{"sessions", std::move(sessions)}, {"sealed_at_ns", registry.sealed_at_ns}, {"agent_pid", registry.agent_pid}}
          .dump();
  std::vector<uint8_t> out(kRegistryHeaderSize + payload.size());
  std::memcpy(out.data(), kRegistryMagic, sizeof kRegistryMagic);
  put<uint16_t>(out, 8, registry.major);
  put<uint16_t>(out, 10, registry.minor);
  put<uint32_t>(out, 12, kRegistryHeaderSize);
  put<uint64_t>(out, 16, payload.size());
  std::memcpy(out.data() + kRegistryHeaderSize, payload.data(), payload.size());
  put<uint32_t>(out, 24, migration::crc32c(std::span<const uint8_t>(out).subspan(kRegistryHeaderSize)));
  put<uint32_t>(out, 28, 0);
  return out;
}

Result<Registry> decode_registry(std::span<const uint8_t> bytes) {
  if (bytes.size() < kRegistryHeaderSize)
    return refuse(fmt::format("{} bytes, shorter than its {}-byte header: truncated", bytes.size(),
                              kRegistryHeaderSize));
  if (std::memcmp(bytes.data(), kRegistryMagic, sizeof kRegistryMagic) != 0)
    return refuse("bad magic: not a registry written by a vmm agent");
  Registry registry;
  registry.major = get<uint16_t>(bytes, 8);
  registry.minor = get<uint16_t>(bytes, 10);
  if (registry.major != kRegistryMajor)
    return refuse(fmt::format("format {}.{}, and this agent reads only major version {}: start the agent of the vmm "
                              "version that sealed it, or restore the VMs by hand",
                              registry.major, registry.minor, kRegistryMajor));
  const uint32_t header_size = get<uint32_t>(bytes, 12);
  const uint64_t payload_size = get<uint64_t>(bytes, 16);
  if (header_size < kRegistryHeaderSize || header_size > bytes.size())
    return refuse(fmt::format("header size {} outside [{}, {}]", header_size, kRegistryHeaderSize, bytes.size()));
  // The memfd holds exactly the registry (it is sized before it is
  // preserved), so fewer bytes than announced is a truncation; more is
  // tolerated and ignored.
  if (payload_size > bytes.size() - header_size)
    return refuse(fmt::format("{} payload bytes announced, {} present: truncated", payload_size,
                              bytes.size() - header_size));
  const auto payload = bytes.subspan(header_size, static_cast<size_t>(payload_size));
  const uint32_t crc = migration::crc32c(payload);
  if (crc != get<uint32_t>(bytes, 24))
    return refuse(fmt::format("checksum mismatch (CRC32C {:#010x}, header says {:#010x}): corrupted", crc,
                              get<uint32_t>(bytes, 24)));
  json body = json::parse(payload.begin(), payload.end(), nullptr, /*allow_exceptions=*/false);
  if (!body.is_object()) return refuse("the payload is not a JSON object");
  auto sessions = body.find("sessions");
  if (sessions == body.end() || !sessions->is_array()) return refuse("the payload has no 'sessions' array");
  if (auto at = body.find("sealed_at_ns"); at != body.end() && at->is_number_integer())
    registry.sealed_at_ns = at->get<int64_t>();
  if (auto pid = body.find("agent_pid"); pid != body.end() && pid->is_number_integer())
    registry.agent_pid = static_cast<pid_t>(pid->get<int64_t>());
  std::set<std::string> seen;
  for (size_t i = 0; i < sessions->size(); ++i) {
    const json& entry = (*sessions)[i];
    if (!entry.is_object()) return refuse(fmt::format("sessions[{}] is not an object", i));
    auto name = entry.find("name");
    if (name == entry.end() || !name->is_string()) return refuse(fmt::format("sessions[{}] has no string 'name'", i));
    RegistryEntry out;
    out.name = name->get<std::string>();
    if (auto valid = luo::validate_session_name(out.name); !valid)
      return refuse(fmt::format("sessions[{}]: {}", i, valid.error().describe()));
    if (!seen.insert(out.name).second) return refuse(fmt::format("sessions[{}]: '{}' twice", i, out.name));
    // Optional: a session created without restore arguments restores with
    // the defaults.
    if (auto args = entry.find("restore_args"); args != entry.end()) {
      auto parsed = parse_restore_args(*args);
      if (!parsed) return refuse(fmt::format("sessions[{}] '{}': {}", i, out.name, parsed.error().message));
      out.restore_args = std::move(*parsed);
    }
    registry.entries.push_back(std::move(out));
  }
  return registry;
}

}  // namespace vmm
