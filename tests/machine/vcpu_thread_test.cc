// VcpuThread on a real (empty) vCPU with a fake exit handler: a task runs on
// the vCPU's own thread without the thread's mutex, so the thread stays
// observable and controllable while the task works (issue 10, B).
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <future>
#include <optional>

#include "kvm/system.h"
#include "kvm/vm.h"
#include "machine/vcpu_thread.h"

namespace vmm {
namespace {

using namespace std::chrono_literals;

// Never called: the vCPU never enters the guest in these tests.
class NoExits final : public VcpuExitHandler {
 public:
  void io_in(uint16_t, std::span<uint8_t>) override { ADD_FAILURE() << "unexpected exit"; }
  Next io_out(uint16_t, std::span<const uint8_t>) override {
    ADD_FAILURE() << "unexpected exit";
    return Next::park;
  }
  void mmio_read(uint64_t, std::span<uint8_t>) override { ADD_FAILURE() << "unexpected exit"; }
  void mmio_write(uint64_t, std::span<const uint8_t>) override { ADD_FAILURE() << "unexpected exit"; }
  void guest_system_event(uint32_t, uint32_t) override { ADD_FAILURE() << "unexpected exit"; }
  void vcpu_failed(uint32_t, const std::string& why) override { ADD_FAILURE() << why; }
};

class VcpuThreadTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto system = kvm::System::open();
    if (!system) GTEST_SKIP() << "/dev/kvm not available: " << system.error().describe();
    system_.emplace(std::move(*system));
    auto vm = system_->create_vm();
    ASSERT_TRUE(vm.has_value()) << vm.error().describe();
    vm_.emplace(std::move(*vm));
    auto vcpu = vm_->create_vcpu(0);
    ASSERT_TRUE(vcpu.has_value()) << vcpu.error().describe();
    thread_ = std::make_unique<VcpuThread>(std::move(*vcpu), handler_);
    ASSERT_TRUE(thread_->start(false).has_value());
  }

  NoExits handler_;
  std::optional<kvm::System> system_;
  std::optional<kvm::Vm> vm_;
  std::unique_ptr<VcpuThread> thread_;
};

TEST_F(VcpuThreadTest, ThreadStaysObservableWhileATaskRuns) {
  std::promise<void> started, release;
  auto released = release.get_future().share();
  std::function<Result<void>(kvm::Vcpu&)> task = [&](kvm::Vcpu&) -> Result<void> {
    started.set_value();
    released.wait();
    return {};
  };
  ASSERT_TRUE(thread_->post_task(task).has_value());
  started.get_future().wait();

  // The vCPU's state and a second post answer at once, task or not.
  auto state = std::async(std::launch::async, [&] { return thread_->state(); });
  const bool answered = state.wait_for(1s) == std::future_status::ready;
  auto second = std::async(std::launch::async, [&] { return thread_->post_task(task); });
  const bool refused_at_once = second.wait_for(1s) == std::future_status::ready;
  release.set_value();
  EXPECT_TRUE(answered) << "state() waited for the vCPU's task to finish";
  EXPECT_TRUE(refused_at_once) << "post_task() waited for the vCPU's task to finish";
  EXPECT_EQ(state.get(), VcpuThread::State::paused);
  auto refused = second.get();
  ASSERT_FALSE(refused.has_value()) << "a second task while one runs";
  EXPECT_EQ(refused.error().code, EBUSY);
  EXPECT_TRUE(thread_->wait_task().has_value());
}

TEST_F(VcpuThreadTest, ExitWhileATaskRunsJoinsOnceTheTaskEnds) {
  std::atomic<bool> finished{false};
  std::promise<void> started;
  std::function<Result<void>(kvm::Vcpu&)> task = [&](kvm::Vcpu&) -> Result<void> {
    started.set_value();
    std::this_thread::sleep_for(100ms);
    finished = true;
    return {};
  };
  ASSERT_TRUE(thread_->post_task(task).has_value());
  started.get_future().wait();
  thread_->exit();
  EXPECT_TRUE(finished) << "the thread was joined mid-task";
  EXPECT_EQ(thread_->state(), VcpuThread::State::exited);
  EXPECT_TRUE(thread_->wait_task().has_value()) << "the task's own result is kept";
}

}  // namespace
}  // namespace vmm
