// Fuzzes what the vmm reads from systemd's $LISTEN_FDNAMES (update/fd_store.h):
// parse_fd_store_name on each name, and the backend sorting a whole list of
// names (colon-separated, as systemd joins them) into sessions.
//
// Invariants beyond the sanitizers: nothing throws; a name that parses is
// rebuilt by fd_store_name into a name that parses to the same session and
// token; the backend holds a session exactly when some name parsed to it.
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include <spdlog/spdlog.h>

#include "tests/fuzz/fuzz_driver.h"
#include "update/fd_store.h"

namespace vmm::fuzz {
namespace {

void fuzz_one(std::span<const uint8_t> input) {
  const std::string text(input.begin(), input.end());
  std::vector<std::pair<std::string, UniqueFd>> passed;
  std::set<std::string> sessions;
  size_t start = 0;
  while (start <= text.size()) {
    size_t colon = text.find(':', start);
    if (colon == std::string::npos) colon = text.size();
    const std::string name = text.substr(start, colon - start);
    start = colon + 1;
    auto parsed = parse_fd_store_name(name);
    if (parsed) {
      auto rebuilt = fd_store_name(parsed->session, parsed->token);
      if (rebuilt) {
        auto again = parse_fd_store_name(*rebuilt);
        if (!again || again->session != parsed->session || again->token != parsed->token)
          fail("fd_store_name does not round-trip through parse_fd_store_name: " + name);
      }
      sessions.insert(parsed->session);
    }
    passed.emplace_back(name, UniqueFd());
  }
  FdStoreBackend backend(FdStoreEnvironment{}, FdStoreCalls{}, std::move(passed));
  for (const auto& session : sessions)
    if (!backend.has_session(session)) fail("a parsed session is missing from the backend: " + session);
}

}  // namespace
}  // namespace vmm::fuzz

int main(int argc, char** argv) {
  using namespace vmm::fuzz;
  spdlog::set_level(spdlog::level::off);
  Target target;
  target.name = "fd_store_names_fuzz";
  target.fuzz_one = fuzz_one;
  target.corpus = {to_bytes("vmm.web.16:vmm.web.17:vmm.web.2:vmm.web.3"), to_bytes("vmm.a.b.c.18446744073709551615"),
                   to_bytes("other:vmm..1:vmm.x.:vmm.x.-1"), to_bytes("")};
  target.dictionary = {to_bytes("vmm."), to_bytes(":"), to_bytes("."), to_bytes("18446744073709551616")};
  target.text = true;
  target.default_iterations = 100'000;
  target.default_time_cap = std::chrono::seconds(30);
  return run(target, argc, argv);
}
