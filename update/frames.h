// Evidence that a live update kept guest memory on the same physical pages:
// the old side samples the frames of a few pages per region once the
// handover is prepared (after a LUO preserve, which pins the pages and may
// migrate one once, out of the kernel's movable or KHO scratch memory, while
// the guest runs); the new side samples the same pages after the resume and
// reports how many are on the same frames. Needs CAP_SYS_ADMIN (pagemap
// shows frame numbers to it only); without it nothing is reported.
#pragma once

#include "machine/machine.h"
#include "update/record.h"

namespace vmm {

inline constexpr size_t kFramesPerRegion = 8;

// The frames of kFramesPerRegion pages of every region (holes and invisible
// frames left out).
[[nodiscard]] std::vector<SampledFrame> sample_guest_frames(const Machine& machine);
// Compares `record.frames_at_prepare` with the same pages now and fills
// `frames_sampled` and `frames_same`.
void check_guest_frames(const Machine& machine, UpdateRecord& record);

}  // namespace vmm
