"""fedrad privacy package."""
