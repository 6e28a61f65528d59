# boot.scr with RAUC's A/B boot counting (files/boot.cmd.in) instead of
# meta-raspberrypi's, which always boots the kernel on the FAT partition.
# Takes effect with RPI_USE_U_BOOT = "1" (kas file), which puts U-Boot and
# boot.scr on the boot partition. DERMASCOPE_RAUC_DISK: the kas file.

FILESEXTRAPATHS:prepend:rpi := "${THISDIR}/files:"

# The U-Boot script hands Linux the root partition by its Linux name. rpi is
# meta-raspberrypi's machine override, which oelint's data does not know.
# nooelint: oelint.func.specific
do_compile:prepend:rpi() {
    sed -i -e 's|@@DERMASCOPE_RAUC_DISK@@|${DERMASCOPE_RAUC_DISK}|g' ${WORKDIR}/boot.cmd.in
}
