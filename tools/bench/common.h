// Plumbing shared by the parts of vmm-bench: clocks, interruption, child
// processes, files, the host's description.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "base/result.h"
#include "vmm/control/client.h"

namespace bench {

using nlohmann::json;
using vmm::Error;
using vmm::Result;
using vmm::fail;
using vmm::fail_errno;
using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

constexpr uint64_t kMiB = uint64_t{1} << 20;
constexpr uint64_t kGiB = uint64_t{1} << 30;

int64_t elapsed_us(Clock::time_point since);
std::chrono::milliseconds seconds(double s);
double gib(uint64_t bytes);

// SIGINT/SIGTERM/SIGHUP kill the children the bench runs (so no VM outlives
// it) and make check_not_interrupted() fail, so every loop unwinds and the
// destructors remove temporary files; the results so far are still written.
void install_interrupt_handlers();
bool interrupted();
Result<void> check_not_interrupted();
// Sleeps, but returns early once interrupted.
void nap(std::chrono::microseconds duration);

class TempDir {
 public:
  // A fresh directory under `parent` (created if missing).
  static Result<TempDir> create(const std::string& parent, const std::string& prefix);
  TempDir(TempDir&& other) noexcept;
  TempDir& operator=(TempDir&&) = delete;
  ~TempDir();
  [[nodiscard]] const std::string& path() const { return path_; }

 private:
  explicit TempDir(std::string path) : path_(std::move(path)) {}
  std::string path_;
};

// A file the bench made and removes when it goes (QEMU's guest RAM on
// /dev/shm, which must never outlive the run).
class OwnedFile {
 public:
  explicit OwnedFile(std::string path) : path_(std::move(path)) {}
  OwnedFile(OwnedFile&& other) noexcept;
  OwnedFile& operator=(OwnedFile&&) = delete;
  ~OwnedFile();
  [[nodiscard]] const std::string& path() const { return path_; }
  void remove_now();

 private:
  std::string path_;
};

struct ExitStatus {
  bool exited = false;  // false: killed by a signal
  int code = 0;         // exit code or signal number
};
std::string describe(const ExitStatus& status);

// A child process, killed and reaped when the object goes, whatever happened
// meanwhile. It also dies with the bench (PR_SET_PDEATHSIG, which survives
// the vmm's exec live updates: they keep its pid).
class ChildProcess {
 public:
  // stdout and stderr go to `output_path` (truncated, or appended to).
  static Result<ChildProcess> spawn(const std::vector<std::string>& argv, const std::string& output_path,
                                    bool append = false);
  ChildProcess(ChildProcess&& other) noexcept;
  ChildProcess& operator=(ChildProcess&&) = delete;
  ~ChildProcess();

  [[nodiscard]] pid_t pid() const { return pid_; }
  // The exit status once the child has exited (reaping it), else nullopt.
  std::optional<ExitStatus> poll_exit();
  std::optional<ExitStatus> wait_exit(std::chrono::milliseconds timeout);
  // SIGKILL and reap.
  void kill();

 private:
  explicit ChildProcess(pid_t pid) : pid_(pid) {}
  pid_t pid_ = -1;
  std::optional<ExitStatus> status_;
};

// Makes the bench the reaper of its orphaned descendants: a vmm that a
// transfer live update started becomes the bench's child once the vmm that
// started it exits, so the bench can still kill and reap it.
void become_subreaper();

// A process the bench did not start but must not leave behind (the vmm a
// transfer live update started): killed on interruption, and killed and
// reaped when the object goes unless it has exited by then.
class AdoptedProcess {
 public:
  explicit AdoptedProcess(pid_t pid);
  AdoptedProcess(const AdoptedProcess&) = delete;
  AdoptedProcess& operator=(const AdoptedProcess&) = delete;
  ~AdoptedProcess();
  [[nodiscard]] pid_t pid() const { return pid_; }
  // Whether it exited within `timeout` (reaping it if it is the bench's child).
  bool wait_exit(std::chrono::milliseconds timeout);

 private:
  bool gone();
  pid_t pid_;
};

std::string read_text(const std::string& path);
// The last `lines` lines of a file, for error messages.
std::string tail(const std::string& path, size_t lines);
// `program` when it names a path, else its first executable match in $PATH
// (resolved here: only execv is safe to call after fork).
Result<std::string> find_program(const std::string& program, const std::string& hint);
// The first line a command prints on stdout, or "" (for versions, commits).
std::string first_output_line(const std::string& command);

// From /proc/PID/status, in KiB.
struct ProcessMemory {
  int64_t rss_anon_kib = -1;
  int64_t rss_file_kib = -1;
  int64_t rss_shmem_kib = -1;
};
Result<ProcessMemory> read_process_memory(pid_t pid);
// MemAvailable from /proc/meminfo, in bytes (0 if unknown).
uint64_t memory_available();

// Runs a command on a control or QMP socket; a refusal becomes an error.
Result<json> run_command(vmm::control::Client& client, const std::string& command,
                         const json& arguments = json::object());

struct HostInfo {
  std::string cpu_model;
  unsigned cpus = 0;
  uint64_t memory_bytes = 0;
  std::string kernel;  // uname -sr
  std::string machine; // uname -m
  std::string hypervisor;  // "(bare metal)" or the cpuinfo hint that this host is a VM
  std::string load_at_start;
  std::string load_at_end;
};
HostInfo host_info();
std::string load_average();
json to_json(const HostInfo& host);

}  // namespace bench
