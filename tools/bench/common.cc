#include "tools/bench/common.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <thread>

#include <fmt/format.h>

namespace bench {

namespace {

// The children the bench runs (a vmm, or two QEMUs during a handover), for
// the signal handler.
std::array<std::atomic<pid_t>, 8> g_children{-1, -1, -1, -1, -1, -1, -1, -1};
std::atomic<bool> g_interrupted{false};
static_assert(std::atomic<pid_t>::is_always_lock_free, "the signal handler reads it");

void on_interrupt(int) {
  g_interrupted = true;
  for (auto& child : g_children)
    if (pid_t pid = child.load(); pid > 0) ::kill(pid, SIGKILL);
}

void remember_child(pid_t pid) {
  for (auto& child : g_children) {
    pid_t free_slot = -1;
    if (child.compare_exchange_strong(free_slot, pid)) return;
  }
}

void forget_child(pid_t pid) {
  for (auto& child : g_children) {
    pid_t expected = pid;
    child.compare_exchange_strong(expected, -1);
  }
}

}  // namespace

int64_t elapsed_us(Clock::time_point since) {
  return std::chrono::duration_cast<std::chrono::microseconds>(Clock::now() - since).count();
}

std::chrono::milliseconds seconds(double s) { return std::chrono::milliseconds(static_cast<int64_t>(s * 1000)); }

double gib(uint64_t bytes) { return static_cast<double>(bytes) / static_cast<double>(kGiB); }

void install_interrupt_handlers() {
  struct sigaction action{};
  action.sa_handler = on_interrupt;
  sigemptyset(&action.sa_mask);
  for (int signo : {SIGINT, SIGTERM, SIGHUP}) ::sigaction(signo, &action, nullptr);
}

bool interrupted() { return g_interrupted; }

Result<void> check_not_interrupted() {
  if (g_interrupted) return fail("interrupted");
  return {};
}

void nap(std::chrono::microseconds duration) {
  const auto until = Clock::now() + duration;
  while (!g_interrupted && Clock::now() < until)
    std::this_thread::sleep_for(std::min<std::chrono::microseconds>(
        std::chrono::duration_cast<std::chrono::microseconds>(until - Clock::now()), 100ms));
}

// ---------------------------------------------------------------------------

Result<TempDir> TempDir::create(const std::string& parent, const std::string& prefix) {
  std::error_code error;
  std::filesystem::create_directories(parent, error);
  std::string pattern = (std::filesystem::path(parent) / (prefix + "-XXXXXX")).string();
  if (!::mkdtemp(pattern.data())) return fail_errno("cannot create a temporary directory in " + parent);
  return TempDir(std::move(pattern));
}

TempDir::TempDir(TempDir&& other) noexcept : path_(std::exchange(other.path_, {})) {}

TempDir::~TempDir() {
  if (path_.empty()) return;
  std::error_code ignored;
  std::filesystem::remove_all(path_, ignored);
}

OwnedFile::OwnedFile(OwnedFile&& other) noexcept : path_(std::exchange(other.path_, {})) {}

OwnedFile::~OwnedFile() { remove_now(); }

void OwnedFile::remove_now() {
  if (path_.empty()) return;
  std::error_code ignored;
  std::filesystem::remove(path_, ignored);
  path_.clear();
}

std::string describe(const ExitStatus& status) {
  return status.exited ? fmt::format("exit code {}", status.code) : fmt::format("signal {}", status.code);
}

Result<ChildProcess> ChildProcess::spawn(const std::vector<std::string>& argv, const std::string& output_path,
                                         bool append) {
  std::vector<char*> args;
  for (const auto& arg : argv) args.push_back(const_cast<char*>(arg.c_str()));
  args.push_back(nullptr);
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) return fail_errno("fork");
  if (pid == 0) {
    // Only async-signal-safe calls between fork and exec.
    if (::prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || ::getppid() != parent) ::_exit(127);
    const int output =
        ::open(output_path.c_str(), O_WRONLY | O_CREAT | (append ? O_APPEND : O_TRUNC) | O_CLOEXEC, 0644);
    const int null = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (output < 0 || null < 0) ::_exit(127);
    ::dup2(null, STDIN_FILENO);
    ::dup2(output, STDOUT_FILENO);
    ::dup2(output, STDERR_FILENO);
    ::execv(args[0], args.data());
    ::_exit(127);
  }
  remember_child(pid);
  return ChildProcess(pid);
}

