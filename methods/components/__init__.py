"""Components that several methods can use (one file per component)."""
