"""kvmotion.cpu."""
