"""kvmotion: live-migrate running QEMU virtual machines between hosts (vMotion for QEMU)."""

__version__ = "0.1.0"
