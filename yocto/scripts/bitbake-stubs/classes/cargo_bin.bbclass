# Stub of meta-rust-bin's cargo_bin class for yocto/scripts/check-bitbake:
# the variables the dermascope recipe relies on, copied from the class at the
# commit the kas file pins (4aac047a), and task bodies that do nothing, so
# that do_configure and do_install run the recipe's own appends.
export CARGO_HOME = "${WORKDIR}/cargo_home"
B = "${WORKDIR}/target"
export CARGO_TARGET_DIR = "${B}"
EXTRA_CARGO_FLAGS ??= ""

cargo_bin_do_configure() {
    mkdir -p "${B}"
    mkdir -p "${CARGO_HOME}"
}

cargo_bin_do_compile() {
    :
}

cargo_bin_do_install() {
    :
}

EXPORT_FUNCTIONS do_configure do_compile do_install
