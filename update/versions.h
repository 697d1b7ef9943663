// The handover formats a vmm binary speaks, and the check an update makes
// before the pause: the new binary is asked (`vmm handover-info`, a JSON line
// on stdout) and a mismatch is refused while the guest still runs.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>

#include <nlohmann/json.hpp>

#include "base/result.h"

namespace vmm {

struct FormatVersion {
  uint32_t major = 0;
  uint32_t minor = 0;
  friend bool operator==(const FormatVersion&, const FormatVersion&) = default;
};

struct HandoverVersions {
  std::string program;          // the vmm's own version, for messages only
  FormatVersion handover;       // the handover record (update/handover_record.h)
  FormatVersion state;          // the saved-state blob (migration/state_blob.h)
  uint32_t luo_manifest = 0;    // the exec backend's manifest (luo/manifest.h)
  uint32_t transfer = 0;        // the transfer channel's message protocol (update/transfer.h)

  [[nodiscard]] nlohmann::json to_json() const;
  [[nodiscard]] static Result<HandoverVersions> from_json(const nlohmann::json& json);
};

// What this binary speaks. Defined in update/versions.cc, a library of its
// own so the test suite can link a build that claims other versions.
[[nodiscard]] HandoverVersions this_binary_versions();

// Whether a process speaking `ours` can hand a VM to one speaking `theirs`
// in `mode` (exec or transfer): the same major of every format the mode uses
// (a reader takes any minor of its major): the handover record and the
// saved state always, the LUO manifest for exec, the channel for transfer.
[[nodiscard]] Result<void> check_compatible(const HandoverVersions& ours, const HandoverVersions& theirs,
                                            std::string_view mode);

// Runs `binary handover-info` (bounded by `timeout`, with no descriptor of
// this process inherited) and parses its answer. A binary that is not a
// vmm fails here with an error that says so.
[[nodiscard]] Result<HandoverVersions> query_versions(const std::string& binary, std::chrono::milliseconds timeout);

}  // namespace vmm
