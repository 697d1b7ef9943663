// Fuzzes luo::manifest::decode, the exec backend's handover record that a
// new vmm reads from an inherited memfd. Every input is decoded as it is and
// a second time with its checksum made to match, so the mutations reach the
// checks behind it (sizes, names, kinds, tokens, fds, VM tokens).
//
// Invariant beyond the sanitizers: whatever decode() accepts encodes to a
// manifest that decodes to the same sessions and entries.
#include <cstring>
#include <span>
#include <vector>

#include "luo/manifest.h"
#include "tests/fuzz/fuzz_driver.h"

namespace vmm::fuzz {
namespace {

namespace manifest = luo::manifest;
using luo::FileKind;

bool same(const manifest::Manifest& a, const manifest::Manifest& b) {
  if (a.sessions.size() != b.sessions.size()) return false;
  for (size_t s = 0; s < a.sessions.size(); ++s) {
    const auto& x = a.sessions[s];
    const auto& y = b.sessions[s];
    if (x.name != y.name || x.entries.size() != y.entries.size()) return false;
    for (size_t e = 0; e < x.entries.size(); ++e) {
      const auto& p = x.entries[e];
      const auto& q = y.entries[e];
      if (p.token != q.token || p.fd != q.fd || p.kind != q.kind || p.vm_token != q.vm_token || p.size != q.size ||
          p.dev != q.dev || p.ino != q.ino)
        return false;
    }
  }
  return true;
}

void decode_and_check(std::span<const uint8_t> bytes) {
  auto decoded = manifest::decode(bytes);
  if (!decoded) {
    if (decoded.error().message.empty()) fail("decode failed without saying why");
    return;
  }
  auto again = manifest::decode(manifest::encode(*decoded));
  if (!again) fail("a re-encoded manifest does not decode: " + again.error().describe());
  if (!same(*again, *decoded)) fail("a re-encoded manifest decodes to a different manifest");
}

void fuzz_one(std::span<const uint8_t> input) {
  decode_and_check(input);
  if (input.size() < sizeof(manifest::Header)) return;
  std::vector<uint8_t> resealed(input.begin(), input.end());
  manifest::Header header{};
  std::memcpy(&header, resealed.data(), sizeof header);
  header.checksum = manifest::checksum(std::span<const uint8_t>(resealed).subspan(sizeof header));
  std::memcpy(resealed.data(), &header, sizeof header);
  decode_and_check(resealed);
}

std::vector<Bytes> corpus() {
  manifest::Manifest full;
  full.sessions.push_back({"vmm", {{0x1, 10, FileKind::kvm_vm, 0, 0, 1, 2},
                                   {0x2, 11, FileKind::guest_memfd, 0x1, 1 << 20, 3, 4},
                                   {0x3, 12, FileKind::memfd, 0, 4096, 5, 6}}});
  full.sessions.push_back({"empty", {}});
  full.sessions.push_back({"second", {{0x1, 13, FileKind::memfd, 0, 8192, 7, 8}}});
  manifest::Manifest one;
  one.sessions.push_back({"vmm-restore", {{0x10, 3, FileKind::memfd, 0, 1 << 20, 9, 9}}});
  return {manifest::encode(full), manifest::encode(one), manifest::encode(manifest::Manifest{})};
}

}  // namespace
}  // namespace vmm::fuzz

int main(int argc, char** argv) {
  using namespace vmm::fuzz;
  Target target;
  target.name = "luo_manifest_fuzz";
  target.fuzz_one = fuzz_one;
  target.corpus = corpus();
  target.dictionary = {to_bytes("VMM-LUO"), to_bytes("vmm"), Bytes(64, 'n')};
  target.default_iterations = 200'000;
  target.default_time_cap = std::chrono::seconds(60);
  return run(target, argc, argv);
}
