"""kvmotion.qemu."""
