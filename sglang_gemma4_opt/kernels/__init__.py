"""Kernels and reference math of the plugin; wrappers are thin, patching lives in `..patches`."""
