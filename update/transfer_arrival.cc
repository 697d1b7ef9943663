// The transfer handover, new side (`vmm transfer-target`): build the VM on
// the memory the old process sends while its guest runs, then take it over.
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <thread>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "base/mapping.h"
#include "migration/state_blob.h"
#include "update/arrival.h"
#include "update/restore.h"
#include "update/transfer.h"

namespace vmm {
namespace {

using nlohmann::json;
using namespace std::chrono;

// What lives beside the VM in this process: the channel and the prefault.
struct TransferSide {
  explicit TransferSide(migration::FdChannel adopted) : channel(std::move(adopted)) {}
  migration::FdChannel channel;
  Mapping state_mapping;
  std::jthread prefault;
};

// A typed field of a message from the old vmm; a wrong type is a protocol
// error, never an exception.
template <typename T>
Result<T> field(const json& body, const char* key) {
  if (!body.contains(key)) return fail(fmt::format("the old vmm's message lacks '{}'", key), EPROTO);
  try {
    return body[key].get<T>();
  } catch (const json::exception&) {
    return fail(fmt::format("the old vmm's message has '{}' of the wrong type", key), EPROTO);
  }
}

// Fills this process's page tables for guest RAM, 64 MiB at a time, and
// tells the old process when it is done.
void prefault(std::stop_token stop, Machine& machine, const migration::FdChannel& channel) {
  const auto begin = steady_clock::now();
  constexpr uint64_t kChunk = 64ULL << 20;
  for (const auto& region : machine.memory().regions()) {
    for (uint64_t offset = 0; offset < region->size(); offset += kChunk) {
      if (stop.stop_requested()) return;
      if (auto done = region->populate_page_tables(offset, std::min(kChunk, region->size() - offset)); !done) {
        spdlog::warn("transfer: prefaulting '{}': {}", region->spec().name, done.error().describe());
        return;
      }
    }
  }
  const auto us = duration_cast<microseconds>(steady_clock::now() - begin).count();
  if (auto sent = transfer::send(channel, "prefaulted", {{"us", us}}); !sent)
    spdlog::debug("transfer: {}", sent.error().describe());
}

}  // namespace

std::variant<Arrival, int> arrive_by_transfer(const TransferArrivalOptions& options) {
  const auto started = steady_clock::now();
  auto adopted = migration::FdChannel::adopt(UniqueFd(options.channel_fd));
  if (!adopted) {
    spdlog::error("transfer-target: {}; this command is started by `live-update` in mode transfer",
                  adopted.error().describe());
    return 2;
  }
  auto side = std::make_shared<TransferSide>(std::move(*adopted));
  const migration::FdChannel& channel = side->channel;
  // Before "go" every failure is reported to the old process, which resumes
  // its own VM; nothing here has run the guest or written its memory.
  auto refuse = [&channel](const Error& error) {
    spdlog::error("transfer: cannot take the VM over: {}", error.describe());
    [[maybe_unused]] auto sent = transfer::send(channel, "error", {{"message", error.describe()}});
    return 1;
  };

  // --- prepare: build the VM on the same memory -----------------------------
  auto hello = transfer::receive(channel, "hello", seconds(30));
  if (!hello) return refuse(hello.error());
  const json& body = hello->body;
  auto layout = transfer::layout_from_json(body.contains("regions") ? body["regions"] : json::array());
  if (!layout) return refuse(layout.error());
  if (hello->fds.size() != layout->regions.size() + 1)
    return refuse(Error{EPROTO, fmt::format("got {} files for {} memory regions and the state", hello->fds.size(),
                                            layout->regions.size())});
  if (fault_injection_built() && body.contains("x-inject") && body["x-inject"] == to_string(Fault::target_refuses))
    return refuse(Error{EINVAL, "injected fault: the new vmm refuses to build the VM"});
  auto name = field<std::string>(body, "name");
  auto vcpus = field<uint32_t>(body, "vcpus");
  auto want_prefault = field<bool>(body, "prefault");
  if (!name || !vcpus || !want_prefault)
    return refuse(!name ? name.error() : !vcpus ? vcpus.error() : want_prefault.error());
  auto cpuid = transfer::cpuid_from_json(body.contains("cpuid") ? body["cpuid"] : json::array());
  if (!cpuid) return refuse(cpuid.error());
  UniqueFd state_fd = std::move(hello->fds.back());
  hello->fds.pop_back();
  MachineConfig config;
  apply_launch(options.launch, config);
  config.name = *name;
  config.vcpus = *vcpus;
  auto machine = Machine::prebuild(config, PrebuildInputs{std::move(*layout), std::move(hello->fds),
                                                          memory::SlotKind::userspace, false, std::move(*cpuid)});
  if (!machine) return refuse(machine.error());
  struct stat state_file{};
  if (::fstat(state_fd.get(), &state_file) != 0) return refuse(Error{errno, "cannot stat the state memfd"});
  auto state_mapping = Mapping::map_shared(state_fd.ref(), static_cast<size_t>(state_file.st_size));
  if (!state_mapping) return refuse(state_mapping.error());
  // Mapped in now, not when the state is read inside the blackout.
  if (auto mapped = state_mapping->populate_page_tables(); !mapped) return refuse(mapped.error());
  side->state_mapping = std::move(*state_mapping);
  const auto prebuild_us = duration_cast<microseconds>(steady_clock::now() - started).count();
  if (auto sent = transfer::send(channel, "ready", {{"pid", ::getpid()}, {"prebuild_us", prebuild_us}}); !sent) {
    spdlog::error("transfer: {}", sent.error().describe());
    return 1;
  }
  // The page tables fill while the old guest still runs; "ready" did not wait.
  if (*want_prefault)
    side->prefault = std::jthread(prefault, std::ref(**machine), std::cref(channel));

  // --- handover: wait for the state; the old process may also cancel --------
  auto handed = transfer::receive(channel, "state");
  if (!handed) {
    spdlog::info("transfer: the old vmm cancelled the update ({})", handed.error().describe());
    return 0;
  }
  const int64_t received_ns = monotonic_ns();
  if (handed->fds.empty()) return refuse(Error{EPROTO, "the state message carries no handover record"});
  UniqueFd record_fd = std::move(handed->fds.back());
  handed->fds.pop_back();
  auto bytes = read_handover_memfd(record_fd.ref());
  if (!bytes) return refuse(bytes.error());
  auto record = decode_handover(*bytes);
  if (!record) return refuse(record.error());
  for (const auto& slot : {record->listening_socket, record->connection})
    if (slot && *slot >= handed->fds.size())
      return refuse(Error{EPROTO, fmt::format("the handover record names descriptor {} of {}", *slot,
                                              handed->fds.size())});
  Arrival arrival;
  arrival.handover = std::move(*record);
  arrival.handover.record.mode = "transfer";
  const Fault fault = arrival.handover.fault;
  if (fault == Fault::target_crash) {
    spdlog::error("transfer: injected fault: the new vmm dies before it loaded the state");
    std::_Exit(3);
  }
  if (arrival.handover.listening_socket)
    arrival.listening_socket = std::move(handed->fds[*arrival.handover.listening_socket]);
  if (arrival.handover.connection) arrival.connection = std::move(handed->fds[*arrival.handover.connection]);
  const size_t state_bytes = arrival.handover.state_bytes;
  if (state_bytes > side->state_mapping.size())
    return refuse(Error{EPROTO, fmt::format("the state is {} bytes but its memfd only {}", state_bytes,
                                            side->state_mapping.size())});
  std::span<const uint8_t> blob(side->state_mapping.data(), state_bytes);
  std::vector<uint8_t> corrupted;
  if (fault == Fault::corrupt_state) {
    // A private copy: the memfd keeps the good blob for the old process.
    corrupted.assign(blob.begin(), blob.end());
    corrupted[corrupted.size() / 2] ^= 0x5a;
    blob = corrupted;
  }
  auto state = migration::decode(blob);
  if (!state) return refuse(state.error().with_context("the saved state is unusable"));
  UpdateRecord& update = arrival.handover.record;
  if (update.handover_started_ns > 0) update.add_phase("handover", nanoseconds(monotonic_ns() - update.handover_started_ns));

  // --- restore: load the state into the prebuilt VM ---------------------------
  arrival.restore_started = steady_clock::now();
  advance_clocks(*state, monotonic_ns() - static_cast<int64_t>(state->metadata.host_monotonic_ns_at_save));
  if (auto loaded = (*machine)->load_state(*state); !loaded) return refuse(loaded.error());
  update.generation = state->metadata.generation;
  arrival.was_running = state->metadata.was_running;
  arrival.resume_point = {state->test_device.heartbeat_at_save, state->metadata.guest_tsc_at_save, guest_tsc(*state),
                          arrival.was_running};
  spdlog::debug("transfer: state received {} us after the handover started",
                (received_ns - update.handover_started_ns) / 1000);
  arrival.machine = std::move(*machine);
  arrival.commit = [side, fault]() -> Result<void> {
    if (fault == Fault::delay_loaded) std::this_thread::sleep_for(milliseconds(500));
    VMM_TRY(transfer::send(side->channel, "loaded"));
    // Only the old process decides; "abort" and a closed channel both mean no.
    auto go = transfer::receive(side->channel, "go");
    if (!go) return std::unexpected(go.error().with_context("the old vmm did not hand the VM over"));
    return {};
  };
  arrival.after_resume = [side](UpdateRecord&) {
    // The old process may now tear its VM down.
    if (auto sent = transfer::send(side->channel, "resumed"); !sent)
      spdlog::debug("transfer: {}", sent.error().describe());
  };
  arrival.give_up = [side](const Error& error) {
    spdlog::error("transfer: cannot take the VM over: {}", error.describe());
    [[maybe_unused]] auto sent = transfer::send(side->channel, "error", {{"message", error.describe()}});
    return 1;
  };
  arrival.keep_alive = side;
  return arrival;
}

}  // namespace vmm
