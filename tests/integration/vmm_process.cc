#include "tests/integration/vmm_process.h"

extern char** environ;

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <string_view>
#include <cstring>
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <thread>

namespace vmm::testing {
namespace {

std::string read_text(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

std::string make_temp_dir() {
  std::string pattern = (std::filesystem::temp_directory_path() / "vmm-test-XXXXXX").string();
  if (!::mkdtemp(pattern.data())) return {};
  return pattern;
}

// fork + exec of the vmm binary, stdout/stderr to files in `dir`.
// `listen_fds`: descriptors the child gets as systemd passes them ($LISTEN_FDS
// from fd 3, $LISTEN_PID, $LISTEN_FDNAMES).
Result<pid_t> spawn(const std::vector<std::string>& args, const std::string& dir, const std::string& binary,
                    const std::vector<ListenFd>& listen_fds = {}) {
  std::vector<std::string> argv_storage{binary};
  argv_storage.insert(argv_storage.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& arg : argv_storage) argv.push_back(arg.data());
  argv.push_back(nullptr);
  // The environment is built before the fork (the child only fills in its pid).
  std::vector<std::string> env_storage;
  for (char** e = environ; *e; ++e) {
    std::string_view entry(*e);
    if (!listen_fds.empty() && (entry.starts_with("LISTEN_FDS=") || entry.starts_with("LISTEN_PID=") ||
                                entry.starts_with("LISTEN_FDNAMES=")))
      continue;
    env_storage.emplace_back(entry);
  }
  size_t pid_entry = 0;
  if (!listen_fds.empty()) {
    std::string names;
    for (const auto& fd : listen_fds) names += (names.empty() ? "" : ":") + fd.name;
    env_storage.push_back("LISTEN_FDS=" + std::to_string(listen_fds.size()));
    env_storage.push_back("LISTEN_FDNAMES=" + names);
    pid_entry = env_storage.size();
    env_storage.push_back("LISTEN_PID=" + std::string(16, '\0'));
  }
  std::vector<char*> envp;
  for (auto& entry : env_storage) envp.push_back(entry.data());
  envp.push_back(nullptr);
  const std::string out_path = dir + "/stdout.log";
  const std::string err_path = dir + "/stderr.log";
  pid_t pid = ::fork();
  if (pid < 0) return fail_errno("fork");
  if (pid == 0) {
    int out = ::open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    int err = ::open(err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    int null = ::open("/dev/null", O_RDONLY);
    if (out < 0 || err < 0 || null < 0) ::_exit(127);
    ::dup2(null, 0);
    ::dup2(out, 1);
    ::dup2(err, 2);
    if (!listen_fds.empty()) {
      // Out of the way first: a source may sit where another goes.
      std::vector<int> moved;
      for (const auto& fd : listen_fds) moved.push_back(::fcntl(fd.fd, F_DUPFD, 200));
      for (size_t i = 0; i < moved.size(); ++i) {
        if (moved[i] < 0 || ::dup2(moved[i], static_cast<int>(3 + i)) < 0) ::_exit(127);
        ::close(moved[i]);
      }
      char* digits = envp[pid_entry] + std::strlen("LISTEN_PID=");
      char reversed[16];
      int n = 0;
      for (pid_t self = ::getpid(); self > 0 && n < 15; self /= 10) reversed[n++] = static_cast<char>('0' + self % 10);
      for (int i = 0; i < n; ++i) digits[i] = reversed[n - 1 - i];
      digits[n] = '\0';
    }
    ::execve(argv[0], argv.data(), envp.data());
    ::_exit(127);
  }
  return pid;
}

std::optional<ExitStatus> wait_pid(pid_t pid, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (true) {
    int status = 0;
    pid_t done = ::waitpid(pid, &status, WNOHANG);
    if (done == pid) {
      if (WIFEXITED(status)) return ExitStatus{true, WEXITSTATUS(status)};
      return ExitStatus{false, WTERMSIG(status)};
    }
    if (done < 0) return ExitStatus{false, -1};
    if (std::chrono::steady_clock::now() >= deadline) return std::nullopt;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

}  // namespace

std::string vmm_binary() { return VMM_BINARY_PATH; }
std::string vmm_faults_binary() { return VMM_FAULTS_BINARY_PATH; }
std::string vmm_skewed_binary() { return VMM_SKEWED_BINARY_PATH; }

bool kvm_available(std::string* why) {
  int fd = ::open("/dev/kvm", O_RDWR | O_CLOEXEC);
  if (fd < 0) {
    if (why) *why = std::string("/dev/kvm is not usable here (") + std::strerror(errno) + ")";
    return false;
  }
  ::close(fd);
  return true;
}

Result<VmmProcess> VmmProcess::launch(std::vector<std::string> args, std::chrono::milliseconds timeout,
                                      const std::string& binary, const std::vector<ListenFd>& listen_fds) {
  // A vmm that hands its VM to a new process (transfer live update) exits;
  // its successor is then reparented here, where follow() can reap it.
  ::prctl(PR_SET_CHILD_SUBREAPER, 1);
  VmmProcess process;
  process.dir_ = make_temp_dir();
  if (process.dir_.empty()) return fail_errno("mkdtemp");
  process.socket_ = process.dir_ + "/vmm.sock";
  std::vector<std::string> full{"run", "--control-socket", process.socket_};
  if (std::ranges::find(args, "--console") == args.end())
    full.insert(full.end(), {"--console", process.dir_ + "/console.log"});
  full.insert(full.end(), args.begin(), args.end());
  process.launched_ = std::chrono::steady_clock::now();
  VMM_TRY_ASSIGN(pid, spawn(full, process.dir_, binary, listen_fds));
  process.pid_ = pid;

  const auto deadline = std::chrono::steady_clock::now() + timeout;
  while (true) {
    if (auto exited = wait_pid(process.pid_, std::chrono::milliseconds(0))) {
      process.reaped_ = true;
      return fail("vmm exited early (code " + std::to_string(exited->code) + "): " + process.stderr_text());
    }
    struct stat st{};
    if (::stat(process.socket_.c_str(), &st) == 0) {
      auto client = process.connect();
      if (client) {
        // Long enough for the slowest command a test sends: guest-verify of a
        // large guest still stamping its RAM (the guest answers once done).
        client->set_timeout(std::chrono::seconds(200));
        process.client_ = std::move(*client);
        return process;
      }
    }
    if (std::chrono::steady_clock::now() >= deadline)
      return fail("vmm did not open its control socket in time: " + process.stderr_text());
    std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
}

Result<std::pair<ExitStatus, std::string>> VmmProcess::run_to_exit(std::vector<std::string> args,
                                                                    std::chrono::milliseconds timeout,
                                                                    const std::string& binary) {
  const std::string dir = make_temp_dir();
  if (dir.empty()) return fail_errno("mkdtemp");
  VMM_TRY_ASSIGN(pid, spawn(args, dir, binary));
  auto status = wait_pid(pid, timeout);
  if (!status) {
    ::kill(pid, SIGKILL);
    (void)wait_pid(pid, std::chrono::seconds(5));
    std::filesystem::remove_all(dir);
    return fail("vmm did not exit in time");
  }
  std::string err = read_text(dir + "/stderr.log");
  std::filesystem::remove_all(dir);
  return std::pair{*status, err};
}

VmmProcess::VmmProcess(VmmProcess&& other) noexcept
    : pid_(std::exchange(other.pid_, -1)), dir_(std::move(other.dir_)), socket_(std::move(other.socket_)),
      launched_(other.launched_), client_(std::move(other.client_)), reaped_(other.reaped_) {
  other.dir_.clear();
}

VmmProcess::~VmmProcess() {
  client_.reset();
  if (pid_ > 0 && !reaped_) {
    ::kill(pid_, SIGKILL);
    (void)wait_pid(pid_, std::chrono::seconds(10));
  }
  if (!dir_.empty()) std::filesystem::remove_all(dir_);
}

Result<control::Client> VmmProcess::connect() const {
  VMM_TRY_ASSIGN(client, control::Client::connect(socket_));
  VMM_TRY(client.negotiate());
  return client;
}

Result<nlohmann::json> VmmProcess::command(const std::string& name, const nlohmann::json& arguments) {
  if (!client_) return fail("no client");
  VMM_TRY_ASSIGN(reply, client_->execute(name, arguments));
  if (!reply) return fail(name + " failed: " + reply.error().error_class + ": " + reply.error().desc);
  return *reply;
}

std::optional<ExitStatus> VmmProcess::wait_exit(std::chrono::milliseconds timeout) {
  if (reaped_) return std::nullopt;
  auto status = wait_pid(pid_, timeout);
  if (status) reaped_ = true;
  return status;
}

Result<void> VmmProcess::follow(pid_t successor, std::chrono::milliseconds timeout) {
  if (successor <= 0) return fail("no successor pid");
  if (successor == pid_) return {};
  if (reaped_) return fail("the vmm already exited");
  auto status = wait_pid(pid_, timeout);
  if (!status) return fail("the old vmm (pid " + std::to_string(pid_) + ") did not exit after handing over its VM");
  if (!status->exited || status->code != 0)
    return fail("the old vmm ended with " + std::string(status->exited ? "exit code " : "signal ") +
                std::to_string(status->code) + " after handing over its VM: " + stderr_text());
  pid_ = successor;
  return {};
}

void VmmProcess::signal(int signo) const {
  if (pid_ > 0 && !reaped_) ::kill(pid_, signo);
}

std::string VmmProcess::console() const { return read_text(dir_ + "/console.log"); }
std::string VmmProcess::stderr_text() const { return read_text(dir_ + "/stderr.log"); }

}  // namespace vmm::testing
