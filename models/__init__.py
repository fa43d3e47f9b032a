"""fedrad models package."""
