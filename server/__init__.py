"""fedrad server package."""
