"""Patching: where patches start in a byte sequence (the patchers), the one patching spec every
command and recipe uses and each command's default, entropy-threshold calibration, and the
patch viewer."""
