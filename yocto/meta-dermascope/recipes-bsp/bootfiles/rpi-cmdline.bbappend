# No root= in cmdline.txt: the boot script (rpi-u-boot-scr) appends the
# booted slot's partition and rauc.slot=A|B.
# meta-raspberrypi's variable; oelint knows only the core and rauc layers.
# nooelint: oelint.vars.mispell.unknown
CMDLINE_ROOTFS:rpi = "${CMDLINE_ROOT_FSTYPE} rootwait"
