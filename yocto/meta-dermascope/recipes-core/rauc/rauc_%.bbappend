# The daemon marks its slot good itself, after its own health check (camera,
# encoder, store, screen): meta-rauc's rauc-mark-good service would mark
# every boot good as soon as systemd gets to multi-user, so a root filesystem
# whose daemon cannot work would never fall back.
RRECOMMENDS:${PN}:remove:rpi = "${PN}-mark-good"
