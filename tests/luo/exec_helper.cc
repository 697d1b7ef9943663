// The "new vmm" of the cross-exec tests: started by ExecBackend::exec() from a
// forked test process, it does what the upgraded vmm does (from_manifest,
// retrieve_session, retrieve, finish) and reports each check as a line
// "ok <check>" or "FAIL <check>: <why>" on --result-fd.
//
//   luo_exec_helper --luo-manifest-fd N --session NAME --result-fd W
//                   --allowed-fds a,b,c          fds expected open at start, besides stdio
//                   [--memfd TOKEN:INODE:CONTENT]
//                   [--vm TOKEN --gmem TOKEN:SIZE:PATTERN]
#include <fcntl.h>
#include <spdlog/spdlog.h>
#include <unistd.h>

#include <cstdlib>
#include <map>
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
  int failures = 0;
  void check(bool ok, const std::string& what, const std::string& why = {}) {
    std::string line = ok ? "ok " + what + "\n" : "FAIL " + what + ": " + why + "\n";
    if (!ok) ++failures;
    (void)!::write(fd, line.data(), line.size());
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

}  // namespace

int main(int argc, char** argv) {
  // Listed before anything here opens a file.
  const std::set<int> open_at_start = testing::open_fds();
  spdlog::set_level(spdlog::level::warn);

  std::map<std::string, std::string> args;
  for (int i = 1; i + 1 < argc; i += 2) args[argv[i]] = argv[i + 1];
  Report report;
  report.fd = std::atoi(args["--result-fd"].c_str());

  std::set<int> expected{0, 1, 2};
  for (const auto& fd : split(args["--allowed-fds"], ',')) expected.insert(std::stoi(fd));
  report.check(open_at_start == expected, "only-preserved-fds-inherited",
               "open: " + describe(open_at_start) + "expected: " + describe(expected));

  const int manifest_fd = std::atoi(args[kManifestFdOption].c_str());
  auto backend = ExecBackend::from_manifest(manifest_fd);
  report.check(backend.has_value(), "from-manifest", backend ? "" : backend.error().describe());
  if (!backend) return 1;
  report.check(::fcntl(manifest_fd, F_GETFD) < 0, "manifest-closed");
  for (int fd : open_at_start) {
    if (fd < 3 || fd == report.fd || fd == manifest_fd) continue;
    report.check((::fcntl(fd, F_GETFD) & FD_CLOEXEC) != 0, "cloexec-again-" + std::to_string(fd));
  }

  auto session = (*backend)->retrieve_session(args["--session"]);
  report.check(session.has_value(), "retrieve-session", session ? "" : session.error().describe());
  if (!session) return 1;

  if (args.contains("--memfd")) {
    const auto parts = split(args["--memfd"], ':');
    auto memfd = (*session)->retrieve(std::stoull(parts[0], nullptr, 0));
    report.check(memfd.has_value(), "retrieve-memfd", memfd ? "" : memfd.error().describe());
    if (memfd) {
      const std::string contents = testing::read_all(memfd->get());
      report.check(contents == parts[2], "memfd-contents", "got '" + contents + "'");
      report.check(testing::inode_of(memfd->get()) == std::stoull(parts[1]), "memfd-inode");
      errno = 0;
      report.check(::ftruncate(memfd->get(), 1 << 20) != 0 && errno == EPERM, "memfd-still-cannot-grow");
    }
  }

  if (args.contains("--vm")) {
    const uint64_t vm_token = std::stoull(args["--vm"], nullptr, 0);
    const auto gmem_parts = split(args["--gmem"], ':');
    const uint64_t gmem_token = std::stoull(gmem_parts[0], nullptr, 0);
    const size_t gmem_size = std::stoull(gmem_parts[1]);
    const auto pattern = static_cast<uint8_t>(std::stoul(gmem_parts[2], nullptr, 0));

    auto vm = (*session)->retrieve(vm_token);
    report.check(vm.has_value(), "retrieve-vm", vm ? "" : vm.error().describe());
    if (vm) {
      report.check(testing::link_of(vm->get()) == "anon_inode:kvm-vm", "vm-is-a-vm");
      auto system = kvm::System::open();
      report.check(system.has_value(), "open-kvm", system ? "" : system.error().describe());
      if (system) {
        kvm::Vm fresh(std::move(*vm), system->vcpu_mmap_size());
        auto memory = fresh.create_guest_memfd(4096, testing::kGuestMemfdFlags);
        report.check(memory.has_value(), "new-vm-is-usable", memory ? "" : memory.error().describe());
      }
    }
    auto gmem = (*session)->retrieve(gmem_token);
    report.check(gmem.has_value(), "retrieve-guest-memfd", gmem ? "" : gmem.error().describe());
    if (gmem) {
      report.check(testing::check_mapped(gmem->get(), gmem_size, pattern), "guest-memfd-contents");
    }
  }

  auto finished = (*session)->finish();
  report.check(finished.has_value(), "finish", finished ? "" : finished.error().describe());
  return report.failures == 0 ? 0 : 1;
}
