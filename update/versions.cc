// Built into its own library (vmm_update_versions): tests link a variant
// compiled with VMM_TEST_HANDOVER_MAJOR to get a vmm of another version.
#include "update/versions.h"

#include "luo/manifest.h"
#include "migration/state_blob.h"
#include "update/handover_record.h"
#include "update/transfer.h"

#ifndef VMM_VERSION_MAJOR
#define VMM_VERSION_MAJOR 0
#define VMM_VERSION_MINOR 0
#define VMM_VERSION_MICRO 0
#endif

namespace vmm {

HandoverVersions this_binary_versions() {
  HandoverVersions versions;
  versions.program = std::to_string(VMM_VERSION_MAJOR) + "." + std::to_string(VMM_VERSION_MINOR) + "." +
                     std::to_string(VMM_VERSION_MICRO);
#if defined(VMM_TEST_HANDOVER_MAJOR)
  versions.handover = {VMM_TEST_HANDOVER_MAJOR, 0};
#else
  versions.handover = {kHandoverMajor, kHandoverMinor};
#endif
  versions.state = {migration::kFormatMajor, migration::kFormatMinor};
  versions.luo_manifest = luo::manifest::kVersion;
  versions.transfer = transfer::kProtocolVersion;
  return versions;
}

}  // namespace vmm
