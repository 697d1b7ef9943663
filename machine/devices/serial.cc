#include "machine/devices/serial.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <unistd.h>

#include <algorithm>

namespace vmm::devices {
namespace {

// Register offsets and bits of the 16550A.
constexpr uint64_t kData = 0, kIer = 1, kIirFcr = 2, kLcr = 3, kMcr = 4, kLsr = 5, kMsr = 6, kScr = 7;
constexpr uint8_t kLcrDlab = 0x80;
constexpr uint8_t kIerRxData = 0x01, kIerThrEmpty = 0x02;
constexpr uint8_t kIirNone = 0x01, kIirThrEmpty = 0x02, kIirRxData = 0x04, kIirFifoEnabled = 0xc0;
constexpr uint8_t kLsrDataReady = 0x01, kLsrThrEmpty = 0x20, kLsrIdle = 0x40;
constexpr uint8_t kMcrOut2 = 0x08, kMcrLoop = 0x10;
constexpr uint8_t kMsrLoopbackBits = 0xb0;  // CTS, DSR, DCD as wired in loopback
constexpr size_t kMaxRx = migration::kMaxUartPendingInput;
constexpr uint8_t kIerBits = 0x0f, kMcrBits = 0x1f;
constexpr size_t kMaxPendingLine = 4096;

void write_all(int fd, const std::string& text) {
  size_t done = 0;
  while (done < text.size()) {
    ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;  // a console that can't take output must not stop the guest
    done += static_cast<size_t>(n);
  }
}

}  // namespace

ConsoleSink ConsoleSink::stdout_sink() {
  return ConsoleSink(UniqueFd(::fcntl(STDOUT_FILENO, F_DUPFD_CLOEXEC, 3)), true);
}

// The console goes to a regular file (created if missing, appended to), a
// terminal, or /dev/null. Anything else is refused before it is opened where
// the path tells: opening a FIFO blocks until a reader comes (and a reader
// that leaves would kill the vmm with SIGPIPE), a block device would have
// the guest's output written over its data, and other character devices act
// on open or write (a watchdog, /dev/mem).
Result<ConsoleSink> ConsoleSink::file(const std::string& path) {
  const std::string fix = ": use a regular file (created if missing, appended to), a terminal, /dev/null, "
                          "--console none, or --console stdout to pipe the output";
  auto refuse = [&](mode_t mode) {
    const char* kind = S_ISFIFO(mode)  ? "a FIFO"
                       : S_ISSOCK(mode) ? "a socket"
                       : S_ISDIR(mode)  ? "a directory"
                       : S_ISBLK(mode)  ? "a block device"
                       : S_ISCHR(mode)  ? "a character device that is neither a terminal nor /dev/null"
                                        : "not a regular file";
    return fail("console '" + path + "' is " + kind + fix);
  };
  const auto is_dev_null = [](const struct stat& st) {
    return S_ISCHR(st.st_mode) && major(st.st_rdev) == 1 && minor(st.st_rdev) == 3;
  };
  struct stat before{};
  if (::stat(path.c_str(), &before) == 0 && !S_ISREG(before.st_mode) && !S_ISCHR(before.st_mode))
    return refuse(before.st_mode);
  // O_NONBLOCK so that not even a path swapped for a FIFO after the stat can
  // block here; O_NOCTTY so that a terminal does not become ours.
  UniqueFd fd(::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC | O_NOCTTY | O_NONBLOCK, 0644));
  if (!fd) return fail_errno("cannot open console file '" + path + "'");
  struct stat opened{};
  if (::fstat(fd.get(), &opened) != 0) return fail_errno("cannot stat console file '" + path + "'");
  if (!S_ISREG(opened.st_mode) && !(S_ISCHR(opened.st_mode) && (::isatty(fd.get()) || is_dev_null(opened))))
    return refuse(opened.st_mode);
  // Written like stdout: a terminal that is slow to take output holds the line, nothing is dropped.
  const int flags = ::fcntl(fd.get(), F_GETFL);
  if (flags < 0 || ::fcntl(fd.get(), F_SETFL, flags & ~O_NONBLOCK) != 0)
    return fail_errno("cannot clear O_NONBLOCK on console '" + path + "'");
  return ConsoleSink(std::move(fd), true);
}

void ConsoleSink::put(uint8_t byte) {
  if (!enabled_) return;
  pending_.push_back(static_cast<char>(byte));
  if (byte == '\n' || pending_.size() >= kMaxPendingLine) flush();
}

void ConsoleSink::flush() {
  if (!enabled_ || pending_.empty() || !fd_) return;
  write_all(fd_.get(), pending_);
  pending_.clear();
}

void Serial::read(uint64_t offset, std::span<uint8_t> data) {
  std::lock_guard lock(mutex_);
  for (auto& byte : data) byte = read_register(offset);
}

void Serial::write(uint64_t offset, std::span<const uint8_t> data) {
  std::lock_guard lock(mutex_);
  for (uint8_t byte : data) write_register(offset, byte);
}

void Serial::enqueue_input(uint8_t byte) {
  std::lock_guard lock(mutex_);
  if (regs_.rx.size() < kMaxRx) regs_.rx.push_back(byte);
  update_irq();
}