ChildProcess::ChildProcess(ChildProcess&& other) noexcept
    : pid_(std::exchange(other.pid_, -1)), status_(other.status_) {}

ChildProcess::~ChildProcess() { kill(); }

void ChildProcess::kill() {
  if (pid_ <= 0) return;
  if (!status_) {
    ::kill(pid_, SIGKILL);
    (void)wait_exit(30s);
  }
  forget_child(pid_);
}

std::optional<ExitStatus> ChildProcess::poll_exit() {
  if (status_) return status_;
  int raw = 0;
  const pid_t done = ::waitpid(pid_, &raw, WNOHANG);
  if (done == pid_) {
    status_ = WIFEXITED(raw) ? ExitStatus{true, WEXITSTATUS(raw)} : ExitStatus{false, WTERMSIG(raw)};
  } else if (done < 0) {
    status_ = ExitStatus{false, -1};
  }
  // Reaped: the pid may be reused, so the signal handler must not kill it.
  if (status_) forget_child(pid_);
  return status_;
}

std::optional<ExitStatus> ChildProcess::wait_exit(std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  while (!poll_exit() && Clock::now() < deadline) std::this_thread::sleep_for(2ms);
  return status_;
}

void become_subreaper() { ::prctl(PR_SET_CHILD_SUBREAPER, 1); }

AdoptedProcess::AdoptedProcess(pid_t pid) : pid_(pid) { remember_child(pid); }

AdoptedProcess::~AdoptedProcess() {
  if (!gone()) {
    ::kill(pid_, SIGKILL);
    (void)wait_exit(30s);
  }
  forget_child(pid_);
}

bool AdoptedProcess::gone() {
  int raw = 0;
  const pid_t done = ::waitpid(pid_, &raw, WNOHANG);
  if (done == pid_) return true;
  // Not (yet) the bench's child: its parent still runs, or it was reaped.
  if (done < 0 && errno == ECHILD) return ::kill(pid_, 0) != 0 && errno == ESRCH;
  return false;
}

bool AdoptedProcess::wait_exit(std::chrono::milliseconds timeout) {
  const auto deadline = Clock::now() + timeout;
  while (!gone()) {
    if (Clock::now() > deadline) return false;
    std::this_thread::sleep_for(5ms);
  }
  return true;
}

// ---------------------------------------------------------------------------

