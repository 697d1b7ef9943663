#include "tests/fuzz/fuzz_driver.h"

#include <fcntl.h>
#include <sanitizer/common_interface_defs.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <optional>

#include <fmt/format.h>

namespace vmm::fuzz {
namespace {

// What the death callback needs to save the input that failed.
struct Current {
  std::string name;
  uint64_t seed = 0;
  uint64_t iteration = 0;
  const Bytes* input = nullptr;
  std::string crash_dir = ".";
};
Current current;

// Called by the sanitizer runtime just before it ends the process, and by
// fail(): writes the input being run, with plain system calls.
void save_current_input() {
  if (!current.input) return;
  const std::string path = fmt::format("{}/crash-{}-seed{}-input{}.bin", current.crash_dir, current.name,
                                       current.seed, current.iteration);
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) {
    std::fprintf(stderr, "fuzz %s: cannot save the failing input to %s: %s\n", current.name.c_str(), path.c_str(),
                 std::strerror(errno));
    return;
  }
  const uint8_t* data = current.input->data();
  size_t left = current.input->size();
  while (left > 0) {
    ssize_t written = ::write(fd, data, left);
    if (written <= 0) break;
    data += written;
    left -= static_cast<size_t>(written);
  }
  ::close(fd);
  std::fprintf(stderr,
               "fuzz %s: input %llu (seed %llu) failed; saved to %s (replay: %s %s)\n", current.name.c_str(),
               static_cast<unsigned long long>(current.iteration), static_cast<unsigned long long>(current.seed),
               path.c_str(), current.name.c_str(), path.c_str());
}

std::optional<uint64_t> env_number(const char* name) {
  const char* text = std::getenv(name);
  if (!text || !*text) return std::nullopt;
  char* end = nullptr;
  errno = 0;
  unsigned long long value = std::strtoull(text, &end, 0);
  if (errno != 0 || *end != '\0') {
    std::fprintf(stderr, "fuzz: %s=%s is not a number; ignoring it\n", name, text);
    return std::nullopt;
  }
  return value;
}

std::optional<Bytes> read_file(const char* path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return std::nullopt;
  return Bytes(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

constexpr std::array<uint8_t, 12> kInterestingBytes = {0x00, 0x01, 0x7f, 0x80, 0xff, '\n', '\r',
                                                       '"',  '\\', '{',  '[',  '0'};
constexpr std::array<uint64_t, 10> kInterestingWords = {0,          1,          0x7f,        0xff,
                                                        0x7fff,     0xffff,     0x7fffffff,  0x80000000,
                                                        0xffffffff, ~uint64_t{0}};
constexpr std::array<std::string_view, 12> kHugeNumbers = {
    "1e400", "-1e400", "1e-400", "18446744073709551616", "-9223372036854775809", "1.7976931348623159e308",
    "123456789012345678901234567890123456789012345678901234567890", "-0", "0e0", "1E+9999", "4.9e-325",
    "9007199254740993"};
constexpr std::array<std::string_view, 10> kInvalidUtf8 = {
    "\xc0\x80", "\xed\xa0\x80", "\xff", "\xfe\xff", "\xe2\x82", "\xf4\x90\x80\x80", "\x80", "\xc3",
    "\xf0\x9f\x98", "\xef\xbf\xbe"};

}  // namespace

Bytes to_bytes(std::string_view text) { return Bytes(text.begin(), text.end()); }

uint64_t Rng::next() {
  uint64_t z = (state_ += 0x9e3779b97f4a7c15ULL);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

uint64_t Rng::below(uint64_t bound) { return bound == 0 ? 0 : next() % bound; }

void Mutator::insert(Bytes& data, size_t at, std::string_view text) {
  data.insert(data.begin() + static_cast<std::ptrdiff_t>(at), text.begin(), text.end());
}

void Mutator::insert(Bytes& data, size_t at, const Bytes& bytes) {
  data.insert(data.begin() + static_cast<std::ptrdiff_t>(at), bytes.begin(), bytes.end());
}

Bytes Mutator::mutate(const Bytes& input) {
  Bytes data = input;
  const uint64_t rounds = 1 + rng_.below(4);
  for (uint64_t i = 0; i < rounds; ++i) mutate_once(data);
  return data;
}

void Mutator::mutate_once(Bytes& data) {
  if (target_.text && rng_.chance(40)) {
    text_mutation(data);
  } else {
    binary_mutation(data);
  }
}

void Mutator::binary_mutation(Bytes& data) {
  switch (rng_.below(11)) {
    case 0:  // truncate
      data.resize(rng_.below(data.size() + 1));
      break;
    case 1:  // flip a bit
      if (!data.empty()) data[rng_.below(data.size())] ^= static_cast<uint8_t>(1u << rng_.below(8));
      break;
    case 2:  // set a byte
      if (!data.empty())
        data[rng_.below(data.size())] = rng_.chance(50) ? kInterestingBytes[rng_.below(kInterestingBytes.size())]
                                                        : static_cast<uint8_t>(rng_.next());
      break;
    case 3: {  // delete a range
      if (data.empty()) break;
      size_t from = rng_.below(data.size());
      size_t length = 1 + rng_.below(std::min<size_t>(data.size() - from, 64));
      data.erase(data.begin() + static_cast<std::ptrdiff_t>(from),
                 data.begin() + static_cast<std::ptrdiff_t>(from + length));
      break;
    }
    case 4: {  // duplicate a range
      if (data.empty()) break;
      size_t from = rng_.below(data.size());
      size_t length = 1 + rng_.below(std::min<size_t>(data.size() - from, 256));
      Bytes copy(data.begin() + static_cast<std::ptrdiff_t>(from),
                 data.begin() + static_cast<std::ptrdiff_t>(from + length));
      insert(data, position(data), copy);
      break;
    }
    case 5: {  // insert random bytes
      Bytes random(1 + rng_.below(16));
      for (auto& byte : random) byte = static_cast<uint8_t>(rng_.next());
      insert(data, position(data), random);
      break;
    }
    case 6:  // a dictionary token
      if (!target_.dictionary.empty())
        insert(data, position(data), target_.dictionary[rng_.below(target_.dictionary.size())]);
      break;
    case 7: {  // splice: our head, another corpus input's tail
      if (target_.corpus.empty()) break;
      const Bytes& other = target_.corpus[rng_.below(target_.corpus.size())];
      data.resize(rng_.below(data.size() + 1));
      size_t from = rng_.below(other.size() + 1);
      data.insert(data.end(), other.begin() + static_cast<std::ptrdiff_t>(from), other.end());
      break;
    }
    case 8: {  // overwrite an integer field (1, 2, 4 or 8 bytes, little-endian)
      const size_t width = size_t{1} << rng_.below(4);
      if (data.size() < width) break;
      const size_t at = rng_.below(data.size() - width + 1);
      uint64_t value = kInterestingWords[rng_.below(kInterestingWords.size())];
      if (rng_.chance(30)) value = data.size() + rng_.below(64) - 32;  // sizes and offsets near the real ones
      std::memcpy(data.data() + at, &value, width);
      break;
    }
    case 9:  // add or subtract a little from a byte
      if (!data.empty()) data[rng_.below(data.size())] += static_cast<uint8_t>(rng_.below(33) - 16);
      break;
    default: {  // an embedded NUL
      data.insert(data.begin() + static_cast<std::ptrdiff_t>(position(data)), uint8_t{0});
      break;
    }
  }
}

void Mutator::text_mutation(Bytes& data) {
  switch (rng_.below(8)) {
    case 0:  // a huge or odd number
      insert(data, position(data), kHugeNumbers[rng_.below(kHugeNumbers.size())]);
      break;
    case 1: {  // deep nesting, near the limits or far past them
      const size_t depth = rng_.chance(70) ? 50 + rng_.below(30) : 100 + rng_.below(40'000);
      const char open = rng_.chance(50) ? '[' : '{';
      Bytes nest(depth, static_cast<uint8_t>(open));
      size_t at = position(data);
      insert(data, at, nest);
      if (rng_.chance(60)) {
        const char close = open == '[' ? ']' : '}';
        Bytes closing(depth, static_cast<uint8_t>(close));
        insert(data, std::min(data.size(), at + depth + rng_.below(8)), closing);
      }
      break;
    }
    case 2: {  // a long string, up to past the line limit
      const size_t length = rng_.chance(80) ? rng_.below(2'000) : rng_.below(70'000);
      std::string text = "\"" + std::string(length, static_cast<char>('a' + rng_.below(26))) + "\"";
      insert(data, position(data), text);
      break;
    }
    case 3:  // invalid UTF-8
      insert(data, position(data), kInvalidUtf8[rng_.below(kInvalidUtf8.size())]);
      break;
    case 4: {  // several inputs on one connection: this one repeated, or another appended
      const uint64_t copies = 1 + rng_.below(rng_.chance(90) ? 4 : 200);
      const Bytes unit = (rng_.chance(50) || target_.corpus.empty())
                             ? data
                             : target_.corpus[rng_.below(target_.corpus.size())];
      for (uint64_t i = 0; i < copies && data.size() < 256 * 1024; ++i) {
        if (rng_.chance(80)) data.push_back('\n');
        data.insert(data.end(), unit.begin(), unit.end());
      }
      break;
    }
    case 5:  // an escape, valid or not
      insert(data, position(data), std::array<std::string_view, 8>{"\\u0000", "\\ud800", "\\udc00\\ud800", "\\",
                                                                   "\\x", "\\u12", "\\uDBFF\\uDFFF", "\\/"}
                                       [rng_.below(8)]);
      break;
    case 6:  // a line break where none belongs, or a CR
      insert(data, position(data), std::array<std::string_view, 4>{"\n", "\r\n", "\r", "\n\n"}[rng_.below(4)]);
      break;
    default:  // a dictionary token replacing a range
      if (!target_.dictionary.empty() && !data.empty()) {
        size_t from = rng_.below(data.size());
        size_t length = rng_.below(std::min<size_t>(data.size() - from, 16) + 1);
        data.erase(data.begin() + static_cast<std::ptrdiff_t>(from),
                   data.begin() + static_cast<std::ptrdiff_t>(from + length));
        insert(data, from, target_.dictionary[rng_.below(target_.dictionary.size())]);
      }
      break;
  }
}

void fail(const std::string& message) {
  std::fprintf(stderr, "fuzz %s: FAILED: %s\n", current.name.c_str(), message.c_str());
  save_current_input();
  std::abort();
}

int run(const Target& target, int argc, char** argv) {
  current.name = target.name;
  if (const char* dir = std::getenv("VMM_FUZZ_CRASH_DIR"); dir && *dir) current.crash_dir = dir;
  __sanitizer_set_death_callback(save_current_input);

  if (argc > 1) {  // replay
    for (int i = 1; i < argc; ++i) {
      auto input = read_file(argv[i]);
      if (!input) {
        std::fprintf(stderr, "fuzz %s: cannot read %s\n", target.name.c_str(), argv[i]);
        return 2;
      }
      current.input = &*input;
      target.fuzz_one(*input);
      std::printf("fuzz %s: %s (%zu bytes) ran without failure\n", target.name.c_str(), argv[i], input->size());
    }
    current.input = nullptr;
    return 0;
  }

  const uint64_t seed = env_number("VMM_FUZZ_SEED").value_or(1);
  const uint64_t iterations = env_number("VMM_FUZZ_ITERATIONS").value_or(target.default_iterations);
  const auto time_cap =
      std::chrono::seconds(env_number("VMM_FUZZ_SECONDS").value_or(target.default_time_cap.count()));
  current.seed = seed;
  std::printf("fuzz %s: seed %llu, %zu corpus inputs, then %llu mutated inputs, time cap %lld s "
              "(VMM_FUZZ_SEED, VMM_FUZZ_ITERATIONS, VMM_FUZZ_SECONDS override these)\n",
              target.name.c_str(), static_cast<unsigned long long>(seed), target.corpus.size(),
              static_cast<unsigned long long>(iterations), static_cast<long long>(time_cap.count()));
  std::fflush(stdout);

  const auto start = std::chrono::steady_clock::now();
  for (size_t i = 0; i < target.corpus.size(); ++i) {
    current.iteration = i;
    current.input = &target.corpus[i];
    target.fuzz_one(target.corpus[i]);
  }

  Rng rng(seed);
  Mutator mutator(rng, target);
  Bytes previous;
  uint64_t ran = 0;
  bool capped = false;
  for (; ran < iterations; ++ran) {
    if ((ran & 63) == 0 && std::chrono::steady_clock::now() - start > time_cap) {
      capped = true;
      break;
    }
    // Mostly a corpus input; sometimes the previous mutant again, to stack
    // mutations deeper than one round goes.
    const bool again = !previous.empty() && rng.chance(25);
    const Bytes& base = again || target.corpus.empty() ? previous : target.corpus[rng.below(target.corpus.size())];
    Bytes input = mutator.mutate(base);
    current.iteration = target.corpus.size() + ran;
    current.input = &input;
    target.fuzz_one(input);
    current.input = nullptr;
    previous = std::move(input);
  }
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("fuzz %s: %zu corpus + %llu mutated inputs in %.1f s, no failure%s\n", target.name.c_str(),
              target.corpus.size(), static_cast<unsigned long long>(ran), seconds,
              capped ? " (stopped early at the time cap; raise VMM_FUZZ_SECONDS for the full count)" : "");
  return 0;
}

}  // namespace vmm::fuzz
