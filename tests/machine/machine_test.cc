// Machine on a real VM (the embedded test guest): the update state
// (UpdateLease) and the lock discipline of pause/resume (issue 10, A and B).
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <future>
#include <thread>

#include <fcntl.h>

#include "kvm/system.h"
#include "machine/machine.h"

namespace vmm {
namespace {

using namespace std::chrono_literals;

class MachineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto system = kvm::System::open();
    if (!system) GTEST_SKIP() << "/dev/kvm not available: " << system.error().describe();
    MachineConfig config;
    config.name = "machine-test";
    config.ram_size = 64ULL << 20;
    config.vcpus = 2;
    config.console = ConsoleKind::none;
    auto caps = system->probe();
    if (caps && !caps->guest_memfd_mmap()) config.ram_backing = memory::Backing::memfd;
    customize(config);
    auto machine = Machine::create(config);
    ASSERT_TRUE(machine.has_value()) << machine.error().describe();
    machine_ = std::move(*machine);
    ASSERT_TRUE(machine_->start().has_value());
  }

  // Runs `work` on another thread; a call that has not returned within
  // `limit` is a deadlock, and this process cannot go on past it.
  template <class Work>
  static auto within(std::chrono::milliseconds limit, Work work) {
    auto done = std::make_shared<std::promise<decltype(work())>>();
    auto future = done->get_future();
    std::thread([done, work]() mutable { done->set_value(work()); }).detach();
    if (future.wait_for(limit) != std::future_status::ready) {
      std::fprintf(stderr, "FATAL: a Machine call did not return within %lld ms (deadlock)\n",
                   static_cast<long long>(limit.count()));
      std::fflush(stderr);
      std::_Exit(1);
    }
    return future.get();
  }

  virtual void customize(MachineConfig&) {}

  std::unique_ptr<Machine> machine_;
};

bool busy(const Error& error) {
  return error.code == EBUSY && error.message.find("a live update is in progress; retry when it ends") !=
                                    std::string::npos;
}

TEST_F(MachineTest, TheLeaseAloneMovesTheVcpusDuringAnUpdate) {
  auto lease = machine_->begin_update();
  ASSERT_TRUE(lease.has_value()) << lease.error().describe();
  EXPECT_TRUE(machine_->update_in_progress());

  auto second = machine_->begin_update();
  ASSERT_FALSE(second.has_value());
  EXPECT_EQ(second.error().code, EBUSY);
  EXPECT_EQ(second.error().message, "a live update is already in progress");

  auto paused = machine_->pause();
  ASSERT_FALSE(paused.has_value());
  EXPECT_TRUE(busy(paused.error())) << paused.error().describe();
  EXPECT_EQ(machine_->run_state(), RunState::running);
  auto verify = machine_->verify_guest(1s);
  ASSERT_FALSE(verify.has_value());
  EXPECT_TRUE(busy(verify.error())) << verify.error().describe();
  auto quit = machine_->quit("test");
  ASSERT_FALSE(quit.has_value());
  EXPECT_TRUE(busy(quit.error())) << quit.error().describe();
  EXPECT_TRUE(machine_->shutdown_reason().empty()) << "a refused quit requests no shutdown";

  ASSERT_TRUE(lease->pause().has_value());
  EXPECT_EQ(machine_->run_state(), RunState::paused);
  auto resumed = machine_->resume();
  ASSERT_FALSE(resumed.has_value()) << "cont ran a guest whose state an update is saving";
  EXPECT_TRUE(busy(resumed.error())) << resumed.error().describe();
  EXPECT_EQ(machine_->run_state(), RunState::paused);
  auto saved = machine_->save_state();
  ASSERT_TRUE(saved.has_value()) << saved.error().describe();
  EXPECT_EQ(saved->vcpus.size(), 2u);
  ASSERT_TRUE(lease->resume().has_value());
  EXPECT_EQ(machine_->run_state(), RunState::running);

  lease->end();
  EXPECT_FALSE(lease->active());
  EXPECT_FALSE(machine_->update_in_progress());
  EXPECT_FALSE(lease->pause().has_value()) << "an ended lease moves nothing";
  ASSERT_TRUE(machine_->pause().has_value());
  ASSERT_TRUE(machine_->resume().has_value());
}

