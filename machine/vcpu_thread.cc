#include "machine/vcpu_thread.h"

#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

namespace vmm {
namespace {

// The signal that kicks a vCPU out of KVM_RUN. Its handler does nothing: the
// point is the EINTR, with immediate_exit covering a kick that lands just
// before KVM_RUN is entered.
int kick_signal() { return SIGRTMIN + 1; }
void on_kick(int) {}

std::string internal_error_text(const kvm_run& run) {
  std::string text = fmt::format("KVM internal error, suberror {}", run.internal.suberror);
  if (run.internal.suberror == KVM_INTERNAL_ERROR_EMULATION)
    text += " (instruction emulation failed: on this host guest code at CPL 0 runs in KVM's "
            "emulator, which cannot run every instruction)";
  for (uint32_t i = 0; i < run.internal.ndata && i < 16; ++i)
    text += fmt::format(" data[{}]=0x{:x}", i, run.internal.data[i]);
  return text;
}

}  // namespace

std::string VcpuThread::where_it_stopped() const {
  // What the vCPU last showed, for whoever has to find out why.
  auto regs = vcpu_.get_regs();
  auto sregs = vcpu_.get_sregs();
  auto events = vcpu_.get_vcpu_events();
  if (!regs || !sregs || !events) return "";
  // KVM on AMD (SVM) INITs a vCPU on its shutdown exit, the VMCB being
  // undefined then: what it shows is the reset state, not where it faulted.
  // Only the last exception's vector survives the reset.
  if (regs->rip == 0xfff0 && sregs->cs.selector == 0xf000)
    return fmt::format(" (the vCPU shows its reset state, as KVM leaves it after a shutdown on AMD: where it faulted "
                       "is lost; the last exception vector was {})",
                       events->exception.nr);
  return fmt::format(" at rip 0x{:x} rsp 0x{:x} rflags 0x{:x} cs 0x{:x} cr0 0x{:x} cr3 0x{:x} cr4 0x{:x}; exception "
                     "{} nr {} injected {} pending; interrupt {} nr {}; nmi {}",
                     regs->rip, regs->rsp, regs->rflags, sregs->cs.selector, sregs->cr0, sregs->cr3, sregs->cr4,
                     events->exception.injected ? "injected" : "none", events->exception.nr,
                     events->exception.pending, events->interrupt.injected ? "injected" : "none",
                     events->interrupt.nr, events->nmi.injected ? "injected" : "none");
}

VcpuThread::VcpuThread(kvm::Vcpu vcpu, VcpuExitHandler& handler)
    : vcpu_(std::move(vcpu)), id_(vcpu_.id()), handler_(handler) {}

VcpuThread::~VcpuThread() { exit(); }

void VcpuThread::install_kick_signal() {
  static std::once_flag once;
  std::call_once(once, [] {
    struct sigaction action{};
    action.sa_handler = on_kick;
    sigemptyset(&action.sa_mask);
    action.sa_flags = 0;  // no SA_RESTART: KVM_RUN must return EINTR
    sigaction(kick_signal(), &action, nullptr);
  });
}

Result<void> VcpuThread::start(bool running) {
  install_kick_signal();
  {
    std::lock_guard lock(mutex_);
    command_ = running ? Command::run : Command::pause;
  }
  try {
    thread_ = std::thread([this] { main(); });
  } catch (const std::system_error& e) {
    return fail(fmt::format("cannot start the thread of vCPU {}: {}", id_, e.what()), e.code().value());
  }
  return {};
}

void VcpuThread::request_pause() {
  {
    std::lock_guard lock(mutex_);
    if (command_ != Command::run) return;
    command_ = Command::pause;
  }
  vcpu_.set_immediate_exit(true);
  if (thread_.joinable()) pthread_kill(thread_.native_handle(), kick_signal());
}

bool VcpuThread::wait_paused(std::chrono::steady_clock::time_point deadline) {
  std::unique_lock lock(mutex_);
  return changed_.wait_until(lock, deadline, [this] {
    return state_ == State::paused || state_ == State::exited;
  });
}

void VcpuThread::resume() {
  std::lock_guard lock(mutex_);
  if (command_ == Command::exit) return;
  command_ = Command::run;
  changed_.notify_all();
}

void VcpuThread::exit() {
  {
    std::lock_guard lock(mutex_);
    command_ = Command::exit;
    changed_.notify_all();
  }
  vcpu_.set_immediate_exit(true);
  if (thread_.joinable()) {
    pthread_kill(thread_.native_handle(), kick_signal());
    thread_.join();
  }
}

Result<void> VcpuThread::run_while_paused(const std::function<Result<void>(kvm::Vcpu&)>& task) {
  VMM_TRY(post_task(task));
  return wait_task();
}

Result<void> VcpuThread::post_task(const std::function<Result<void>(kvm::Vcpu&)>& task) {
  std::unique_lock lock(mutex_);
  // A thread just started parked may not have reached its first wait yet.
  if (thread_.joinable()) changed_.wait(lock, [this] { return state_ != State::created; });
  if (!thread_.joinable() || state_ != State::paused || command_ != Command::pause)
    return fail(fmt::format("vCPU {} is not paused", id_));
  if (task_ != nullptr || task_done_) return fail(fmt::format("vCPU {} is already running a task", id_), EBUSY);
  task_ = &task;
  task_done_ = false;
  changed_.notify_all();
  return {};
}

Result<void> VcpuThread::wait_task() {
  std::unique_lock lock(mutex_);
  changed_.wait(lock, [this] { return task_done_ || state_ == State::exited; });
  if (!task_done_) {
    task_ = nullptr;
    return fail(fmt::format("vCPU {} exited before running its task", id_));
  }
  task_done_ = false;
  return std::move(task_result_);
}

VcpuThread::State VcpuThread::state() const {
  std::lock_guard lock(mutex_);
  return state_;
}

VcpuExitCounts VcpuThread::exit_counts() const {
  return {counts_.io.load(), counts_.mmio.load(), counts_.hlt.load(), counts_.interrupted.load(),
          counts_.other.load()};
}

void VcpuThread::main() {
  thread_id_ = ::gettid();
  pthread_setname_np(pthread_self(), fmt::format("vcpu{}", id_).c_str());
  sigset_t kick;
  sigemptyset(&kick);
  sigaddset(&kick, kick_signal());
  pthread_sigmask(SIG_UNBLOCK, &kick, nullptr);

  std::unique_lock lock(mutex_);
  while (command_ != Command::exit) {
    if (command_ == Command::pause) {
      if (state_ != State::paused) {
        state_ = State::paused;
        changed_.notify_all();
      }
      if (task_) {
        // The task runs without the mutex: it may take a while (vCPU state
        // ioctls), and state(), request_pause() or exit() must not wait for it.
        // post_task() refuses a second task until this one is collected.
        const auto* task = task_;
        lock.unlock();
        Result<void> result = (*task)(vcpu_);
        lock.lock();
        task_result_ = std::move(result);
        task_ = nullptr;
        task_done_ = true;
        changed_.notify_all();
      } else {
        changed_.wait(lock);
      }
      continue;
    }
    if (state_ != State::running) {
      state_ = State::running;
      changed_.notify_all();
    }
    // Cleared under the lock: a pause request takes the lock to change the
    // command before setting immediate_exit, so no kick is lost.
    vcpu_.set_immediate_exit(false);
    lock.unlock();
    bool keep_running = true;
    if (auto ran = vcpu_.run(); ran) {
      keep_running = handle_exit();
    } else if (ran.error().code == EINTR || ran.error().code == EAGAIN) {
      counts_.interrupted.fetch_add(1, std::memory_order_relaxed);
    } else {
      handler_.vcpu_failed(id_, ran.error().describe());
      keep_running = false;
    }
    lock.lock();
    if (!keep_running && command_ == Command::run) command_ = Command::pause;
  }
  state_ = State::exited;
  changed_.notify_all();
}

bool VcpuThread::handle_exit() {
  kvm_run& run = vcpu_.run_data();
  switch (run.exit_reason) {
    case KVM_EXIT_IO: {
      counts_.io.fetch_add(1, std::memory_order_relaxed);
      auto* base = reinterpret_cast<uint8_t*>(&run) + run.io.data_offset;
      bool keep_running = true;
      for (uint32_t i = 0; i < run.io.count; ++i) {
        std::span<uint8_t> data(base + size_t{i} * run.io.size, run.io.size);
        if (run.io.direction == KVM_EXIT_IO_OUT) {
          keep_running &= handler_.io_out(run.io.port, data) == VcpuExitHandler::Next::resume_guest;
        } else {
          handler_.io_in(run.io.port, data);
        }
      }
      return keep_running;
    }
    case KVM_EXIT_MMIO: {
      counts_.mmio.fetch_add(1, std::memory_order_relaxed);
      std::span<uint8_t> data(run.mmio.data, std::min<uint32_t>(run.mmio.len, sizeof run.mmio.data));
      if (run.mmio.is_write) handler_.mmio_write(run.mmio.phys_addr, data);
      else handler_.mmio_read(run.mmio.phys_addr, data);
      return true;
    }
    case KVM_EXIT_HLT:
      // Only without an in-kernel LAPIC; ours has one, so treat it as a spin.
      counts_.hlt.fetch_add(1, std::memory_order_relaxed);
      return true;
    case KVM_EXIT_INTR:
      counts_.interrupted.fetch_add(1, std::memory_order_relaxed);
      return true;
    case KVM_EXIT_SYSTEM_EVENT:
      counts_.other.fetch_add(1, std::memory_order_relaxed);
      handler_.guest_system_event(id_, run.system_event.type);
      return false;
    case KVM_EXIT_SHUTDOWN:
      counts_.other.fetch_add(1, std::memory_order_relaxed);
      handler_.vcpu_failed(id_, "the guest triple-faulted (KVM_EXIT_SHUTDOWN)" + where_it_stopped());
      return false;
    case KVM_EXIT_INTERNAL_ERROR:
      counts_.other.fetch_add(1, std::memory_order_relaxed);
      handler_.vcpu_failed(id_, internal_error_text(run));
      return false;
    case KVM_EXIT_FAIL_ENTRY:
      counts_.other.fetch_add(1, std::memory_order_relaxed);
      handler_.vcpu_failed(id_, fmt::format("VM entry failed, hardware reason 0x{:x}",
                                            run.fail_entry.hardware_entry_failure_reason));
      return false;
    default:
      counts_.other.fetch_add(1, std::memory_order_relaxed);
      handler_.vcpu_failed(id_, fmt::format("unhandled KVM exit reason {}", run.exit_reason));
      return false;
  }
}

}  // namespace vmm
