SUMMARY = "Dermascope OS update: RAUC and what it needs on the device"
DESCRIPTION = "What the image needs to install RAUC bundles into the other \
               root filesystem slot and to fall back when it does not boot."
SECTION = "base"
LICENSE = "MIT"

# The kernel is machine-specific, and so is rauc-conf.
PACKAGE_ARCH = "${MACHINE_ARCH}"

inherit packagegroup

# dermascope-data-mounts: /boot (U-Boot's environment) and /data (the store,
# RAUC's status) in every slot. kernel-image: the boot script loads the
# kernel from the booted slot's /boot, so the kernel is updated with it.
# rauc-conf explicitly: rauc only recommends it, and a skipped rauc-conf (no
# keyring set) must fail the image rather than ship one that trusts nothing.
# u-boot-env: meta-raspberrypi's /etc/fw_env.config (/boot/uboot.env);
# u-boot-fw-utils: fw_printenv/fw_setenv, through which RAUC's uboot backend
# reads and writes BOOT_ORDER and BOOT_x_LEFT. dermascope-watchdog: a hung
# kernel or PID 1 resets the board, so the attempt counts without a human.
# dermascope-os-version: /etc/dermascope-os-version, the floor that rauc-conf's
# pre-install handler refuses lower bundles by.
RDEPENDS:${PN} = "\
    dermascope-data-mounts \
    dermascope-os-version \
    dermascope-watchdog \
    kernel-image \
    rauc \
    rauc-conf \
    u-boot-env \
    u-boot-fw-utils \
"
