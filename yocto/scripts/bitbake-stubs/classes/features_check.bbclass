# Stub for yocto/scripts/check-bitbake: the recipe inherits features_check, whose
# real content (poky) check-bitbake does not need.
