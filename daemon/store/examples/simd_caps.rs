//! Prints which SIMD kernel families simsimd's run-time dispatch found, one
//! `name yes|no` per line. `scripts/test-aarch64` runs it under
//! `qemu-aarch64 -cpu cortex-a72` and `-cpu cortex-a76`: simsimd 6.5 builds
//! its C with `-std=c99`, which hides `<unistd.h>`'s `_POSIX_VERSION` and
//! glibc's `sigaction`, both of which its aarch64 detection needs, so without
//! `CFLAGS_aarch64_unknown_linux_gnu="-D_GNU_SOURCE -include unistd.h"` the
//! detection would fall back to a fixed NEON-only guess (on a Cortex-A76 it
//! then misses FP16; neither Pi core has the I8MM simsimd 6.5 requires for
//! its NEON i8 kernels, so int8 rows run its serial code either way).

use simsimd::capabilities as caps;

fn main() {
    let families = [
        ("dynamic_dispatch", caps::uses_dynamic_dispatch()),
        ("neon", caps::uses_neon()),
        ("neon_f16", caps::uses_neon_f16()),
        ("neon_bf16", caps::uses_neon_bf16()),
        ("neon_i8", caps::uses_neon_i8()),
        ("sve", caps::uses_sve()),
        ("haswell", caps::uses_haswell()),
        ("skylake", caps::uses_skylake()),
        ("ice", caps::uses_ice()),
    ];
    for (name, used) in families {
        println!("{name} {}", if used { "yes" } else { "no" });
    }
}
