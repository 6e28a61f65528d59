# nooelint: oelint.var.mandatoryvar.SRC_URI
# The file is written from DERMASCOPE_OS_VERSION at build time, hence no
# SRC_URI.
SUMMARY = "The OS version of this image, in /etc/dermascope-os-version"
DESCRIPTION = "One line: DERMASCOPE_OS_VERSION, the version this root \
               filesystem was built and bundled as. rauc-conf's pre-install \
               handler refuses any bundle below it."
SECTION = "base"
LICENSE = "MIT"
# A generated one-line file, no licence text of its own.
# nooelint: oelint.var.licenseremotefile
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/MIT;md5=0835ade698e0bcf8506ecda2f7b4f302"

inherit allarch

# The kas file's env (default 0.1.0); the bundle's RAUC_BUNDLE_VERSION and
# system.conf's min-bundle-version are the same variable.
DERMASCOPE_OS_VERSION ??= ""

do_install() {
    if [ -z "${DERMASCOPE_OS_VERSION}" ]; then
        bbfatal "DERMASCOPE_OS_VERSION is empty: set it (kas file env) to this OS release's version"
    fi
    install -d ${D}${sysconfdir}
    echo "${DERMASCOPE_OS_VERSION}" > ${D}${sysconfdir}/dermascope-os-version
    chmod 0644 ${D}${sysconfdir}/dermascope-os-version
}
