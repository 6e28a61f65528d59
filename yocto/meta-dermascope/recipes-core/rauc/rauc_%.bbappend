# Only root and the daemon's user may call RAUC over D-Bus
# (files/dermascope-rauc-dbus.conf); RAUC's own policy allows every user.
FILESEXTRAPATHS:prepend:rpi := "${THISDIR}/files:"
SRC_URI:append:rpi = " file://dermascope-rauc-dbus.conf"
FILES:${PN}-service:append:rpi = " ${sysconfdir}/dbus-1/system.d/dermascope-rauc.conf"

# The daemon marks its slot good itself, after its own health check (camera,
# encoder, store, screen): meta-rauc's rauc-mark-good service would mark
# every boot good as soon as systemd gets to multi-user, so a root filesystem
# whose daemon cannot work would never fall back.
RRECOMMENDS:${PN}:remove:rpi = "${PN}-mark-good"

# rpi: meta-raspberrypi's machine override, unknown to oelint's data.
# nooelint: oelint.func.specific
do_install:append:rpi() {
    install -d ${D}${sysconfdir}/dbus-1/system.d
    install -m 0644 ${WORKDIR}/dermascope-rauc-dbus.conf ${D}${sysconfdir}/dbus-1/system.d/dermascope-rauc.conf
}
