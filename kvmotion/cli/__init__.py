"""kvmotion.cli."""
