// Progress lines on stderr: what is being measured and how far along it is,
// e.g. "12:04:31 [3/16] vmm transfer 4G 2 vCPUs: update 2/5, blackout 1.3 ms, brown-out 14.2 s".
#pragma once

#include <string>

#include <fmt/format.h>

namespace bench {

class Progress {
 public:
  explicit Progress(int total_units) : total_(total_units) {}

  // Starts the next unit (a system on one RAM size and vCPU count).
  void begin(std::string label) {
    ++index_;
    label_ = std::move(label);
  }
  template <class... Args>
  void say(fmt::format_string<Args...> format, Args&&... args) {
    line(fmt::format(format, std::forward<Args>(args)...));
  }
  void line(const std::string& message) const;
  [[nodiscard]] int index() const { return index_; }
  [[nodiscard]] int total() const { return total_; }

 private:
  int total_;
  int index_ = 0;
  std::string label_;
};

// "1.3 ms", "14.2 s": a duration in a unit that suits it.
std::string human_us(int64_t us);
// "1 vCPU", "2 vCPUs".
std::string vcpus_label(uint32_t vcpus);

}  // namespace bench