std::string read_text(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

std::string tail(const std::string& path, size_t lines) {
  const std::string text = read_text(path);
  size_t start = text.size();
  for (size_t seen = 0; start > 0 && seen <= lines; --start)
    if (text[start - 1] == '\n') ++seen;
  return text.substr(start);
}

Result<std::string> find_program(const std::string& program, const std::string& hint) {
  if (program.find('/') != std::string::npos) {
    if (::access(program.c_str(), X_OK) != 0) return fail_errno(program + " is not executable (" + hint + ")");
    return program;
  }
  const char* path = std::getenv("PATH");
  std::istringstream directories(path ? path : "/usr/local/bin:/usr/bin:/bin");
  std::string directory;
  while (std::getline(directories, directory, ':')) {
    const std::string candidate = (std::filesystem::path(directory.empty() ? "." : directory) / program).string();
    if (::access(candidate.c_str(), X_OK) == 0) return candidate;
  }
  return fail(program + " is not in $PATH (" + hint + ")");
}

std::string first_output_line(const std::string& command) {
  FILE* pipe = ::popen((command + " 2>/dev/null").c_str(), "r");
  if (!pipe) return "";
  std::array<char, 512> buffer{};
  std::string line;
  if (std::fgets(buffer.data(), buffer.size(), pipe)) line = buffer.data();
  ::pclose(pipe);
  while (!line.empty() && (line.back() == '\n' || line.back() == '\r')) line.pop_back();
  return line;
}

Result<ProcessMemory> read_process_memory(pid_t pid) {
  std::ifstream status(fmt::format("/proc/{}/status", pid));
  if (!status) return fail_errno(fmt::format("cannot read /proc/{}/status", pid));
  ProcessMemory memory;
  const std::map<std::string, int64_t*> fields{{"RssAnon:", &memory.rss_anon_kib},
                                               {"RssFile:", &memory.rss_file_kib},
                                               {"RssShmem:", &memory.rss_shmem_kib}};
  std::string line;
  while (std::getline(status, line)) {
    std::istringstream words(line);
    std::string key;
    int64_t value = 0;
    if (words >> key >> value)
      if (auto field = fields.find(key); field != fields.end()) *field->second = value;
  }
  if (memory.rss_anon_kib < 0) return fail(fmt::format("/proc/{}/status has no RssAnon", pid));
  return memory;
}

uint64_t memory_available() {
  std::ifstream meminfo("/proc/meminfo");
  std::string key;
  uint64_t value = 0;
  std::string unit;
  while (meminfo >> key >> value >> unit)
    if (key == "MemAvailable:") return value * 1024;
  return 0;
}

Result<json> run_command(vmm::control::Client& client, const std::string& command, const json& arguments) {
  VMM_TRY_ASSIGN(reply, client.execute(command, arguments));
  if (!reply) return fail(fmt::format("{}: {} ({})", command, reply.error().desc, reply.error().error_class));
  return *reply;
}

// ---------------------------------------------------------------------------

std::string load_average() {
  std::istringstream words(read_text("/proc/loadavg"));
  std::string one, five, fifteen;
  words >> one >> five >> fifteen;
  return fmt::format("{} {} {}", one, five, fifteen);
}

HostInfo host_info() {
  HostInfo host;
  std::istringstream cpuinfo(read_text("/proc/cpuinfo"));
  std::string line;
  bool hypervisor_flag = false;
  while (std::getline(cpuinfo, line)) {
    const auto colon = line.find(':');
    if (colon == std::string::npos) continue;
    std::string key = line.substr(0, colon);
    while (!key.empty() && (key.back() == ' ' || key.back() == '\t')) key.pop_back();
    const std::string value = colon + 2 <= line.size() ? line.substr(colon + 2) : "";
    if (key == "model name" && host.cpu_model.empty()) host.cpu_model = value;
    if (key == "flags" && (" " + value + " ").find(" hypervisor ") != std::string::npos) hypervisor_flag = true;
  }
  host.hypervisor = hypervisor_flag ? "a virtual machine (cpuinfo flag hypervisor)" : "bare metal";
  host.cpus = std::thread::hardware_concurrency();
  std::ifstream meminfo("/proc/meminfo");
  std::string key, unit;
  uint64_t value = 0;
  while (meminfo >> key >> value >> unit)
    if (key == "MemTotal:") host.memory_bytes = value * 1024;
  utsname name{};
  if (::uname(&name) == 0) {
    host.kernel = fmt::format("{} {}", name.sysname, name.release);
    host.machine = name.machine;
  }
  host.load_at_start = load_average();
  return host;
}

json to_json(const HostInfo& host) {
  return {{"cpu_model", host.cpu_model},     {"cpus", host.cpus},
          {"memory_bytes", host.memory_bytes}, {"kernel", host.kernel},
          {"machine", host.machine},         {"hypervisor", host.hypervisor},
          {"load_average_at_start", host.load_at_start}, {"load_average_at_end", host.load_at_end}};
}

}  // namespace bench
