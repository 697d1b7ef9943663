#include "luo/session.h"

#include <fmt/format.h>

namespace vmm::luo {

Result<void> validate_session_name(std::string_view name) {
  if (name.empty()) return fail("LUO session name is empty: give the session a name", EINVAL);
  if (name.find('\0') != std::string_view::npos) {
    return fail(fmt::format("LUO session name contains a NUL byte after '{}': the uAPI needs a "
                            "NUL-terminated name without embedded NULs",
                            std::string_view(name.data())),
                EINVAL);
  }
  if (name.size() > kMaxSessionNameLength) {
    // The kernel copies the name with strscpy() and would silently truncate
    // it; two long names could then collide after the update. Refuse instead.
    return fail(fmt::format("LUO session name '{}' is {} bytes long: at most {} fit (the uAPI holds "
                            "{} bytes including the terminating NUL)",
                            name, name.size(), kMaxSessionNameLength, uapi::kSessionNameLength),
                EINVAL);
  }
  return {};
}

}  // namespace vmm::luo
