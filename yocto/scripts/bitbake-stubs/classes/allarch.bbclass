# Stub for yocto/scripts/check-bitbake: the recipe inherits allarch, whose
# real content (poky) check-bitbake does not need.
