# Stub for yocto/scripts/check-bitbake: the recipe inherits useradd, whose
# real content (poky) check-bitbake does not need.
