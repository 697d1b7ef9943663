#include <gtest/gtest.h>

#include "base/size.h"

namespace vmm {
namespace {

TEST(ParseSize, AcceptsBinarySuffixes) {
  EXPECT_EQ(parse_size("4096", "--memory").value(), 4096u);
  EXPECT_EQ(parse_size("256M", "--memory").value(), 256ull << 20);
  EXPECT_EQ(parse_size("2G", "--memory").value(), 2ull << 30);
  EXPECT_EQ(parse_size("2g", "--memory").value(), 2ull << 30);
  EXPECT_EQ(parse_size("512MiB", "--memory").value(), 512ull << 20);
  EXPECT_EQ(parse_size("64KB", "--memory").value(), 64ull << 10);
  EXPECT_EQ(parse_size("1T", "--memory").value(), 1ull << 40);
}

TEST(ParseSize, RejectsWithTheOptionNamed) {
  for (const char* bad : {"", "M", "-1", "12Q", "1.5G", "lots", "99999999999999999999"}) {
    auto parsed = parse_size(bad, "--memory");
    ASSERT_FALSE(parsed.has_value()) << bad;
    EXPECT_NE(parsed.error().message.find("--memory"), std::string::npos) << parsed.error().message;
  }
  EXPECT_FALSE(parse_size("17179869184G", "--memory").has_value()) << "overflows 64 bits";
}

}  // namespace
}  // namespace vmm
