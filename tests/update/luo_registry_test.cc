// The agent's registry (update/luo_registry.h): restore arguments with each
// session, seal-registry into a preserved memfd, and after a "kexec" of the
// fake kernel (FakeLuoKernel::kexec_into) a new agent that reads it back and
// starts one `vmm restore` per VM; corrupt registries refused.
#include <gtest/gtest.h>
#include <signal.h>
#include <spawn.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/memfd.h"
#include "migration/state_blob.h"
#include "tests/update/agent_fixture.h"
#include "tests/update/fake_luo_kernel.h"
#include "update/agent_backend.h"
#include "update/luo_agent.h"
#include "update/luo_registry.h"
#include "update/session_source.h"
#include "vmm/control/client.h"
#include "vmm/control/server.h"

namespace vmm {
namespace {

using nlohmann::json;
using testing::FakeLuoKernel;
using Argv = std::vector<std::string>;

class LuoRegistryTest : public testing::FakeKernelAgentTest {
 protected:
  void TearDown() override {
    for (pid_t pid : sleepers_) {
      ::kill(pid, SIGKILL);
      ::waitpid(pid, nullptr, 0);  // ECHILD when the agent reaped it already
    }
    next_agent_.reset();
    FakeKernelAgentTest::TearDown();
  }

  // A command that must succeed.
  json call(const std::string& command, const json& arguments = json::object()) {
    auto client = raw_client();
    auto reply = client.execute(command, arguments);
    EXPECT_TRUE(reply) << reply.error().describe();
    if (!reply) return nullptr;
    EXPECT_TRUE(*reply) << command << ": " << reply->error().desc;
    return *reply ? **reply : nullptr;
  }
  // A command that must fail: its error text.
  std::string refused(const std::string& command, const json& arguments) {
    auto client = raw_client();
    auto reply = client.execute(command, arguments);
    EXPECT_TRUE(reply) << reply.error().describe();
    if (!reply) return "";
    EXPECT_FALSE(*reply) << command << " " << arguments.dump() << " was accepted: " << (*reply)->dump();
    EXPECT_TRUE(client.take_received_fds().empty());
    return *reply ? "" : reply->error().desc;
  }

  // The kexec: the current fake kernel's live outgoing sessions cross into
  // next_, and a new agent opens it.
  void kexec() {
    kernel_.kexec_into(next_);
    FakeLuoKernel::current() = &next_;
    auto agent = LuoAgent::open("/dev/liveupdate", FakeLuoKernel::syscalls());
    ASSERT_TRUE(agent) << agent.error().describe();
    next_agent_ = std::move(*agent);
  }
  RestoreVmsOptions recording(std::vector<Argv>& spawned) {
    RestoreVmsOptions options;
    options.vmm = "/usr/bin/vmm";
    options.agent_socket = "/run/vmm/next-agent.sock";
    options.log_dir = dir_ + "/logs";
    // Records the argv and starts a sleeper in its place: a real child, so
    // the agent's reaping sees it running.
    options.spawn = [this, &spawned](const Argv& argv, FdRef log) -> Result<pid_t> {
      if (log.get() < 0) return fail("no log descriptor", EBADF);
      spawned.push_back(argv);
      const char* sleeper[] = {"/bin/sleep", "30", nullptr};
      pid_t pid = 0;
      if (int error = ::posix_spawn(&pid, sleeper[0], nullptr, nullptr, const_cast<char**>(sleeper), environ))
        return fail("cannot start /bin/sleep", error);
      sleepers_.push_back(pid);
      return pid;
    };
    return options;
  }
  // Puts `bytes` in the next kernel as the previous agent's registry.
  void hand_over_registry(std::span<const uint8_t> bytes) {
    UniqueFd memfd(::memfd_create("registry", MFD_CLOEXEC));
    ASSERT_TRUE(memfd);
    ASSERT_EQ(::pwrite(memfd.get(), bytes.data(), bytes.size(), 0), static_cast<ssize_t>(bytes.size()));
    next_.incoming_available[kRegistrySessionName] = {kRegistryToken};
    next_.incoming_files[kRegistrySessionName][kRegistryToken] = std::move(memfd);
  }

