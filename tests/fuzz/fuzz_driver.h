// A small fuzzing driver for parsers, for GCC, which has no libFuzzer.
//
// A target is a function that takes any bytes (fuzz_one) plus a corpus of
// valid inputs. The driver runs every corpus input, then N inputs made by
// mutating corpus inputs (truncation, bit and byte flips, inserted,
// deleted and repeated ranges, splices, dictionary tokens, huge numbers, deep
// nesting, long strings, invalid UTF-8, NULs, several inputs joined), all
// from one seeded generator: a run is reproducible from its seed. The
// targets are compiled with -fsanitize=address,undefined
// -fno-sanitize-recover=all, so any memory error or undefined behaviour
// ends the run; fail() ends it for a broken invariant. Either way the input
// is first written to a file, which the target replays when given it as an
// argument.
//
// Environment: VMM_FUZZ_SEED (default 1), VMM_FUZZ_ITERATIONS (the target's
// default), VMM_FUZZ_SECONDS (time cap; the target's default),
// VMM_FUZZ_CRASH_DIR (where a failing input goes; default the current
// directory). See docs/architecture.md, "Fuzzing".
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace vmm::fuzz {

using Bytes = std::vector<uint8_t>;

[[nodiscard]] Bytes to_bytes(std::string_view text);

// splitmix64: small, fast, and the same sequence on every machine.
class Rng {
 public:
  explicit Rng(uint64_t seed) : state_(seed) {}
  uint64_t next();
  // Uniform in [0, bound); 0 when bound is 0.
  uint64_t below(uint64_t bound);
  // True with probability percent/100.
  bool chance(unsigned percent) { return below(100) < percent; }

 private:
  uint64_t state_;
};

struct Target {
  std::string name;
  // Runs one input. Must not throw; calls fail() when an invariant breaks.
  std::function<void(std::span<const uint8_t>)> fuzz_one;
  // Valid (and some deliberately invalid) inputs the mutations start from.
  std::vector<Bytes> corpus;
  // Tokens the mutator inserts (keywords, field names, magic numbers).
  std::vector<Bytes> dictionary;
  // Text formats get the text mutations too (numbers, nesting, strings).
  bool text = false;
  uint64_t default_iterations = 100'000;
  std::chrono::seconds default_time_cap{50};
};

class Mutator {
 public:
  Mutator(Rng& rng, const Target& target) : rng_(rng), target_(target) {}
  // One to four stacked mutations of `input`.
  [[nodiscard]] Bytes mutate(const Bytes& input);

 private:
  void mutate_once(Bytes& data);
  void binary_mutation(Bytes& data);
  void text_mutation(Bytes& data);
  [[nodiscard]] size_t position(const Bytes& data) { return rng_.below(data.size() + 1); }
  void insert(Bytes& data, size_t at, std::string_view text);
  void insert(Bytes& data, size_t at, const Bytes& bytes);

  Rng& rng_;
  const Target& target_;
};

// Reports a broken invariant for the current input: saves it, prints
// `message` and aborts.
[[noreturn]] void fail(const std::string& message);

// The program's main: `target [FILE...]` replays FILEs; without files it
// fuzzes. Returns the exit status.
int run(const Target& target, int argc, char** argv);

}  // namespace vmm::fuzz
