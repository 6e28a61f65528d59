SUMMARY = "Dermascope encoder bundle: sklesion Xception as fp32 and int8 ONNX"
DESCRIPTION = "manifest.toml and the encoder files it lists, as produced by \
               models/build, installed where the daemon looks by default."
SECTION = "misc"
# manifest.toml: license = "MIT", the licence of the sklesion 0.2.2 wheel the
# weights are converted from. The bundle carries no licence text of its own,
# hence the common one.
LICENSE = "MIT"
# nooelint: oelint.var.licenseremotefile
LIC_FILES_CHKSUM = "file://${COMMON_LICENSE_DIR}/MIT;md5=0835ade698e0bcf8506ecda2f7b4f302"

inherit allarch
INHIBIT_DEFAULT_DEPS = "1"

DERMASCOPE_MODEL_NAME = "sklesion-xception"

# The bundle is not in git. yocto/scripts/yocto-stage-models copies it from
# models/dist/ into files/ next to this recipe; set DERMASCOPE_MODELS_DIR in
# local.conf to take it from elsewhere (e.g. an unpacked release artefact).
# FILESEXTRAPATHS in a recipe, not a bbappend: it is how that override
# reaches the file:// fetcher.
DERMASCOPE_MODELS_DIR_DEFAULT := "${THISDIR}/files"
DERMASCOPE_MODELS_DIR ?= "${DERMASCOPE_MODELS_DIR_DEFAULT}"
# nooelint: oelint.vars.fileextrapaths,oelint.vars.outofcontext
FILESEXTRAPATHS:prepend := "${DERMASCOPE_MODELS_DIR}:"

SRC_URI = "file://${DERMASCOPE_MODEL_NAME}"
S = "${WORKDIR}/${DERMASCOPE_MODEL_NAME}"

# A missing file:// entry would stop parsing of every recipe; skip just this
# one instead, with the fix in the message. mark_dependency makes bitbake
# re-parse the recipe once the bundle appears.
# nooelint: oelint.task.noanonpython
python () {
    import os
    manifest = d.expand("${DERMASCOPE_MODELS_DIR}/${DERMASCOPE_MODEL_NAME}/manifest.toml")
    bb.parse.mark_dependency(d, manifest)
    if not os.path.isfile(manifest):
        raise bb.parse.SkipRecipe("no encoder bundle at %s: run models/build, then "
            "yocto/scripts/yocto-stage-models" % os.path.dirname(manifest))
}

do_configure[noexec] = "1"
do_compile[noexec] = "1"

# The staging script copies only manifest.toml and the variant files it lists.
do_install() {
    install -d ${D}${datadir}/dermascope/models/${DERMASCOPE_MODEL_NAME}
    install -m 0644 ${S}/manifest.toml ${S}/*.onnx \
        ${D}${datadir}/dermascope/models/${DERMASCOPE_MODEL_NAME}/
}

FILES:${PN} += "${datadir}/dermascope/models"
