// The AMX tiles' entry point, for avx512.cpp in the AMX build.
#pragma once

#include "../common.h"

namespace qk {

// y = x @ w^T on AMX tiles for a bf16 call (any M, in passes of 16 rows); false (nothing done) where
// the format does not take tiles or the kernel refused the tile state
bool amx_gemv(const QkGemv& call);

}  // namespace qk
