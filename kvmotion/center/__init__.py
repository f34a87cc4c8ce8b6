"""kvmotion.center."""
