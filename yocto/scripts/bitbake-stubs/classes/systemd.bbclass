# Stub for yocto/scripts/check-bitbake: the recipe inherits systemd, whose
# real content (poky) check-bitbake does not need.
