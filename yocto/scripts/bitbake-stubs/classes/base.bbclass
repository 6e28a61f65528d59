# Stub for yocto/scripts/check-bitbake: the recipe inherits base, whose
# real content (poky) check-bitbake does not need.
