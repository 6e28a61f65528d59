SUMMARY = "Dermascope daemon: embeds dermoscopy images, finds similar confirmed cases"
SECTION = "console/utils"
LICENSE = "MIT | Apache-2.0"
# Cargo.toml says "MIT OR Apache-2.0" but the repository ships no license text
# yet: point these at its LICENSE-MIT / LICENSE-APACHE once they exist.
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/MIT;md5=0835ade698e0bcf8506ecda2f7b4f302 \
                    file://${COMMON_LICENSE_DIR}/Apache-2.0;md5=89aea4e17d99a7cacdbeed46a0096b10"

# Toolchain: cargo_bin from meta-rust-bin, not poky's `cargo` class. The
# workspace needs Rust >= 1.91 (rust-version in Cargo.toml) and scarthgap's
# own rust is 1.75; meta-rust-bin packages upstream's prebuilt toolchains of
# any release (the version is pinned with PREFERRED_VERSION in the kas file).
# The price: cargo fetches crates from crates.io itself during do_compile
# (exact versions and checksums from Cargo.lock, enforced by --locked) instead
# of bitbake's fetcher, so do_compile needs the network and DL_DIR/premirrors
# do not cover the crates.
inherit cargo_bin systemd useradd features_check

REQUIRED_DISTRO_FEATURES = "systemd"

# Source: commit DERMASCOPE_SRCREV of the repository this layer lives in
# (DERMASCOPE_REPO_DIR, set in layer.conf). kas passes DERMASCOPE_SRCREV from
# the environment; see yocto/README.md. Building a commit rather than the
# working tree keeps uncommitted edits out of device images. For day-to-day
# work on the daemon use externalsrc instead (also in the README).
SRC_URI = "git://${DERMASCOPE_REPO_DIR};protocol=file;nobranch=1 \
           file://dermascope.service \
           file://dermascope.toml \
           file://60-dermascope.rules \
           "
# All zeros means "not set": a well-formed hash keeps the fetcher quiet at
# parse time so the check below can say what is missing.
DERMASCOPE_SRCREV ??= "0000000000000000000000000000000000000000"
PV .= "+git"
SRCREV = "${DERMASCOPE_SRCREV}"
S = "${WORKDIR}/git"

python () {
    if d.getVar("EXTERNALSRC"):
        return
    if d.getVar("DERMASCOPE_SRCREV").strip("0") == "":
        raise bb.parse.SkipRecipe("DERMASCOPE_SRCREV is not set; build with "
            "DERMASCOPE_SRCREV=$(git rev-parse HEAD) kas build yocto/kas/dermascope-rpi4.yml")
}

# Only the daemon's binary, built exactly against the committed Cargo.lock.
EXTRA_CARGO_FLAGS = "--locked --package dermascope --bin dermascope"
do_compile[network] = "1"

do_install:append() {
    install -d ${D}${sysconfdir}/dermascope
    install -m 0644 ${WORKDIR}/dermascope.toml ${D}${sysconfdir}/dermascope/

    install -d ${D}${systemd_system_unitdir}
    install -m 0644 ${WORKDIR}/dermascope.service ${D}${systemd_system_unitdir}/

    # Gives the gpio/spi groups the device nodes (video and fb already belong
    # to "video" through systemd's default udev rules).
    install -d ${D}${nonarch_base_libdir}/udev/rules.d
    install -m 0644 ${WORKDIR}/60-dermascope.rules ${D}${nonarch_base_libdir}/udev/rules.d/
}

SYSTEMD_SERVICE:${PN} = "dermascope.service"

# System user for the service. gpio and spi are not in base-passwd, so they
# are created here (groupadd is a no-op if another package made them first).
USERADD_PACKAGES = "${PN}"
GROUPADD_PARAM:${PN} = "--system gpio; --system spi"
USERADD_PARAM:${PN} = "--system --user-group --groups video,gpio,spi \
                       --home-dir ${localstatedir}/lib/dermascope --no-create-home \
                       --shell ${base_sbindir}/nologin dermascope"

FILES:${PN} += "${nonarch_base_libdir}/udev/rules.d"
CONFFILES:${PN} += "${sysconfdir}/dermascope/dermascope.toml"
