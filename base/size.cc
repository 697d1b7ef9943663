#include "base/size.h"

#include <cctype>
#include <charconv>
#include <limits>

namespace vmm {

Result<uint64_t> parse_size(std::string_view text, std::string_view what) {
  const std::string shown(text);
  uint64_t number = 0;
  const char* begin = text.data();
  const char* end = text.data() + text.size();
  auto [rest, ec] = std::from_chars(begin, end, number);
  if (ec == std::errc::result_out_of_range)
    return fail(std::string(what) + " '" + shown + "' is too large");
  if (ec != std::errc() || text.empty())
    return fail(std::string(what) + " '" + shown +
                "' is not a size: use a number with an optional K, M, G or T suffix, e.g. 256M or 2G");

  std::string suffix(rest, end);
  for (auto& c : suffix) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  if (suffix.ends_with("IB")) suffix.resize(suffix.size() - 2);
  else if (suffix.size() > 1 && suffix.ends_with("B")) suffix.resize(suffix.size() - 1);

  unsigned shift = 0;
  if (suffix.empty() || suffix == "B") shift = 0;
  else if (suffix == "K") shift = 10;
  else if (suffix == "M") shift = 20;
  else if (suffix == "G") shift = 30;
  else if (suffix == "T") shift = 40;
  else
    return fail(std::string(what) + " '" + shown + "' has an unknown suffix '" +
                std::string(rest, end) + "': use K, M, G or T");

  if (shift && number > (std::numeric_limits<uint64_t>::max() >> shift))
    return fail(std::string(what) + " '" + shown + "' is too large");
  return number << shift;
}

}  // namespace vmm
