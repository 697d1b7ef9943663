// The control socket's commands, carried out on a Machine.
#pragma once

#include <chrono>
#include <functional>
#include <map>
#include <stop_token>
#include <string>

#include "vmm/control/handler.h"
#include "update/live_update.h"
#include "machine/machine.h"

namespace vmm {

class MachineCommands final : public control::CommandHandler {
 public:
  MachineCommands(Machine& machine, LiveUpdate& update);
  control::CommandResult execute(const std::string& command, const nlohmann::json& arguments) override;
  control::CommandResult execute(const std::string& command, const nlohmann::json& arguments,
                                 const control::CommandContext& context) override;

  // Names of every command, for error messages and docs.
  [[nodiscard]] std::vector<std::string> names() const;

 private:
  using Command = std::function<control::CommandResult(const nlohmann::json&, const control::CommandContext&)>;
  void add(std::string name, std::vector<std::string> allowed_arguments, Command command);

  control::CommandResult query_status();
  control::CommandResult query_memory(const nlohmann::json& arguments);
  control::CommandResult query_vcpus();
  control::CommandResult query_memory_hash();
  control::CommandResult query_guest();
  control::CommandResult guest_verify(const nlohmann::json& arguments, std::stop_token stop);

  struct Entry {
    std::vector<std::string> allowed_arguments;  // empty with checks_arguments: the command checks
    Command run;
    bool checks_arguments = false;
  };
  Machine& machine_;
  LiveUpdate& update_;
  std::map<std::string, Entry> commands_;
};

}  // namespace vmm
