"""genforge.export."""
