"""fedrad fedrad package."""