uint8_t Serial::interrupt_identification() const {
  const uint8_t fifo = (regs_.fcr & 0x01) ? kIirFifoEnabled : 0;
  if ((regs_.ier & kIerRxData) && !regs_.rx.empty()) return kIirRxData | fifo;
  if ((regs_.ier & kIerThrEmpty) && regs_.thr_interrupt_pending) return kIirThrEmpty | fifo;
  return kIirNone | fifo;
}

uint8_t Serial::read_register(uint64_t offset) {
  const bool dlab = regs_.lcr & kLcrDlab;
  switch (offset) {
    case kData: {
      if (dlab) return regs_.dll;
      if (regs_.rx.empty()) return 0;
      uint8_t byte = regs_.rx.front();
      regs_.rx.pop_front();
      update_irq();
      return byte;
    }
    case kIer:
      return dlab ? regs_.dlm : regs_.ier;
    case kIirFcr: {
      uint8_t iir = interrupt_identification();
      // Reading IIR acknowledges a transmitter-empty interrupt.
      if ((iir & 0x0f) == kIirThrEmpty) {
        regs_.thr_interrupt_pending = false;
        update_irq();
      }
      return iir;
    }
    case kLcr: return regs_.lcr;
    case kMcr: return regs_.mcr;
    case kLsr: return line_status();
    case kMsr: return (regs_.mcr & kMcrLoop) ? kMsrLoopbackBits : regs_.msr;
    case kScr: return regs_.scr;
    default: return 0xff;
  }
}

void Serial::write_register(uint64_t offset, uint8_t value) {
  const bool dlab = regs_.lcr & kLcrDlab;
  switch (offset) {
    case kData:
      if (dlab) {
        regs_.dll = value;
      } else if (regs_.mcr & kMcrLoop) {
        if (regs_.rx.size() < kMaxRx) regs_.rx.push_back(value);
        regs_.thr_interrupt_pending = true;
      } else {
        sink_.put(value);
        regs_.thr_interrupt_pending = true;
      }
      break;
    case kIer:
      if (dlab) {
        regs_.dlm = value;
      } else {
        // Enabling the transmitter-empty interrupt raises it at once: the
        // transmitter is always empty here.
        if ((value & kIerThrEmpty) && !(regs_.ier & kIerThrEmpty)) regs_.thr_interrupt_pending = true;
        regs_.ier = value & kIerBits;
      }
      break;
    case kIirFcr:
      regs_.fcr = value;
      if (value & 0x02) regs_.rx.clear();
      break;
    case kLcr: regs_.lcr = value; break;
    case kMcr: regs_.mcr = value & kMcrBits; break;
    case kScr: regs_.scr = value; break;
    default: break;  // LSR and MSR are read-only
  }
  update_irq();
}

uint8_t Serial::line_status() const {
  return static_cast<uint8_t>(kLsrThrEmpty | kLsrIdle | (regs_.rx.empty() ? 0 : kLsrDataReady));
}

bool Serial::irq_level_wanted() const {
  // On PCs the UART's interrupt reaches the PIC only with OUT2 set.
  return (interrupt_identification() & kIirNone) == 0 && (regs_.mcr & kMcrOut2);
}

void Serial::update_irq() {
  const bool level = irq_level_wanted();
  if (level != irq_level_) {
    irq_level_ = level;
    if (irq_) irq_(level);
  }
}

migration::UartState Serial::save() const {
  std::lock_guard lock(mutex_);
  migration::UartState state;
  state.ier = regs_.ier;
  state.iir = interrupt_identification();
  state.lcr = regs_.lcr;
  state.mcr = regs_.mcr;
  state.lsr = line_status();
  state.msr = regs_.msr;
  state.scr = regs_.scr;
  state.dll = regs_.dll;
  state.dlm = regs_.dlm;
  state.fcr = regs_.fcr;
  state.pending_input.assign(regs_.rx.begin(), regs_.rx.end());
  state.irq_level = irq_level_;
  state.thr_interrupt_pending = regs_.thr_interrupt_pending;
  return state;
}

Result<void> Serial::restore(const migration::UartState& state) {
  if (state.pending_input.size() > kMaxRx)
    return fail("the saved UART holds " + std::to_string(state.pending_input.size()) +
                " bytes of pending input, more than its " + std::to_string(kMaxRx) + "-byte receive FIFO", EINVAL);
  if ((state.ier & ~kIerBits) != 0 || (state.mcr & ~kMcrBits) != 0)
    return fail("the saved UART's IER (" + std::to_string(state.ier) + ") or MCR (" + std::to_string(state.mcr) +
                ") has bits a 16550 does not have", EINVAL);
  std::lock_guard lock(mutex_);
  regs_.ier = state.ier;
  regs_.lcr = state.lcr;
  regs_.mcr = state.mcr;
  regs_.msr = state.msr;
  regs_.scr = state.scr;
  regs_.dll = state.dll;
  regs_.dlm = state.dlm;
  regs_.fcr = state.fcr;
  regs_.thr_interrupt_pending = state.thr_interrupt_pending;
  regs_.rx.assign(state.pending_input.begin(), state.pending_input.end());
  // The saved IIR, LSR and line level are outputs of the above; the line is
  // driven whatever it was, so no level the irqchip kept can be stale.
  irq_level_ = irq_level_wanted();
  if (irq_) irq_(irq_level_);
  return {};
}

}  // namespace vmm::devices
