/* Force-included into every C and assembly file of the daemon's target build
 * (CFLAGS_aarch64_unknown_linux_gnu in dermascope_0.1.0.bb): simsimd's
 * -std=c99 build needs <unistd.h> for its aarch64 capability detection, and
 * an assembler cannot read a C header. */
#ifndef __ASSEMBLER__
#include <unistd.h>
#endif
