"""fedrad client package."""