  FakeLuoKernel next_;
  std::unique_ptr<LuoAgent> next_agent_;
  std::vector<pid_t> sleepers_;
};

TEST_F(LuoRegistryTest, RestoreArgumentsAreKeptWithTheSessionAndListed) {
  auto luo = backend();
  ASSERT_TRUE(luo);
  EXPECT_TRUE(luo->connection().has_feature(kLuoAgentFeatureRestoreArgs));
  EXPECT_TRUE(luo->connection().has_feature(kLuoAgentFeatureRegistry));
  luo->set_restore_args({"--control-socket", "/run/vmm/vm1.sock", "--console", "none"});
  auto session = luo->create_session("vm1");
  ASSERT_TRUE(session) << session.error().describe();
  const json listed = agent_->list();
  ASSERT_EQ(listed["sessions"].size(), 1u);
  EXPECT_EQ(listed["sessions"][0]["restore"]["args"],
            json::array({"--control-socket", "/run/vmm/vm1.sock", "--console", "none"}));
  EXPECT_TRUE(listed["registry"].is_null());
  // Without restore arguments the entry has no "restore".
  auto plain = backend();
  ASSERT_TRUE(plain);
  auto second = plain->create_session("vm2");
  ASSERT_TRUE(second);
  for (const auto& entry : agent_->list()["sessions"])
    if (entry["name"] == "vm2") {
      EXPECT_FALSE(entry.contains("restore")) << entry.dump();
    }
}

TEST_F(LuoRegistryTest, TheSessionSourcePassesTheLaunchOptionsOn) {
  LaunchOptions launch;
  launch.control_socket_path = "/run/vmm/vm9.sock";
  launch.console = "none";
  launch.log_level = "debug";
  EXPECT_EQ(restore_arguments(launch), (Argv{"--control-socket", "/run/vmm/vm9.sock", "--console", "none",
                                             "--log-level", "debug", "--kvm-device", "/dev/kvm"}));
  launch.control_socket_path.clear();
  launch.console = "relative.console";
  const Argv args = restore_arguments(launch);
  ASSERT_GE(args.size(), 2u);
  EXPECT_EQ(args[0], "--console");
  EXPECT_EQ(args[1], (std::filesystem::current_path() / "relative.console").string()) << "the agent runs elsewhere";

  SessionSourceOptions options;
  options.agent_socket = path_;
  options.agent_required = true;
  options.syscalls = FakeLuoKernel::syscalls();
  options.restore_args = Argv{"--console", "none"};
  auto source = open_session_source(options);
  ASSERT_TRUE(source) << source.error().describe();
  ASSERT_EQ(source->kind, "agent");
  auto session = source->backend->create_session("vm3");
  ASSERT_TRUE(session) << session.error().describe();
  EXPECT_EQ(agent_->list()["sessions"][0]["restore"]["args"], json::array({"--console", "none"}));
}

TEST_F(LuoRegistryTest, BadRestoreArgumentsAreRefusedClearly) {
  const auto create = [](json restore) { return json{{"name", "vm"}, {"restore", std::move(restore)}}; };
  EXPECT_NE(refused("create-session", create(json::array())).find("must be an object"), std::string::npos);
  EXPECT_NE(refused("create-session", create(json::object())).find("needs 'args'"), std::string::npos);
  EXPECT_NE(refused("create-session", create(json{{"args", "--console none"}})).find("must be an array of strings"),
            std::string::npos);
  EXPECT_NE(refused("create-session", create(json{{"args", json::array({"--console", 7})}})).find("restore.args[1] must be a string"),
            std::string::npos);
  EXPECT_NE(refused("create-session", create(json{{"args", json::array()}, {"env", 1}})).find("restore.env"),
            std::string::npos);
  EXPECT_NE(refused("create-session", create(json{{"args", json::array({"--session", "other"})}})).find("leave --session out"),
            std::string::npos);
  EXPECT_NE(refused("create-session", create(json{{"args", json::array({"--session=other"})}})).find("leave --session out"),
            std::string::npos);
  EXPECT_NE(refused("create-session", create(json{{"args", json::array({"--luo-agent", "/x"})}})).find("leave --luo-agent out"),
            std::string::npos);
  EXPECT_NE(refused("create-session", create(json{{"args", json::array({std::string("a\0b", 3)})}})).find("NUL"),
            std::string::npos);
  EXPECT_NE(refused("create-session", create(json{{"args", json(Argv(kMaxRestoreArgs + 1, "-v"))}}))
                .find("more than the 64 allowed"),
            std::string::npos);
  // One argument too long for its bound, in a line the agent still reads.
  auto too_long = parse_restore_args(json::array({std::string(kMaxRestoreArgBytes + 1, 'x')}));
  ASSERT_FALSE(too_long);
  EXPECT_NE(too_long.error().message.find("more than the 1024 allowed"), std::string::npos);
  EXPECT_NE(refused("create-session", json{{"name", kRegistrySessionName}}).find("the agent's own registry"),
            std::string::npos);
  EXPECT_TRUE(agent_->list()["sessions"].empty()) << "nothing refused is held";
  EXPECT_TRUE(call("create-session", create(json{{"args", json::array({"--console", "none"})}})).is_object());
}

TEST_F(LuoRegistryTest, ARegistryCrossesTheKexecAndBringsEveryVmBack) {
  auto first = backend();
  auto second = backend();
  ASSERT_TRUE(first && second);
  first->set_restore_args({"--control-socket", "/run/vmm/vm-a.sock", "--console", "/var/log/vmm/vm-a.console"});
  auto a = first->create_session("vm-a");
  auto b = second->create_session("vm-b");  // an older vmm: no restore arguments
  ASSERT_TRUE(a && b);
  const json sealed = call("seal-registry");
  EXPECT_EQ(sealed["sealed"], json::array({"vm-a", "vm-b"})) << sealed.dump();
  EXPECT_EQ(sealed["session"], kRegistrySessionName);
  EXPECT_EQ(sealed["format"], "1.0");
  EXPECT_TRUE(kernel_.alive(kRegistrySessionName));
  EXPECT_EQ(agent_->list()["registry"]["sealed"], json::array({"vm-a", "vm-b"}));

  kexec();
  EXPECT_TRUE(next_.incoming_available.contains("vm-a"));
  EXPECT_TRUE(next_.incoming_available.contains(kRegistrySessionName));
  std::vector<Argv> spawned;
  EXPECT_EQ(next_agent_->restore_vms(recording(spawned)), 2u);
  ASSERT_EQ(spawned.size(), 2u);
  EXPECT_EQ(spawned[0], (Argv{"/usr/bin/vmm", "restore", "--session", "vm-a", "--luo-agent",
                              "/run/vmm/next-agent.sock", "--control-socket", "/run/vmm/vm-a.sock", "--console",
                              "/var/log/vmm/vm-a.console"}));
  EXPECT_EQ(spawned[1], (Argv{"/usr/bin/vmm", "restore", "--session", "vm-b", "--luo-agent",
                              "/run/vmm/next-agent.sock"}));
  EXPECT_TRUE(std::filesystem::exists(dir_ + "/logs/vm-a.restore.log"));
  // The registry's session is done with; the VMs' own stay for their restores.
  EXPECT_FALSE(next_.alive(kRegistrySessionName)) << "the registry session must be finished and dropped";
  {
    std::lock_guard lock(next_.mutex);
    for (const auto& [ino, session] : next_.sessions)
      if (session.name == kRegistrySessionName) {
        EXPECT_TRUE(session.finished);
      }
  }
  EXPECT_TRUE(next_agent_->list()["registry"].is_null());
  const json restores = next_agent_->list_restores()["restores"];
  ASSERT_EQ(restores.size(), 2u);
  EXPECT_EQ(restores[0]["name"], "vm-a");
  ASSERT_EQ(sleepers_.size(), 2u);
  EXPECT_EQ(restores[0]["pid"], sleepers_[0]);
  EXPECT_EQ(restores[0]["state"], "running");
  EXPECT_EQ(restores[0]["argv"], json(spawned[0]));

  // While the agent's restore of vm-a runs, nobody else gets its session.
  std::vector<UniqueFd> fds;
  control::CommandContext other;
  other.peer_pid = sleepers_[1];  // vm-b's restore
  other.reply_fds = &fds;
  auto taken = next_agent_->execute("retrieve-session", json{{"name", "vm-a"}}, other);
  ASSERT_FALSE(taken);
  EXPECT_NE(taken.error().desc.find("is being restored by pid"), std::string::npos) << taken.error().desc;
  control::CommandContext own;
  own.peer_pid = sleepers_[0];
  own.reply_fds = &fds;
  auto given = next_agent_->execute("retrieve-session", json{{"name", "vm-a"}}, own);
  ASSERT_TRUE(given) << given.error().desc;
  EXPECT_EQ(fds.size(), 1u);
  // Once it ended (failed), anyone may retry.
  ::kill(sleepers_[0], SIGKILL);
  json ended;
  for (int i = 0; i < 200; ++i) {
    ended = next_agent_->list_restores()["restores"][0];
    if (ended["state"] != "running") break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(ended["state"], "killed") << ended.dump();
  EXPECT_EQ(ended["signal"], SIGKILL);
  EXPECT_TRUE(next_agent_->execute("retrieve-session", json{{"name", "vm-a"}}, other));
}

TEST_F(LuoRegistryTest, SealingAgainReplacesAndUnsealDrops) {
  auto luo = backend();
  ASSERT_TRUE(luo);
  auto a = luo->create_session("vm-a");  // held: destroying it would cancel it
  ASSERT_TRUE(a);
  EXPECT_EQ(call("seal-registry")["sealed"], json::array({"vm-a"}));
  auto late = luo->create_session("vm-late");
  ASSERT_TRUE(late);
  EXPECT_EQ(call("seal-registry")["sealed"], json::array({"vm-a", "vm-late"}));
  {
    // One registry session in the kernel: the first was dropped.
    std::lock_guard lock(kernel_.mutex);
    int alive = 0;
    for (const auto& [ino, session] : kernel_.sessions) {
      pollfd ready{session.watch.get(), POLLIN, 0};
      alive += session.name == kRegistrySessionName && ::poll(&ready, 1, 0) == 0;
    }
    EXPECT_EQ(alive, 1);
  }
  EXPECT_EQ(call("unseal-registry")["unsealed"], true);
  EXPECT_FALSE(kernel_.alive(kRegistrySessionName));
  EXPECT_EQ(call("unseal-registry")["unsealed"], false) << "unseal is idempotent: a cancel may run twice";
  EXPECT_TRUE(agent_->list()["registry"].is_null());

  // Unsealed: the next kernel has no registry and restores nothing.
  kexec();
  EXPECT_TRUE(next_.incoming_available.contains("vm-a")) << "the VMs' sessions cross anyway";
  std::vector<Argv> spawned;
  EXPECT_EQ(next_agent_->restore_vms(recording(spawned)), 0u);
  EXPECT_TRUE(spawned.empty());
  EXPECT_TRUE(next_agent_->list_restores()["restores"].empty());
}

TEST_F(LuoRegistryTest, TheRestoresRunAndAreReaped) {
  ASSERT_TRUE(
      call("create-session", json{{"name", "vm-true"}, {"restore", {{"args", json::array({"--console", "none"})}}}}).is_object());
  ASSERT_TRUE(call("seal-registry").is_object());
  kexec();
  RestoreVmsOptions options;
  options.vmm = "/bin/true";  // a harmless binary: the argv is what a vmm would get
  options.agent_socket = path_;
  options.log_dir = dir_ + "/logs";
  ASSERT_EQ(next_agent_->restore_vms(options), 1u);
  json restore;
  for (int i = 0; i < 200; ++i) {
    restore = next_agent_->list_restores()["restores"][0];
    if (restore["state"] != "running") break;
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(restore["state"], "exited") << restore.dump();
  EXPECT_EQ(restore["status"], 0) << restore.dump();
  EXPECT_GT(restore["pid"].get<pid_t>(), 0);
  EXPECT_FALSE(next_agent_->restores_running());
}

TEST_F(LuoRegistryTest, ARestoreThatCannotStartIsListed) {
  ASSERT_TRUE(call("create-session", json{{"name", "vm-x"}}).is_object());
  ASSERT_TRUE(call("seal-registry").is_object());
  kexec();
  RestoreVmsOptions options;
  options.vmm = dir_ + "/no-such-vmm";
  options.agent_socket = path_;
  options.log_dir = dir_ + "/logs";
  ASSERT_EQ(next_agent_->restore_vms(options), 1u);
  const json restore = next_agent_->list_restores()["restores"][0];
  EXPECT_EQ(restore["state"], "not-started") << restore.dump();
  EXPECT_TRUE(restore["pid"].is_null());
  EXPECT_NE(restore["error"].get<std::string>().find("no-such-vmm"), std::string::npos) << restore.dump();
  EXPECT_TRUE(next_.incoming_available.contains("vm-x")) << "its session is still there for a restore by hand";
}

// A valid registry's bytes, to corrupt.
std::vector<uint8_t> valid_registry() {
  Registry registry;
  registry.entries = {RegistryEntry{"vm-a", {"--console", "none"}}, RegistryEntry{"vm-b", {}}};
  registry.agent_pid = 42;
  return encode_registry(registry);
}

void reseal(std::vector<uint8_t>& bytes) {
  const uint32_t crc = migration::crc32c(std::span<const uint8_t>(bytes).subspan(kRegistryHeaderSize));
  std::memcpy(bytes.data() + 24, &crc, sizeof crc);
}

TEST(LuoRegistryFormat, RoundTripsAndToleratesAddedOptionalFields) {
  auto decoded = decode_registry(valid_registry());
  ASSERT_TRUE(decoded) << decoded.error().describe();
  EXPECT_EQ(decoded->entries, (std::vector<RegistryEntry>{{"vm-a", {"--console", "none"}}, {"vm-b", {}}}));
  EXPECT_EQ(decoded->agent_pid, 42);

  // A newer minor version: a longer header, fields this reader does not know.
  const std::string payload =
      json{{"sessions", {{{"name", "vm-a"}, {"restore_args", json::array({"-x"})}, {"memory_bytes", 1 << 30}}}},
           {"host", "h1"}}
          .dump();
  std::vector<uint8_t> newer(40 + payload.size());
  std::memcpy(newer.data(), kRegistryMagic, 8);
  const uint16_t major = kRegistryMajor, minor = 7;
  const uint32_t header = 40;
  const uint64_t size = payload.size();
  std::memcpy(newer.data() + 8, &major, 2);
  std::memcpy(newer.data() + 10, &minor, 2);
  std::memcpy(newer.data() + 12, &header, 4);
  std::memcpy(newer.data() + 16, &size, 8);
  std::memcpy(newer.data() + 40, payload.data(), payload.size());
  const uint32_t crc = migration::crc32c(std::span<const uint8_t>(newer).subspan(40));
  std::memcpy(newer.data() + 24, &crc, 4);
  auto tolerated = decode_registry(newer);
  ASSERT_TRUE(tolerated) << tolerated.error().describe();
  EXPECT_EQ(tolerated->minor, 7);
  EXPECT_EQ(tolerated->entries, (std::vector<RegistryEntry>{{"vm-a", {"-x"}}}));
}

TEST(LuoRegistryFormat, CorruptRegistriesAreRefusedClearly) {
  const auto refusal = [](std::vector<uint8_t> bytes) {
    auto decoded = decode_registry(bytes);
    EXPECT_FALSE(decoded) << "accepted a corrupt registry";
    if (decoded) return std::string();
    EXPECT_EQ(decoded.error().code, EPROTO);
    EXPECT_NE(decoded.error().message.find("no VM is restored from it"), std::string::npos);
    return decoded.error().message;
  };
  std::vector<uint8_t> bytes = valid_registry();
  auto bad_magic = bytes;
  bad_magic[0] = 'X';
  EXPECT_NE(refusal(bad_magic).find("bad magic"), std::string::npos);
  auto bad_crc = bytes;
  bad_crc.back() ^= 1;
  EXPECT_NE(refusal(bad_crc).find("checksum mismatch"), std::string::npos);
  auto major = bytes;
  major[8] = 2;
  EXPECT_NE(refusal(major).find("format 2.0, and this agent reads only major version 1"), std::string::npos);
  EXPECT_NE(refusal({bytes.begin(), bytes.begin() + 20}).find("truncated"), std::string::npos);
  EXPECT_NE(refusal({bytes.begin(), bytes.end() - 3}).find("truncated"), std::string::npos);
  // Well sealed, but what it says is not a registry's.
  for (const char* payload : {"[]", "{}", "{\"sessions\":[{\"name\":\"\"}]}",
                              "{\"sessions\":[{\"name\":\"a\"},{\"name\":\"a\"}]}",
                              "{\"sessions\":[{\"name\":\"a\",\"restore_args\":[\"--session\",\"b\"]}]}", "{not json"}) {
    std::vector<uint8_t> body(bytes.begin(), bytes.begin() + kRegistryHeaderSize);
    body.insert(body.end(), payload, payload + std::strlen(payload));
    const uint64_t size = std::strlen(payload);
    std::memcpy(body.data() + 16, &size, sizeof size);
    reseal(body);
    EXPECT_FALSE(refusal(body).empty()) << payload;
  }
}

TEST_F(LuoRegistryTest, AnUnusableRegistryRestoresNothingAndStaysHeld) {
  auto bytes = valid_registry();
  bytes[kRegistryHeaderSize + 2] ^= 0x20;  // a bit flipped in the payload
  kexec();
  hand_over_registry(bytes);
  std::vector<Argv> spawned;
  EXPECT_EQ(next_agent_->restore_vms(recording(spawned)), 0u);
  EXPECT_TRUE(spawned.empty());
  EXPECT_TRUE(next_.alive(kRegistrySessionName)) << "kept for an operator to look at";
  const json registry = next_agent_->list()["registry"];
  EXPECT_EQ(registry["direction"], "incoming") << registry.dump();
  EXPECT_NE(registry["error"].get<std::string>().find("checksum mismatch"), std::string::npos) << registry.dump();
  // seal-registry refuses until it is dropped.
  auto refused_seal = next_agent_->execute("seal-registry", json::object());
  ASSERT_FALSE(refused_seal);
  EXPECT_NE(refused_seal.error().desc.find("unseal-registry drops it"), std::string::npos);
  auto dropped = next_agent_->execute("unseal-registry", json::object());
  ASSERT_TRUE(dropped);
  EXPECT_FALSE(next_.alive(kRegistrySessionName));
}

}  // namespace
}  // namespace vmm
