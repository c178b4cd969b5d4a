"""genforge.runtime."""
