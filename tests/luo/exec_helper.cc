// The "new vmm" of the cross-exec tests: started by ExecBackend::exec() from a
// forked test process, it does what the upgraded vmm does (from_manifest,
// retrieve_session, retrieve, finish) and reports each check as a line
// "ok <check>" or "FAIL <check>: <why>" on --result-fd.
//
//   luo_exec_helper --luo-manifest-fd N STAGE [--then STAGE]
//
// A stage is one process's part (options in pairs):
//   --result-fd W
//   --allowed-fds a,b,c            fds expected open at start, besides stdio and the manifest
//   [--name X]                     prefixes this stage's checks: "ok X:finish"
//   [--absent-session NAME]        retrieve_session(NAME) fails with ENOENT
//   [--finish-session NAME]        retrieve_session(NAME) and finish it at once
//   [--session NAME]               the session the options below work on
//   [--wrong-token TOKEN]          retrieve(TOKEN) fails with ENOENT
//   [--gmem-first TOKEN]           retrieve(TOKEN), a guest_memfd, before its VM: EAGAIN
//   [--vm TOKEN --gmem TOKEN:SIZE:PATTERN[:DEV:INO]]
//                                  retrieve the VM (a new, usable one: the inherited VM
//                                  is dead), then the guest_memfd (that file, holding PATTERN)
//   [--memfd TOKEN:DEV:INO:CONTENT]
//   [--leak yes]                   clear FD_CLOEXEC on every retrieved fd and open a
//                                  file without it: none of them may reach the next stage
//   [--finish no]                  leave the session unfinished (implied by --then)
// "--then STAGE": the restore "failed": ExecBackend::pass_on() to this helper
// again, with STAGE as its arguments (the manifest option is added by pass_on).
#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cstdlib>
#include <map>
#include <memory>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "kvm/system.h"
#include "luo/exec_backend.h"
#include "tests/luo/test_util.h"

namespace {

using namespace vmm;
using namespace vmm::luo;

struct Report {
  int fd = -1;
  std::string prefix;
  int failures = 0;
  void check(bool ok, const std::string& what, const std::string& why = {}) {
    std::string line = ok ? "ok " + prefix + what + "\n" : "FAIL " + prefix + what + ": " + why + "\n";
    if (!ok) ++failures;
    (void)!::write(fd, line.data(), line.size());
  }
  template <class T>
  void check_result(const Result<T>& result, const std::string& what) {
    check(result.has_value(), what, result ? "" : result.error().describe());
  }
  // `result` failed with `code`.
  template <class T>
  void check_error(const Result<T>& result, int code, const std::string& what) {
    check(!result && result.error().code == code, what,
          result ? "succeeded" : "wrong error: " + result.error().describe());
  }
};

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::stringstream in(s);
  std::string item;
  while (std::getline(in, item, sep)) out.push_back(item);
  return out;
}

std::string describe(const std::set<int>& fds) {
  std::string out;
  for (int fd : fds) out += std::to_string(fd) + "(" + testing::link_of(fd) + ") ";
  return out;
}

uint64_t number(const std::string& s) { return std::stoull(s, nullptr, 0); }

// "DEV:INO" of `fd`.
std::string identity(int fd) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) return "?";
  return std::to_string(st.st_dev) + ":" + std::to_string(st.st_ino);
}

}  // namespace

