SUMMARY = "Mounts of the partitions that both root filesystem slots share"
DESCRIPTION = "systemd mount units for the boot partition (U-Boot and its \
               environment) and the data partition, and the bind mount that \
               keeps /var/lib/dermascope on the data partition."
SECTION = "base"
LICENSE = "MIT"
# Unit files of this layer, no licence text of their own.
# nooelint: oelint.var.licenseremotefile
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/MIT;md5=0835ade698e0bcf8506ecda2f7b4f302"

SRC_URI = "\
    file://boot.mount \
    file://data.mount \
    file://dermascope-data-dirs.service \
    file://var-lib-dermascope.mount \
"

S = "${WORKDIR}"

inherit systemd features_check

REQUIRED_DISTRO_FEATURES = "systemd"

# The partition device paths depend on the board (DERMASCOPE_RAUC_DISK, set
# in the kas file with the other RAUC settings).
PACKAGE_ARCH = "${MACHINE_ARCH}"

# Mount units, not fstab: wic writes fstab entries only into the root
# filesystem it builds for slot A (the wks disables that), while a bundle
# carries the image's own root filesystem, which must mount the same.
do_install() {
    install -d ${D}${systemd_system_unitdir}
    for unit in boot.mount data.mount dermascope-data-dirs.service var-lib-dermascope.mount; do
        sed -e 's|@DISK@|${DERMASCOPE_RAUC_DISK}|' ${S}/$unit > ${D}${systemd_system_unitdir}/$unit
        chmod 0644 ${D}${systemd_system_unitdir}/$unit
    done
    install -d ${D}/data
}

SYSTEMD_SERVICE:${PN} = "boot.mount data.mount dermascope-data-dirs.service var-lib-dermascope.mount"

FILES:${PN} += "/data"
