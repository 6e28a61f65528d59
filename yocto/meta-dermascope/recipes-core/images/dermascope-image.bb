SUMMARY = "Dermascope device image: daemon and encoder bundle, minimal systemd base"
DESCRIPTION = "The SD-card image of the handheld: core-image-minimal on systemd \
               with the dermascope daemon, its encoder bundle and v4l-utils."
SECTION = "images"
LICENSE = "MIT"

# poky's meta/recipes-core/images/core-image-minimal.bb, found through BBPATH
# at build time; oelint looks for it in this layer only.
# nooelint: oelint.file.requirenotfound
require recipes-core/images/core-image-minimal.bb

inherit features_check
REQUIRED_DISTRO_FEATURES = "systemd"

# No debug or development image features: the device runs the daemon only.
# v4l-utils (v4l2-ctl, media-ctl) is there to diagnose the camera in service.
IMAGE_INSTALL += "\
    dermascope \
    dermascope-models \
    v4l-utils \
"

# The kernel's modules: spidev and videodev (KERNEL_MODULE_AUTOLOAD in the kas
# file only writes their modules-load.d entries), uvcvideo, the camera sensor
# and receiver drivers. meta-raspberrypi recommends kernel-modules through
# MACHINE_EXTRA_RRECOMMENDS, which only packagegroup-base pulls in, and
# core-image-minimal has no packagegroup-base. All of them rather than a list:
# which are modules and which built in depends on the kernel's defconfig, and
# a listed package that does not exist fails the image.
IMAGE_INSTALL += "kernel-modules"

# OS updates: RAUC and what it needs, on the A/B SD card layout. The bundle
# (dermascope-bundle) takes the ext4 root filesystem.
IMAGE_INSTALL += "packagegroup-dermascope-update"
IMAGE_FSTYPES:append = " ext4"
WKS_FILE = "dermascope-ab.wks.in"

# The board side (SPI bus for the display, I2C, camera sensor overlay, module
# autoload) is set in yocto/kas/dermascope-rpi4.yml, not here: those variables
# are read by meta-raspberrypi's rpi-config and by the kernel recipe, and a
# value set in an image recipe never reaches other recipes.