int main(int argc, char** argv) {
  // Listed before anything here opens a file.
  const std::set<int> open_at_start = testing::open_fds();
  spdlog::set_level(spdlog::level::warn);

  std::map<std::string, std::string> args;
  std::vector<std::string> next_stage;  // after --then
  for (int i = 1; i < argc;) {
    if (std::string(argv[i]) == "--then") {
      next_stage.assign(argv + i + 1, argv + argc);
      break;
    }
    if (i + 1 < argc) args[argv[i]] = argv[i + 1];
    i += 2;
  }
  Report report;
  report.fd = std::atoi(args["--result-fd"].c_str());
  if (args.contains("--name")) report.prefix = args["--name"] + ":";

  const int manifest_fd = std::atoi(args[kManifestFdOption].c_str());
  std::set<int> expected{0, 1, 2, manifest_fd};
  for (const auto& fd : split(args["--allowed-fds"], ',')) expected.insert(std::stoi(fd));
  report.check(open_at_start == expected, "only-preserved-fds-inherited",
               "open: " + describe(open_at_start) + "expected: " + describe(expected));

  auto backend = ExecBackend::from_manifest(manifest_fd);
  report.check_result(backend, "from-manifest");
  if (!backend) return 1;
  report.check(::fcntl(manifest_fd, F_GETFD) < 0, "manifest-closed");
  for (int fd : open_at_start) {
    if (fd < 3 || fd == report.fd || fd == manifest_fd) continue;
    report.check((::fcntl(fd, F_GETFD) & FD_CLOEXEC) != 0, "cloexec-again-" + std::to_string(fd));
  }

  if (args.contains("--absent-session")) {
    report.check_error((*backend)->retrieve_session(args["--absent-session"]), ENOENT, "session-absent");
  }
  // Kept to the end of the stage: finished, but not yet forgotten by the backend.
  std::unique_ptr<Session> finished_session;
  if (args.contains("--finish-session")) {
    auto other = (*backend)->retrieve_session(args["--finish-session"]);
    report.check_result(other, "retrieve-session-to-finish");
    if (other) {
      report.check_result((*other)->finish(), "finish-other-session");
      finished_session = std::move(*other);
    }
  }
  if (!args.contains("--session")) return report.failures == 0 ? 0 : 1;

  auto session = (*backend)->retrieve_session(args["--session"]);
  report.check_result(session, "retrieve-session");
  if (!session) return 1;
  std::vector<UniqueFd> retrieved;  // kept open to the end of the stage

  if (args.contains("--wrong-token")) {
    report.check_error((*session)->retrieve(number(args["--wrong-token"])), ENOENT, "wrong-token-is-ENOENT");
  }
  if (args.contains("--gmem-first")) {
    report.check_error((*session)->retrieve(number(args["--gmem-first"])), EAGAIN, "gmem-before-vm-is-EAGAIN");
  }

  if (args.contains("--vm")) {
    const auto gmem_parts = split(args["--gmem"], ':');
    const uint64_t gmem_token = number(gmem_parts[0]);
    const size_t gmem_size = std::stoull(gmem_parts[1]);
    const auto pattern = static_cast<uint8_t>(number(gmem_parts[2]));

    auto vm = (*session)->retrieve(number(args["--vm"]));
    report.check_result(vm, "retrieve-vm");
    if (vm) {
      report.check(testing::link_of(vm->get()) == "anon_inode:kvm-vm", "vm-is-a-vm");
      auto copy = ::fcntl(vm->get(), F_DUPFD_CLOEXEC, 3);
      auto system = kvm::System::open();
      report.check_result(system, "open-kvm");
      if (system && copy >= 0) {
        kvm::Vm fresh(UniqueFd(copy), system->vcpu_mmap_size());
        auto memory = fresh.create_guest_memfd(4096, testing::kGuestMemfdFlags);
        report.check_result(memory, "new-vm-is-usable");
      }
      retrieved.push_back(std::move(*vm));
    }
    auto gmem = (*session)->retrieve(gmem_token);
    report.check_result(gmem, "retrieve-guest-memfd");
    if (gmem) {
      report.check(testing::check_mapped(gmem->get(), gmem_size, pattern), "guest-memfd-contents");
      if (gmem_parts.size() == 5) {
        report.check(identity(gmem->get()) == gmem_parts[3] + ":" + gmem_parts[4], "guest-memfd-is-the-original",
                     "dev:ino " + identity(gmem->get()));
      }
      retrieved.push_back(std::move(*gmem));
    }
  }

  if (args.contains("--memfd")) {
    const auto parts = split(args["--memfd"], ':');
    auto memfd = (*session)->retrieve(number(parts[0]));
    report.check_result(memfd, "retrieve-memfd");
    if (memfd) {
      const std::string contents = testing::read_all(memfd->get());
      report.check(contents == parts[3], "memfd-contents", "got '" + contents + "'");
      report.check(identity(memfd->get()) == parts[1] + ":" + parts[2], "memfd-is-the-original",
                   "dev:ino " + identity(memfd->get()));
      errno = 0;
      report.check(::ftruncate(memfd->get(), 1 << 20) != 0 && errno == EPERM, "memfd-still-cannot-grow");
      retrieved.push_back(std::move(*memfd));
    }
  }

  if (args["--leak"] == "yes") {
    // What a buggy new vmm might leave behind: pass_on must not hand it on.
    for (const auto& fd : retrieved) (void)::fcntl(fd.get(), F_SETFD, 0);
    report.check(::open("/dev/null", O_RDONLY) >= 0, "opened-leaky-fd");
  }

  if (!next_stage.empty()) {
    std::vector<std::string> next_argv{argv[0]};
    next_argv.insert(next_argv.end(), next_stage.begin(), next_stage.end());
    report.check(true, "passing-on");
    auto passed = (*backend)->pass_on({argv[0], next_argv, std::nullopt, {report.fd}});
    // Only on failure.
    report.check_result(passed, "pass-on");
    return 1;
  }
  if (args["--finish"] != "no") report.check_result((*session)->finish(), "finish");
  return report.failures == 0 ? 0 : 1;
}
