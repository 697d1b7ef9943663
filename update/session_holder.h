// Keeping an unfinished LUO session after a failed restore in a new kernel.
//
// A retrieved session is finished when its last descriptor closes, and every
// file in it that was not retrieved again goes with it: the guest's memory.
// So a restore that fails (bad state, a wrong option, KVM refusing) does not
// exit; it holds the session, and so does a forked twin, so that one SIGTERM,
// SIGKILL or crash of either loses nothing. Either holder hands the session
// to the next `vmm restore --session NAME` over an abstract Unix socket named
// after the session (root or the holder's own user only), and both exit once
// it is taken. `vmm restore --session NAME --discard` takes it to drop it on
// purpose. Only stopping both holders loses the memory.
#pragma once

#include <string>

#include "base/result.h"
#include "base/unique_fd.h"

namespace vmm {

// Holds `session` (an incoming kernel session fd) until it is taken, or this
// process gets SIGINT/SIGTERM (blocked by the caller, as the vmm's main
// thread does). Returns the process's exit status.
[[nodiscard]] int hold_session(FdRef session, const std::string& name);

// Takes session `name` from its holders: the session fd, which the caller
// then owns (the holders exit). ENOENT when no holder serves the name.
[[nodiscard]] Result<UniqueFd> take_held_session(const std::string& name);

}  // namespace vmm
