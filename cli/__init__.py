"""genforge.cli."""
