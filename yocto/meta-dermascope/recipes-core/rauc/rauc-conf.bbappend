# Dermascope's /etc/rauc/system.conf (files/system.conf: the Raspberry Pi SD
# card's A/B layout, hence the rpi overrides) and the keyring: the operator's
# CA certificate, from DERMASCOPE_RAUC_KEYRING (an absolute path to a PEM file
# outside this repository). No key, and no default certificate, is kept in
# the layer; scripts/rauc-dev-pki makes a development CA. The DERMASCOPE_*
# settings come from yocto/kas/dermascope-rpi4.yml (its "rauc" block and env).

FILESEXTRAPATHS:prepend:rpi := "${THISDIR}/files:"
# The pre-install handler system.conf names: refuses a bundle below the
# running OS's version (/etc/dermascope-os-version), behind RAUC's own
# min-bundle-version; scripts/test-rauc runs this same file under rauc.
SRC_URI:append:rpi = " file://dermascope-version-floor"
DERMASCOPE_RAUC_HANDLER:rpi = "${libexecdir}/rauc/dermascope-version-floor"
# The keyring's directory, known only once local.conf is read: hence "=".
# nooelint: oelint.vars.fileextrapathsop
FILESEXTRAPATHS:prepend:rpi = "${@os.path.dirname(d.getVar('DERMASCOPE_RAUC_KEYRING')) + ':' if d.getVar('DERMASCOPE_RAUC_KEYRING') else ''}"

# meta-rauc's rauc-conf installs ${WORKDIR}/${RAUC_KEYRING_FILE}, found
# through FILESEXTRAPATHS above.
RAUC_KEYRING_FILE:rpi = "${@os.path.basename(d.getVar('DERMASCOPE_RAUC_KEYRING')) or 'ca.cert.pem'}"

# system.conf names the machine (compatible) and this image's version.
PACKAGE_ARCH:rpi = "${MACHINE_ARCH}"

FILES:${PN}:append:rpi = " ${DERMASCOPE_RAUC_HANDLER}"
# The handler is a bash script (arrays, [[ ]]); busybox's sh is not bash.
RDEPENDS:${PN}:append:rpi = " bash"

# rpi: meta-raspberrypi's machine override, unknown to oelint's data.
# nooelint: oelint.func.specific
do_install:append:rpi() {
    keyring="${WORKDIR}/${RAUC_KEYRING_FILE}"
    if grep -q "PRIVATE KEY" "$keyring"; then
        bbfatal "DERMASCOPE_RAUC_KEYRING ($keyring) contains a private key: point it at the CA certificate only"
    fi
    if ! grep -q "BEGIN CERTIFICATE" "$keyring"; then
        bbfatal "DERMASCOPE_RAUC_KEYRING ($keyring) holds no PEM certificate"
    fi
    install -d ${D}${libexecdir}/rauc
    install -m 0755 ${WORKDIR}/dermascope-version-floor ${D}${DERMASCOPE_RAUC_HANDLER}
    sed -i \
        -e 's|@COMPATIBLE@|${DERMASCOPE_RAUC_COMPATIBLE}|' \
        -e 's|@HANDLER@|${DERMASCOPE_RAUC_HANDLER}|' \
        -e 's|@VERSION@|${DERMASCOPE_OS_VERSION}|' \
        -e 's|@KEYRING@|${RAUC_KEYRING_FILE}|' \
        -e 's|@DISK@|${DERMASCOPE_RAUC_DISK}|' \
        ${D}${sysconfdir}/rauc/system.conf
}

# Skips rauc-conf, with what to set, instead of shipping meta-rauc's example
# keyring; packagegroup-dermascope-update depends on it, so the image fails.
# nooelint: oelint.task.noanonpython,oelint.vars.noncoreoverride
python () {
    if "rpi" in d.getVar("OVERRIDES").split(":") and not d.getVar("DERMASCOPE_RAUC_KEYRING"):
        raise bb.parse.SkipRecipe("DERMASCOPE_RAUC_KEYRING is not set: export it as the "
            "absolute path of the update CA's certificate (PEM) before kas build; "
            "scripts/rauc-dev-pki DIR makes a development one")
}