TEST_F(MachineTest, DestroyingTheLeaseEndsTheUpdateAndAMovedLeaseEndsItOnce) {
  {
    auto lease = machine_->begin_update();
    ASSERT_TRUE(lease.has_value());
    UpdateLease moved = std::move(*lease);
    EXPECT_FALSE(lease->active());
    EXPECT_TRUE(moved.active());
    lease->end();  // the moved-from lease ends nothing
    EXPECT_TRUE(machine_->update_in_progress());
  }
  EXPECT_FALSE(machine_->update_in_progress());
  auto again = machine_->begin_update();
  EXPECT_TRUE(again.has_value()) << "the next update can start";
}

TEST_F(MachineTest, NoUpdateStartsOnceTheMachineIsShuttingDown) {
  ASSERT_TRUE(machine_->quit("test quit").has_value());
  auto lease = machine_->begin_update();
  ASSERT_FALSE(lease.has_value());
  EXPECT_NE(lease.error().message.find("shutting down (test quit)"), std::string::npos) << lease.error().message;
  EXPECT_FALSE(machine_->resume().has_value()) << "a VM that is shutting down does not run again";
}

TEST_F(MachineTest, StateIsSavedAndLoadedOnlyWhilePaused) {
  auto saved = machine_->save_state();
  ASSERT_FALSE(saved.has_value());
  EXPECT_EQ(saved.error().code, EBUSY);
  ASSERT_TRUE(machine_->pause().has_value());
  auto state = machine_->save_state();
  ASSERT_TRUE(state.has_value()) << state.error().describe();
  ASSERT_TRUE(machine_->resume().has_value());
  auto loaded = machine_->load_state(*state);
  ASSERT_FALSE(loaded.has_value()) << "state loaded under a running guest";
  EXPECT_EQ(loaded.error().code, EBUSY);
}

// The event sink runs with no data lock held: reading the machine, or asking
// it to shut down, from a STOP or RESUME event does not deadlock.
TEST_F(MachineTest, EventSinkMayCallBackIntoTheMachine) {
  std::atomic<int> events{0};
  machine_->set_event_sink([&](const std::string& name, const nlohmann::json&) {
    if (name == "STOP" || name == "RESUME") {
      (void)machine_->run_state();
      (void)machine_->last_pause_latency();
      ++events;
    }
  });
  auto paused = within(5s, [&] { return machine_->pause(); });
  ASSERT_TRUE(paused.has_value()) << paused.error().describe();
  auto resumed = within(5s, [&] { return machine_->resume(); });
  ASSERT_TRUE(resumed.has_value()) << resumed.error().describe();
  EXPECT_EQ(events.load(), 2);
  machine_->set_event_sink([&](const std::string& name, const nlohmann::json&) {
    if (name == "STOP") machine_->request_shutdown("asked for by the STOP event", false);
  });
  auto again = within(5s, [&] { return machine_->pause(); });
  EXPECT_TRUE(again.has_value()) << again.error().describe();
  EXPECT_EQ(machine_->shutdown_reason(), "asked for by the STOP event");
  machine_->set_event_sink({});
}

// A shutdown requested while a pause waits for the vCPUs: the pause is not
// held up, and whatever wanted the VM paused learns that it is going away.
TEST_F(MachineTest, ShutdownRequestedDuringAPauseEndsItPromptly) {
  const auto begin = std::chrono::steady_clock::now();
  auto paused = within(5s, [&] {
    std::thread shutdown([&] { machine_->request_shutdown("requested during the pause", true); });
    auto result = machine_->pause();
    shutdown.join();
    return result;
  });
  EXPECT_LT(std::chrono::steady_clock::now() - begin, 1s);
  if (!paused) {
    EXPECT_TRUE(paused.error().code == ECANCELED || paused.error().code == ESHUTDOWN) << paused.error().describe();
    EXPECT_NE(paused.error().message.find("requested during the pause"), std::string::npos);
  }
  EXPECT_EQ(machine_->shutdown_reason(), "requested during the pause");
  EXPECT_FALSE(machine_->pause().has_value()) << "a VM that is shutting down is not paused again";
}


// MachineBuilder: the prebuild path (files received from a transfer) builds
// the same machine as create() did, around the same pages, and takes the
// state over; bad inputs are refused before anything is built.
class BuilderTest : public MachineTest {
 protected:
  PrebuildInputs inputs_from_running() {
    PrebuildInputs inputs;
    for (const auto& region : machine_->memory().regions()) {
      inputs.layout.regions.push_back(region->spec());
      inputs.region_files.emplace_back(::fcntl(region->fd().get(), F_DUPFD_CLOEXEC, 0));
    }
    inputs.prefault = false;
    inputs.cpuid = machine_->vcpu_cpuid();
    return inputs;
  }
  MachineConfig target_config() {
    MachineConfig config;
    config.name = "machine-test-target";
    config.vcpus = 2;
    config.console = ConsoleKind::none;
    return config;
  }
};

