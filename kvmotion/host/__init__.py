"""kvmotion.host."""
