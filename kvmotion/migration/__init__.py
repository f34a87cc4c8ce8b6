"""kvmotion.migration."""
