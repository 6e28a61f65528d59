SUMMARY = "systemd arms the board's hardware watchdog"
DESCRIPTION = "A system.conf.d drop-in that makes systemd arm and pet the \
               SoC's hardware watchdog (bcm2835-wdt), so a hung kernel or \
               PID 1 resets the board and the bootloader counts the attempt."
SECTION = "base"
LICENSE = "MIT"
# A configuration file of this layer, no licence text of its own.
# nooelint: oelint.var.licenseremotefile
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/MIT;md5=0835ade698e0bcf8506ecda2f7b4f302"

SRC_URI = "file://10-dermascope-watchdog.conf"

S = "${WORKDIR}"

inherit allarch features_check

REQUIRED_DISTRO_FEATURES = "systemd"

# systemd reads ${systemd_unitdir}/system.conf.d/*.conf at start.
do_install() {
    install -d ${D}${systemd_unitdir}/system.conf.d
    install -m 0644 ${S}/10-dermascope-watchdog.conf ${D}${systemd_unitdir}/system.conf.d/
}

FILES:${PN} += "${systemd_unitdir}/system.conf.d"
