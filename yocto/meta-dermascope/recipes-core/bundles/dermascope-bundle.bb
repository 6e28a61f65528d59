# nooelint: oelint.file.underscores,oelint.var.mandatoryvar.SRC_URI
# The bundle's version is DERMASCOPE_OS_VERSION (RAUC_BUNDLE_VERSION below),
# not a recipe version, hence no _PV in the file name; bundle.bbclass
# collects the image from DEPLOY_DIR_IMAGE, hence no SRC_URI.
SUMMARY = "Dermascope OS update: signed RAUC bundle of dermascope-image"
DESCRIPTION = "A verity-format RAUC bundle holding dermascope-image's ext4 \
               root filesystem, for the slot the device is not running from."
SECTION = "misc"
LICENSE = "MIT"

inherit bundle

# Signing: the operator's key and certificate (or PKCS#11 URIs), never in
# this repository. The certificate must chain to the CA that the devices'
# keyring (DERMASCOPE_RAUC_KEYRING) holds; bundle.bbclass checks the signed
# bundle against that keyring before deploying it. scripts/rauc-dev-pki
# makes a development set. The DERMASCOPE_* settings: the kas file.
DERMASCOPE_RAUC_KEY ??= ""
DERMASCOPE_RAUC_CERT ??= ""
RAUC_KEY_FILE = "${DERMASCOPE_RAUC_KEY}"
RAUC_CERT_FILE = "${DERMASCOPE_RAUC_CERT}"
RAUC_KEYRING_FILE = "${DERMASCOPE_RAUC_KEYRING}"

RAUC_BUNDLE_COMPATIBLE = "${DERMASCOPE_RAUC_COMPATIBLE}"
RAUC_BUNDLE_VERSION = "${DERMASCOPE_OS_VERSION}"
RAUC_BUNDLE_DESCRIPTION = "Dermascope OS ${DERMASCOPE_OS_VERSION}"
# system.conf accepts verity bundles only (bundle-formats=-plain).
RAUC_BUNDLE_FORMAT = "verity"

RAUC_BUNDLE_SLOTS = "rootfs"
# bundle.bbclass's per-slot variables (RAUC_SLOT_<slot>), which oelint's
# data cannot list.
# nooelint: oelint.vars.mispell.unknown
RAUC_SLOT_rootfs = "dermascope-image"
# nooelint: oelint.vars.mispell.unknown
RAUC_SLOT_rootfs[fstype] = "ext4"