TEST_F(BuilderTest, PrebuiltMachineTakesTheStateOverOnTheSamePages) {
  auto built = Machine::prebuild(target_config(), inputs_from_running());
  ASSERT_TRUE(built.has_value()) << built.error().describe();
  Machine& target = **built;
  EXPECT_EQ(target.run_state(), RunState::paused) << "prebuilt vCPUs are parked";
  EXPECT_EQ(target.config().ram_size, machine_->config().ram_size) << "the configuration follows from the layout";
  EXPECT_EQ(target.config().shared_size, machine_->config().shared_size);
  const auto before = machine_->memory_info();
  const auto after = target.memory_info();
  ASSERT_EQ(before.size(), after.size());
  for (size_t i = 0; i < before.size(); ++i) {
    EXPECT_EQ(before[i].inode, after[i].inode) << before[i].name << ": the same file";
    EXPECT_EQ(before[i].gpa, after[i].gpa);
  }

  auto lease = machine_->begin_update();
  ASSERT_TRUE(lease.has_value());
  ASSERT_TRUE(lease->pause().has_value());
  auto state = machine_->save_state();
  ASSERT_TRUE(state.has_value()) << state.error().describe();
  const uint64_t heartbeat = machine_->guest().status().heartbeat;
  machine_->stop();
  lease->hand_over();

  ASSERT_TRUE(target.load_state(*state).has_value());
  ASSERT_TRUE(target.resume().has_value());
  const auto deadline = std::chrono::steady_clock::now() + 20s;
  while (target.guest().status().heartbeat <= heartbeat + 3 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(5ms);
  EXPECT_GT(target.guest().status().heartbeat, heartbeat + 3) << "the guest runs on in the prebuilt machine";
  EXPECT_TRUE(machine_->update_in_progress()) << "a handed-over machine keeps refusing";
}

TEST_F(BuilderTest, BadInputsAreRefusedBeforeAnythingIsBuilt) {
  auto missing = inputs_from_running();
  missing.region_files.pop_back();
  auto built = Machine::prebuild(target_config(), std::move(missing));
  ASSERT_FALSE(built.has_value());
  EXPECT_NE(built.error().message.find("memory files for"), std::string::npos) << built.error().message;

  auto wrong_cpuid = inputs_from_running();
  wrong_cpuid.cpuid.pop_back();
  built = Machine::prebuild(target_config(), std::move(wrong_cpuid));
  ASSERT_FALSE(built.has_value());
  EXPECT_EQ(built.error().code, EINVAL) << built.error().describe();

  auto config = target_config();
  config.vcpus = kMaxVcpus + 1;
  built = Machine::prebuild(config, inputs_from_running());
  ASSERT_FALSE(built.has_value());
  EXPECT_NE(built.error().message.find("out of range"), std::string::npos) << built.error().message;

  MachineConfig fresh = target_config();
  fresh.shared_size = 0;
  built = Machine::create(fresh);
  ASSERT_FALSE(built.has_value());

  // Nothing was left half-built: the running machine is untouched.
  EXPECT_EQ(machine_->run_state(), RunState::running);
  EXPECT_FALSE(machine_->update_in_progress());
}

// After a kexec on a kernel without a KVM LUO handler only the memfds cross:
// the restore builds a new VM around them, on the same pages.
class RestoreTest : public BuilderTest {
 protected:
  void customize(MachineConfig& config) override { config.ram_backing = memory::Backing::memfd; }
  // Pauses and saves the running machine, which then stops (as an old
  // process's copy would), and hands its memory files to the caller.
  std::pair<migration::SavedState, std::vector<UniqueFd>> save_and_stop() {
    auto lease = machine_->begin_update();
    EXPECT_TRUE(lease.has_value());
    EXPECT_TRUE(lease->pause().has_value());
    auto state = machine_->save_state();
    EXPECT_TRUE(state.has_value()) << state.error().describe();
    std::vector<UniqueFd> files;
    for (const auto& region : machine_->memory().regions())
      files.emplace_back(::fcntl(region->fd().get(), F_DUPFD_CLOEXEC, 0));
    heartbeat_ = machine_->guest().status().heartbeat;
    machine_->stop();
    lease->hand_over();
    return {std::move(*state), std::move(files)};
  }
  void expect_runs_on(Machine& target) {
    ASSERT_TRUE(target.resume().has_value());
    const auto deadline = std::chrono::steady_clock::now() + 20s;
    while (target.guest().status().heartbeat <= heartbeat_ + 3 && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(5ms);
    EXPECT_GT(target.guest().status().heartbeat, heartbeat_ + 3) << "the guest runs on in the restored machine";
  }
  uint64_t heartbeat_ = 0;
};

// A saved rate faster than this host's: KVM runs it (scaling, or catching
// up), and the change is reported with the saved rate as the guest's.
TEST_F(RestoreTest, AFasterSavedTscRateIsRunAndReported) {
  auto built = Machine::prebuild(target_config(), inputs_from_running());
  ASSERT_TRUE(built.has_value()) << built.error().describe();
  auto [state, files] = save_and_stop();
  const uint64_t host_khz = state.vcpus[0].tsc_khz;
  for (auto& vcpu : state.vcpus) vcpu.tsc_khz = host_khz + host_khz / 100;
  ASSERT_TRUE((*built)->load_state(state).has_value());
  const auto change = (*built)->tsc_rate_change();
  ASSERT_TRUE(change.has_value());
  EXPECT_EQ(change->host_khz, host_khz);
  EXPECT_EQ(change->khz, host_khz + host_khz / 100);
  expect_runs_on(**built);
}

TEST_F(RestoreTest, WithoutAPreservedVmANewOneIsBuiltAroundTheMemfds) {
  for (const auto& region : machine_->memory().regions())
    ASSERT_EQ(region->spec().backing, memory::Backing::memfd) << region->spec().name;
  const auto before = machine_->memory_info();
  auto [state, files] = save_and_stop();
  RestoreInputs inputs{UniqueFd(), std::move(files), memory::SlotKind::guest_memfd, std::move(state)};
  auto restored = Machine::restore(target_config(), std::move(inputs));
  ASSERT_TRUE(restored.has_value()) << restored.error().describe();
  const auto after = (*restored)->memory_info();
  ASSERT_EQ(before.size(), after.size());
  for (size_t i = 0; i < before.size(); ++i) EXPECT_EQ(before[i].inode, after[i].inode) << before[i].name;
  EXPECT_FALSE((*restored)->tsc_rate_change().has_value()) << "same host, same rate";
  expect_runs_on(**restored);
}

// Each boot calibrates the TSC anew: a saved rate this host's KVM cannot
// run (no TSC scaling, slower than this host beyond its 250 ppm tolerance)
// keeps the host's rate and says so, rather than failing the restore.
TEST_F(RestoreTest, ATscRateTheHostCannotScaleToKeepsTheHostRate) {
  auto system = kvm::System::open();
  ASSERT_TRUE(system.has_value());
  auto tsc_control = system->check_extension(KVM_CAP_TSC_CONTROL);
  ASSERT_TRUE(tsc_control.has_value());
  auto built = Machine::prebuild(target_config(), inputs_from_running());
  ASSERT_TRUE(built.has_value()) << built.error().describe();
  auto [state, files] = save_and_stop();
  ASSERT_FALSE(state.vcpus.empty());
  const uint64_t host_khz = state.vcpus[0].tsc_khz;
  ASSERT_GT(host_khz, 0u);
  // 1% slower than this host: without TSC scaling KVM can only catch a
  // slower host up (a faster rate is emulated), not slow a faster one down.
  const uint64_t saved_khz = host_khz - host_khz / 100;
  for (auto& vcpu : state.vcpus) vcpu.tsc_khz = saved_khz;
  ASSERT_TRUE((*built)->load_state(state).has_value());
  const auto change = (*built)->tsc_rate_change();
  ASSERT_TRUE(change.has_value()) << "the rates differ";
  EXPECT_EQ(change->saved_khz, saved_khz);
  EXPECT_EQ(change->host_khz, host_khz);
  if (*tsc_control > 0) {
    EXPECT_EQ(change->khz, saved_khz) << "this host scales the TSC to the saved rate";
  } else {
    EXPECT_EQ(change->khz, host_khz) << "no TSC scaling: the guest keeps this host's rate";
  }
  expect_runs_on(**built);
}

}  // namespace
}  // namespace vmm
