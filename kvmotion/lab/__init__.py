"""kvmotion.lab."""
