#include "tools/host_update.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "luo/kexec.h"
#include "update/luo_agent.h"
#include "vmm/control/client.h"

namespace vmm::tools {
namespace {

using nlohmann::json;
using namespace std::chrono;
using control::Client;

constexpr milliseconds kQueryTimeout = seconds(10);
constexpr milliseconds kPollInterval = milliseconds(20);

// One vmm taking part: a connection for queries and the coordinator's
// commands, and a thread that sent live-update on a second connection and
// waits for its reply (which comes only when the update failed or was
// cancelled: on success the host kexecs first).
struct Participant {
  std::string socket;
  std::string name;
  Client control;
  std::thread updater;
  std::atomic<bool> replied{false};
  std::atomic<bool> gone{false};  // its connection broke: the vmm died (or cannot answer)
  std::mutex mutex;
  std::string reply;  // the live-update's error, once replied

  Participant(std::string socket_path, std::string vm_name, Client client)
      : socket(std::move(socket_path)), name(std::move(vm_name)), control(std::move(client)) {}
  Participant(const Participant&) = delete;
  Participant& operator=(const Participant&) = delete;
  ~Participant() {
    if (updater.joinable()) updater.join();
  }

  std::string reply_text() {
    std::lock_guard lock(mutex);
    return reply;
  }
};

bool is_luo_agent(const Client& client) {
  const json& greeting = client.greeting();
  return greeting.contains("QMP") && greeting["QMP"].contains("version") &&
         greeting["QMP"]["version"].contains("luo-agent");
}

// The sockets in `dir` (links to sockets included), sorted.
Result<std::vector<std::string>> sockets_in(const std::string& dir) {
  std::vector<std::string> sockets;
  std::error_code error;
  for (const auto& entry : std::filesystem::directory_iterator(dir, error))
    if (entry.is_socket(error)) sockets.push_back(entry.path().string());
  if (error) return fail(fmt::format("cannot list the vmm sockets in {}: {}", dir, error.message()), error.value());
  std::ranges::sort(sockets);
  return sockets;
}

// Every vmm with a control socket in `dir`. A socket nobody listens on (a
// vmm that is gone) is passed over; one whose vmm does not answer is an
// error: the kexec would take its VM down with the host.
Result<std::vector<std::unique_ptr<Participant>>> discover(const std::string& dir) {
  VMM_TRY_ASSIGN(sockets, sockets_in(dir));
  std::vector<std::unique_ptr<Participant>> found;
  for (const auto& socket : sockets) {
    auto client = Client::connect(socket, kQueryTimeout);
    if (!client && client.error().code == ECONNREFUSED) {
      spdlog::warn("host-update: {}: nobody listens there (a vmm that is gone): passed over", socket);
      continue;
    }
    if (!client)
      return fail(fmt::format("{}: {}; the host kexec would take this VM down with it: stop that vmm or find out "
                              "why it does not answer, then run host-update again",
                              socket, client.error().describe()),
                  client.error().code);
    if (is_luo_agent(*client)) continue;
    VMM_TRY(with_context(client->negotiate(), socket));
    VMM_TRY_ASSIGN(status, with_context(client->execute("query-status"), socket));
    if (!status) return fail(fmt::format("{}: query-status: {}", socket, status.error().desc));
    const std::string name = status->value("name", std::filesystem::path(socket).stem().string());
    found.push_back(std::make_unique<Participant>(socket, name, std::move(*client)));
  }
  if (found.empty())
    return fail(fmt::format("no vmm answers in {}: nothing to update (start VMs with --control-socket {}/NAME.sock, "
                            "or name the folder with --dir)",
                            dir, dir),
                ENOENT);
  return found;
}

// Sends live-update on its own connection; the reply is kept when it comes.
void start_update(Participant& vm, milliseconds reply_timeout) {
  vm.updater = std::thread([&vm, reply_timeout] {
    std::string outcome;
    auto client = Client::connect(vm.socket, reply_timeout);
    if (!client) {
      outcome = client.error().describe();
      vm.gone = true;
    } else if (auto negotiated = client->negotiate(); !negotiated) {
      outcome = negotiated.error().describe();
    } else {
      auto result = client->execute("live-update", {{"mode", "kexec"}, {"coordinated", true}});
      if (!result) {
        outcome = result.error().describe();
        vm.gone = true;
      }
      else if (!*result) outcome = result->error().desc;
      else outcome = "the update reported success without a kexec";
    }
    {
      std::lock_guard lock(vm.mutex);
      vm.reply = std::move(outcome);
    }
    vm.replied = true;
  });
}

// Where the VM's update waits now ("freeze", "kexec"), or nothing.
std::string waiting_at(Participant& vm) {
  auto result = vm.control.execute("query-live-update");
  if (!result || !*result) return "";
  return (*result)->value("waiting", "");
}

// Waits until every VM waits at `gate`. Fails naming the first VM whose
// update ended instead, or that is not there by the deadline.
Result<void> wait_for_gate(std::vector<std::unique_ptr<Participant>>& vms, const std::string& gate,
                           milliseconds timeout) {
  const auto deadline = steady_clock::now() + timeout;
  std::vector<bool> there(vms.size(), false);
  while (true) {
    bool all = true;
    for (size_t i = 0; i < vms.size(); ++i) {
      if (there[i]) continue;
      Participant& vm = *vms[i];
      if (vm.replied)
        return fail(fmt::format("VM '{}' ({}) did not reach the {} gate: {}", vm.name, vm.socket, gate,
                                vm.reply_text()));
      there[i] = waiting_at(vm) == gate;
      all = all && there[i];
    }
    if (all) return {};
    if (steady_clock::now() >= deadline) {
      for (size_t i = 0; i < vms.size(); ++i)
        if (!there[i])
          return fail(fmt::format("VM '{}' ({}) did not reach the {} gate within {} ms", vms[i]->name,
                                  vms[i]->socket, gate, timeout.count()),
                      ETIMEDOUT);
    }
    std::this_thread::sleep_for(kPollInterval);
  }
}

// Every VM whose update still runs is told to cancel; then each reply is
// awaited, so the outcome says what became of every guest.
json cancel_all(std::vector<std::unique_ptr<Participant>>& vms, const std::string& reason) {
  for (auto& vm : vms) {
    if (vm->replied) continue;
    auto cancelled = vm->control.execute("live-update-cancel", {{"reason", reason}});
    if (!cancelled || !*cancelled) {
      // Not at a gate yet (still preparing): it reaches one and finds the
      // cancel there, or it fails on its own. Either way its reply comes.
      spdlog::debug("host-update: {}: live-update-cancel: {}", vm->name,
                    !cancelled ? cancelled.error().describe() : cancelled->error().desc);
    }
  }
  json outcome = json::array();
  for (auto& vm : vms) {
    if (vm->updater.joinable()) vm->updater.join();
    outcome.push_back(
        {{"name", vm->name}, {"socket", vm->socket}, {"update", vm->reply_text()}, {"vmm_gone", vm->gone.load()}});
  }
  return outcome;
}

// The agent's registry of sessions (the new kernel's agent restores from
// it), when an agent runs. Empty when there is none.
Result<std::optional<Client>> agent_for_registry(const std::string& agent_socket) {
  const bool named = !agent_socket.empty();
  const std::string path = named ? agent_socket : kDefaultLuoAgentSocket;
  if (!named && !std::filesystem::exists(path)) return std::optional<Client>();
  auto client = Client::connect(path, kQueryTimeout);
  if (!client) {
    if (named) return std::unexpected(client.error().with_context("the LUO agent named by --agent"));
    spdlog::warn("host-update: no LUO agent answers at {} ({}): the new kernel's vmms are restored by whoever "
                 "starts `vmm restore`",
                 path, client.error().describe());
    return std::optional<Client>();
  }
  if (!is_luo_agent(*client)) return fail(fmt::format("{} is not a LUO agent's socket", path), EPROTO);
  VMM_TRY(client->negotiate());
  return std::optional<Client>(std::move(*client));
}

}  // namespace

int run_host_update(const HostUpdateOptions& options, std::ostream& out) {
  auto print = [&out](const json& outcome) { out << outcome.dump() << '\n' << std::flush; };
  if (options.kernel.empty()) {
    spdlog::error("host-update: --kernel names the new kernel's image");
    return 2;
  }
  for (const std::string* image : {&options.kernel, &options.initrd})
    if (!image->empty() && ::access(image->c_str(), R_OK) != 0) {
      spdlog::error("host-update: cannot read '{}': {}", *image, std::strerror(errno));
      return 2;
    }
  auto discovered = discover(options.socket_dir);
  if (!discovered) {
    spdlog::error("host-update: {}", discovered.error().describe());
    return 2;
  }
  auto agent = agent_for_registry(options.agent_socket);
  if (!agent) {
    spdlog::error("host-update: {}", agent.error().describe());
    return 2;
  }
  std::vector<std::unique_ptr<Participant>> vms = std::move(*discovered);
  spdlog::info("host-update: {} VMs: preparing them (their guests keep running)", vms.size());
  const auto started = steady_clock::now();
  luo::Kexec kexec;  // unloads what it loaded unless it rebooted into it
  bool sealed = false;
  auto give_up = [&](const std::string& why) {
    spdlog::error("host-update: {}: cancelling the upgrade; every VM resumes", why);
    json outcome = cancel_all(vms, why);
    // A vmm that died mid-update left its outgoing session with the agent,
    // which would otherwise carry it, and a restore of a VM whose state was
    // never saved, into the next kexec.
    if (*agent) {
      for (auto& vm : vms) {
        if (!vm->gone) continue;
        auto released = (*agent)->execute("release-session", {{"name", vm->name}});
        if (!released || !*released)
          spdlog::warn("host-update: the LUO agent kept the session of '{}', whose vmm is gone: {}", vm->name,
                       !released ? released.error().describe() : released->error().desc);
        else
          spdlog::info("host-update: released the session of '{}', whose vmm is gone", vm->name);
      }
    }
    if (sealed && *agent) {
      if (auto unsealed = (*agent)->execute("unseal-registry"); !unsealed || !*unsealed)
        spdlog::error("host-update: the LUO agent kept its registry: {}",
                      !unsealed ? unsealed.error().describe() : unsealed->error().desc);
    }
    if (auto unloaded = kexec.unload(); !unloaded) spdlog::error("host-update: {}", unloaded.error().describe());
    print({{"status", "cancelled"}, {"reason", why}, {"vms", outcome}});
    return 1;
  };

  // A reply can take as long as both gates may.
  const milliseconds reply_timeout = options.prepare_timeout + options.freeze_timeout + seconds(60);
  for (auto& vm : vms) start_update(*vm, reply_timeout);
  if (auto prepared = wait_for_gate(vms, "freeze", options.prepare_timeout); !prepared)
    return give_up(prepared.error().describe());
  const auto prepared_at = steady_clock::now();

  // Once, for every VM, with every guest still running.
  std::string cmdline = options.cmdline;
  if (cmdline.empty()) {
    auto current = luo::Kexec::current_cmdline();
    if (!current) return give_up(current.error().describe());
    cmdline = *current;
  }
  if (auto loaded = kexec.load(luo::KexecImage{options.kernel,
                                               options.initrd.empty() ? std::nullopt : std::optional(options.initrd),
                                               cmdline});
      !loaded)
    return give_up(loaded.error().describe());

  spdlog::info("host-update: every VM prepared and the kernel is loaded: freezing them");
  for (auto& vm : vms) {
    auto proceeded = vm->control.execute("live-update-continue");
    if (!proceeded || !*proceeded)
      return give_up(fmt::format("VM '{}' cannot freeze: {}", vm->name,
                                 !proceeded ? proceeded.error().describe() : proceeded->error().desc));
  }
  if (auto frozen = wait_for_gate(vms, "kexec", options.freeze_timeout); !frozen)
    return give_up(frozen.error().describe());
  const auto frozen_at = steady_clock::now();
  json names = json::array();
  for (auto& vm : vms) names.push_back(vm->name);
  if (*agent) {
    auto registry = (*agent)->execute("seal-registry");
    if (!registry || !*registry)
      return give_up("the LUO agent cannot record the sessions for the new kernel: " +
                     (!registry ? registry.error().describe() : registry->error().desc));
    sealed = true;
  }
  print({{"status", "kexec"},
         {"vms", names},
         {"prepare_ms", duration_cast<milliseconds>(prepared_at - started).count()},
         {"freeze_ms", duration_cast<milliseconds>(frozen_at - prepared_at).count()},
         {"registry", sealed}});
  spdlog::info("host-update: {} VMs frozen: kexec", vms.size());
  ::sync();
  auto rebooted = kexec.reboot();
  return give_up("the kexec failed: " + (rebooted ? std::string("reboot returned") : rebooted.error().describe()));
}

int run_host_report(const std::string& socket_dir, std::ostream& out) {
  auto sockets = sockets_in(socket_dir);
  if (!sockets) {
    spdlog::error("host-report: {}", sockets.error().describe());
    return 2;
  }
  json vms = json::array();
  bool all_completed = true;
  int64_t longest = -1;
  std::string longest_name;
  for (const auto& socket : *sockets) {
    json entry = {{"socket", socket}};
    auto client = Client::connect(socket, kQueryTimeout);
    if (client && is_luo_agent(*client)) continue;
    if (client) {
      if (auto negotiated = client->negotiate(); !negotiated) client = std::unexpected(negotiated.error());
    }
    std::optional<json> record;
    if (client) {
      if (auto status = client->execute("query-status"); status && *status) entry["name"] = (*status)->value("name", "");
      if (auto update = client->execute("query-live-update"); update && *update) record = **update;
    }
    if (!record) {
      entry["error"] = client ? "no answer to query-live-update" : client.error().describe();
      all_completed = false;
      vms.push_back(entry);
      continue;
    }
    for (const char* key : {"status", "mode", "generation", "blackout_us", "guest_gap_us", "phases"})
      if (record->contains(key)) entry[key] = (*record)[key];
    if (record->value("status", "") != "completed") all_completed = false;
    if (record->contains("blackout_us") && (*record)["blackout_us"].is_number_integer() &&
        (*record)["blackout_us"].get<int64_t>() > longest) {
      longest = (*record)["blackout_us"].get<int64_t>();
      longest_name = entry.value("name", socket);
    }
    vms.push_back(entry);
  }
  json report = {{"vms", vms}, {"restored", std::ranges::count_if(vms, [](const json& vm) {
                                  return vm.value("status", "") == "completed";
                                })}};
  if (longest >= 0) report["longest_blackout"] = {{"name", longest_name}, {"blackout_us", longest}};
  out << report.dump(2) << '\n' << std::flush;
  return all_completed && !vms.empty() ? 0 : 1;
}

}  // namespace vmm::tools
